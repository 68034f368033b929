"""The code blocks of README.md and docs/usage.md run as written, and so does the example `./dev.sh example` runs: the
pages cannot drift from the API. A block whose first lines say `# requires: faiss` or `# requires: cuda` is skipped
where that is missing."""
from __future__ import annotations

import importlib.util
import linecache
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["README.md", "docs/usage.md"]
FENCE = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


def python_blocks():
    for page in PAGES:
        text = (ROOT / page).read_text()
        for m in FENCE.finditer(text):
            line = text.count("\n", 0, m.start()) + 2  # the block's first line of code
            yield pytest.param(page, line, m.group(1), id=f"{page}:{line}")


def test_the_pages_have_code():
    assert {p.values[0] for p in python_blocks()} == set(PAGES)


@pytest.mark.parametrize("page, line, code", list(python_blocks()))
def test_code_block_runs(page, line, code, tmp_path, monkeypatch, capsys):
    needs = set(re.findall(r"^# requires: (\w+)", code, re.MULTILINE))
    if "faiss" in needs and importlib.util.find_spec("faiss") is None:
        pytest.skip("faiss is not installed")
    if "cuda" in needs and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    monkeypatch.chdir(tmp_path)  # a block may write files
    # Padded with blank lines so that a traceback names the page's own line numbers. The source is registered under a
    # name of its own: tools that read a code object's file (tracebacks, torch.compile's line index) then read this
    # Python, not the page's Markdown, which Python's tokenizer may reject.
    source = "\n" * (line - 1) + code
    filename = f"<{page} code block>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    exec(compile(source, filename, "exec"), {"__name__": "__docs__"})


def test_the_search_example_runs():
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "search.py")], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert "the same balls by MultiIndexHashing" in out.stdout and "mAP@1000 = " in out.stdout
