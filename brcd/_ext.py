"""Loads the compiled extension (which registers torch.ops.brcd) with an actionable message when it is missing."""
import torch  # noqa: F401  (the extension links against torch: import it first)

try:
    from . import _C
except ImportError as exc:  # pragma: no cover - exercised only on broken installs
    raise ImportError(
        "brcd's compiled extension brcd._C is missing or does not match this torch "
        f"({torch.__version__}). Rebuild it from the repository root with "
        "`pip install --no-build-isolation -e .` (or `./dev.sh build`)."
    ) from exc


def build_info() -> dict:
    """What brcd._C was built with: {"version", "cuda", "simd", "openmp", "openmp_threads"}.

    "simd" is the popcount path chosen at run time for this processor (BRCD_SIMD=scalar|avx2 caps it).
    """
    return dict(_C.build_info())


def cuda_available() -> bool:
    """Whether brcd's CUDA kernels can run here: this build has them and torch sees a GPU."""
    return bool(_C.build_info()["cuda"]) and torch.cuda.is_available()
