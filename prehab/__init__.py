"""prehab: prepare, compress and recover transformers with low-rank (SVD) factorization."""

from prehab.lowrank import (
    CompressedFolderError,
    LowRankCheckpointMixin,
    LowRankLinear,
    load_compressed,
    load_from_checkpoint,
    save_compressed,
    untie_output_embeddings,
)
from prehab.module import PrehabModule
from prehab.report import CompressionReport, LayerReport

__version__ = "0.1.0"

__all__ = [
    "CompressedFolderError",
    "CompressionReport",
    "LayerReport",
    "LowRankCheckpointMixin",
    "LowRankLinear",
    "PrehabModule",
    "load_compressed",
    "load_from_checkpoint",
    "save_compressed",
    "untie_output_embeddings",
]
