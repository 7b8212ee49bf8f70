"""Lightning callbacks: one compression method per file on a shared base, LoRA rehab and zero-shot evaluation."""

from .aa_svd import AASVD
from .base import LowRankCompression
from .rehab import LoRARehab
from .saes_svd import SAESSVD
from .svd import SVD
from .svd_llm import SVDLLM
from .zeroshot import ZeroShotEval

METHODS: dict[str, type[LowRankCompression]] = {"svd": SVD, "svd_llm": SVDLLM, "aa_svd": AASVD, "saes_svd": SAESSVD}

__all__ = ["AASVD", "METHODS", "SAESSVD", "SVD", "SVDLLM", "LoRARehab", "LowRankCompression", "ZeroShotEval"]
