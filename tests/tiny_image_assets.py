"""Tiny Fashion-MNIST IDX files and a tiny timm ViT folder for it (no downloads), shared by the datamodule and
config tests and by ``benchmarks/bench_prehab_vit.py --smoke``."""

from __future__ import annotations

import gzip
from pathlib import Path

import torch

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
IDX_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
TINY_VIT = {
    "img_size": 28,
    "patch_size": 7,
    "in_chans": 1,
    "embed_dim": 24,
    "depth": 2,
    "num_heads": 2,
    "mlp_ratio": 2.0,
}


def write_idx(path: Path, data: torch.Tensor) -> None:
    """An IDX file of uint8 data (3-D images or 1-D labels), gzipped when ``path`` ends with ``.gz``."""
    header = bytes([0, 0, 0x08, data.dim()]) + b"".join(int(n).to_bytes(4, "big") for n in data.shape)
    payload = header + data.to(torch.uint8).contiguous().numpy().tobytes()
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)


def has_fashion_mnist(folder: Path = FASHION_MNIST) -> bool:
    return all((folder / n).is_file() or (folder / f"{n}.gz").is_file() for n in IDX_NAMES)


def tiny_fashion_mnist(folder: Path, source: Path | None = FASHION_MNIST, train: int = 96, test: int = 48) -> Path:
    """The first ``train``/``test`` images of the real files when ``source`` holds them, else random images with
    cycling labels, as four ``.gz`` IDX files in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    if source is not None and has_fashion_mnist(source):
        from prehab.datamodules import FashionMNIST

        real = FashionMNIST(root=str(source), cache_dir=str(folder.parent / f"{folder.name}-cache"))
        parts = {
            prefix: (split.data[:count], split.targets[:count])
            for prefix, split, count in (("train", real.split(True), train), ("t10k", real.split(False), test))
        }
    else:
        generator = torch.Generator().manual_seed(0)
        parts = {
            prefix: (torch.randint(0, 256, (count, 28, 28), generator=generator), torch.arange(count) % 10)
            for prefix, count in (("train", train), ("t10k", test))
        }
    for prefix, (images, labels) in parts.items():
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return folder


def tiny_fashion_vit(folder: Path, seed: int = 0) -> Path:
    """A random 2-block ViT for 28x28 grayscale, 10 classes, saved as a timm folder (``local-dir:<folder>``)."""
    import timm
    from timm.models import save_for_hf

    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, **TINY_VIT)
    save_for_hf(model, str(folder), model_args={**TINY_VIT, "num_classes": 10}, safe_serialization=True)
    return folder
