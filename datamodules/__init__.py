"""LightningDataModules with calibration loaders and the fixed evaluation protocol.

Installed as ``prehab.datamodules``. Every DataModule has ``calibration_dataloader()`` returning a seeded,
fixed calibration set; evaluation loaders never repeat samples under DDP.
"""

from .alpaca import Alpaca, alpaca_prompt
from .fashion_mnist import FashionMNIST
from .glue import GLUE, GLUE_TASKS
from .imagenet import ImageNet
from .stdlib_text import StdlibText
from .text import PTB, TextDataModule, WikiText

__all__ = [
    "GLUE",
    "GLUE_TASKS",
    "PTB",
    "Alpaca",
    "FashionMNIST",
    "ImageNet",
    "StdlibText",
    "TextDataModule",
    "WikiText",
    "alpaca_prompt",
]
