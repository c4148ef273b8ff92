"""Every ```python block of README.md runs, as written, on this machine.

Info strings: ```python (runs everywhere: CPU tensors take the torch backends) and ```python gpu
(needs a CUDA device: skipped without one). Any other fence (```bash, ```text for signatures and
output) is not Python and is not run. Each block runs in a fresh namespace, in a temporary working
directory; a block must be complete (imports and inputs included). Blocks are found at collection
time, so sections added by anyone are covered without touching this file.
"""

from __future__ import annotations

import ast
import pathlib
import re

import pytest
import torch

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
KNOWN_FLAGS = {"gpu"}


def _blocks():
    text = README.read_text()
    blocks = []
    for match in FENCE.finditer(text):
        info = match.group(1).split()
        if not info or info[0] != "python":
            continue
        line = text.count("\n", 0, match.start()) + 1
        headings = re.findall(r"^#+ (.+)$", text[: match.start()], re.MULTILINE)
        section = re.sub(r"\W+", "-", headings[-1].strip("` ")).strip("-").lower() if headings else "top"
        blocks.append(pytest.param(match.group(2), set(info[1:]), line, id=f"{section}-L{line}"))
    return blocks


BLOCKS = _blocks()


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 3, "README.md lost its examples (or the fence parser broke)"


@pytest.mark.parametrize("code, flags, line", BLOCKS)
def test_readme_block_runs(code, flags, line, tmp_path, monkeypatch):
    unknown = flags - KNOWN_FLAGS
    assert not unknown, f"README.md line {line}: unknown flags {sorted(unknown)} after ```python"
    tree = ast.parse(code, filename=f"README.md:{line}")  # signatures belong in ```text blocks
    if "gpu" in flags and not torch.cuda.is_available():
        pytest.skip("README block marked gpu: needs a CUDA device")
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__readme__"}
    exec(compile(tree, f"README.md:{line}", "exec"), namespace)  # noqa: S102
