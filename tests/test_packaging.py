"""The source distribution, as a user's `pip install brcd` would receive it: it carries every file the build and the
tests need (the kernels' headers included), nothing built, and a wheel compiled from it alone works."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import brcd

ROOT = Path(__file__).resolve().parents[1]
# Tracked but of no use outside the repository: CI's entry point and git's own file.
NOT_SHIPPED = (".ci/", ".gitignore")


def tracked_files() -> list[str]:
    if not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout: the files git tracks are what the source distribution must carry")
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    return [f for f in out.decode().split("\0") if f and not f.startswith(NOT_SHIPPED)]


@pytest.fixture(scope="module")
def sdist(tmp_path_factory) -> tuple[list[str], Path]:
    """The sdist of a copy of the tracked files (the working tree also holds builds and caches that must not count),
    made from MANIFEST.in and the package list alone (BRCD_METADATA_ONLY: no extension declared to add sources)."""
    files = tracked_files()
    tree = tmp_path_factory.mktemp("tree")
    for name in files:
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, tree / name)
    dist = tmp_path_factory.mktemp("dist")
    run = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(dist)], cwd=tree, capture_output=True,
                         text=True, env=dict(os.environ, BRCD_METADATA_ONLY="1"))
    assert run.returncode == 0, run.stderr[-3000:]
    (archive,) = dist.glob("brcd-*.tar.gz")
    return files, archive


def test_sdist_carries_every_source_and_nothing_built(sdist):
    files, archive = sdist
    with tarfile.open(archive) as tar:
        prefix = tar.getnames()[0].split("/")[0] + "/"
        shipped = {name[len(prefix):] for name in tar.getnames() if name.startswith(prefix)}
    missing = sorted(set(files) - shipped)
    assert not missing, f"tracked files missing from the sdist: {missing}"
    assert any(f.endswith(".h") for f in shipped) and any(f.endswith(".cu") for f in shipped)
    built = sorted(f for f in shipped if f.endswith((".so", ".pyd", ".pyc", ".o")))
    assert not built, f"build products in the sdist: {built}"


# What the subprocess computes with the wheel's extension, and this process with the development build.
PROBE = """
import json, torch, brcd
g = torch.Generator().manual_seed(0)
codes = torch.randn(300, 70, generator=g)
packed = brcd.pack_codes(codes)
dist, idx = brcd.hamming_topk(packed[:20], packed, 7)
s, ta, tv = (torch.randn(16, 24, generator=g, dtype=torch.float64) for _ in range(3))
loss = brcd.brcd_loss(s, ta, tv, temperature=0.3, alpha=0.8)
print(json.dumps(dict(file=brcd.__file__, info=brcd.build_info(), packed=packed.tolist(), dist=dist.tolist(),
                      idx=idx.tolist(), loss=loss.item())))
"""


def probe(package_dir: Path, cwd: Path) -> dict:
    """PROBE's answers with the brcd found in package_dir, run from cwd (away from the repository, so that nothing
    else can be imported)."""
    run = subprocess.run([sys.executable, "-c", PROBE], cwd=cwd, capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, PYTHONPATH=str(package_dir)))
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_a_wheel_built_from_the_sdist_works(sdist, tmp_path):
    _, archive = sdist
    # A CPU-only build (the CUDA one compiles the same way with nvcc present, and takes minutes more).
    env = dict(os.environ, BRCD_CUDA="0", MAX_JOBS=str(os.cpu_count() or 1),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")  # the venv's ninja
    wheels = tmp_path / "wheels"
    run = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check",
                          "--no-build-isolation", "--no-deps", str(archive), "-w", str(wheels)],
                         capture_output=True, text=True, env=env, timeout=1800)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    (wheel,) = wheels.glob("brcd-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site)
    got = probe(site, cwd=tmp_path)
    assert Path(got["file"]).resolve().is_relative_to(site.resolve())
    assert got["info"]["cuda"] is False and got["info"]["version"] == brcd.__version__
    want = probe(ROOT, cwd=tmp_path)  # the development build
    for key in ("packed", "dist", "idx"):
        assert got[key] == want[key], key
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-12)
