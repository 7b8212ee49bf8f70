"""Lightning callbacks: one compression method per file on a shared base."""

from .aa_svd import AASVD
from .base import LowRankCompression
from .saes_svd import SAESSVD
from .svd import SVD
from .svd_llm import SVDLLM

__all__ = ["AASVD", "SAESSVD", "SVD", "SVDLLM", "LowRankCompression"]
