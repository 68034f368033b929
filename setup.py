"""Builds brcd._C with torch.utils.cpp_extension.

BRCD_CUDA=1 forces the CUDA build (and fails if it cannot be done), BRCD_CUDA=0 forces a CPU-only build;
unset, CUDA is built whenever nvcc is found and torch is a CUDA build. A GPU is not needed to compile.
"""
import os
import shutil
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent.resolve()


def _version() -> str:
    """The version pyproject.toml declares: the one place it is written (the extension and brcd.__version__ take it
    from here)."""
    import re

    m = re.search(r'^version\s*=\s*"([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.MULTILINE)
    if m is None:
        sys.exit("setup.py: no version = \"...\" line in pyproject.toml")
    return m.group(1)


def _want_cuda() -> bool:
    import torch
    from torch.utils import cpp_extension

    forced = os.environ.get("BRCD_CUDA", "").strip().lower()
    nvcc_found = cpp_extension.CUDA_HOME is not None and (
        shutil.which("nvcc") is not None or Path(cpp_extension.CUDA_HOME, "bin", "nvcc").exists()
    )
    torch_has_cuda = torch.version.cuda is not None
    if forced in ("0", "false", "no", "off"):
        return False
    if forced in ("1", "true", "yes", "on"):
        if not (nvcc_found and torch_has_cuda):
            sys.exit(
                "BRCD_CUDA=1 but the CUDA build is impossible here: "
                f"nvcc found={nvcc_found}, torch CUDA build={torch_has_cuda}"
            )
        return True
    return nvcc_found and torch_has_cuda


def _sources(pattern: str) -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in ROOT.glob(pattern))


def _extension():
    from torch.utils import cpp_extension

    with_cuda = _want_cuda()
    # C++20 (the CPU kernels use concepts); older torch releases would otherwise pass -std=c++17.
    cxx_flags = ["-O3", "-fopenmp", "-std=c++20"]
    # Debug builds for sanitizers and gdb: BRCD_DEBUG=1.
    if os.environ.get("BRCD_DEBUG") == "1":
        cxx_flags = ["-O0", "-g", "-fopenmp", "-std=c++20"]
    sources = ["csrc/brcd.cpp"] + _sources("csrc/ops/*_cpu.cpp") + _sources("csrc/ops/*_autograd.cpp")
    sources += _sources("csrc/cpu/*.cpp")
    define_macros = [("BRCD_VERSION", f'"{_version()}"')]
    extra = {"cxx": cxx_flags}
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
        sources += _sources("csrc/ops/*_cuda.cpp") + _sources("csrc/cuda/*.cu")
        define_macros.append(("BRCD_WITH_CUDA", None))
        extra["nvcc"] = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]
        ext_cls = cpp_extension.CUDAExtension
    else:
        ext_cls = cpp_extension.CppExtension
    return ext_cls(
        name="brcd._C",
        sources=sources,
        include_dirs=[str(ROOT / "csrc")],
        define_macros=define_macros,
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
    )


def main():
    from torch.utils.cpp_extension import BuildExtension

    # dev.sh installs the package (editable) with BRCD_METADATA_ONLY=1, then builds the extension in place with
    # `setup.py build_ext --inplace` so that ninja rebuilds only what changed.
    metadata_only = os.environ.get("BRCD_METADATA_ONLY") == "1"
    setup(
        ext_modules=[] if metadata_only else [_extension()],
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    )


if __name__ == "__main__":
    main()
