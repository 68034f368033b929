"""brcd: fused C++/CUDA kernels for BRCD distillation and Hamming search of binary codes.

Quick start::

    import torch, brcd
    db = brcd.pack_codes(torch.randn(100_000, 64))       # uint8 [n, 8]
    q = brcd.pack_codes(torch.randn(10, 64))
    dist, idx = brcd.hamming_topk(q, db, k=5)             # exact, ties to the smaller index

    index = brcd.HammingIndex(64)
    index.add(torch.randn(1000, 64).sign())
    dist, ids = index.search(torch.randn(3, 64), k=10)
"""
from ._ext import build_info, cuda_available
from . import ops
from .ops import *  # noqa: F401,F403  (the ops named in ops.__all__)
from .index import HammingIndex, IndexFileError
from . import metrics
from .code_stats import code_statistics
from .multi_index import MultiIndexHashing

__version__ = build_info()["version"]  # pyproject.toml's, compiled into the extension

__all__ = ["build_info", "cuda_available", *ops.__all__, "HammingIndex", "IndexFileError", "MultiIndexHashing",
           "metrics", "code_statistics"]
