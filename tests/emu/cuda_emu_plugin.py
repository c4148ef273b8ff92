"""pytest plugin for the emulated CUDA run (loaded by tests/test_cuda_emu.py in a subprocess
with SIGVLP_CUDA_EMULATE=1 and ``-p cuda_emu_plugin``).

The op test files parametrize their CPU tests over ``backend`` in ("torch", "triton"); here each
such parametrization also gets "cuda" (served on CPU tensors by sigvlp._cuda_emu), and only the
"cuda" cases are kept, so the same tests, unchanged, run every CUDA kernel on the CPU.
"""

from __future__ import annotations

import os
import pathlib

import pytest

from sigvlp.ops.registry import SPECS

# Test modules whose backend parametrizations gain "cuda": every op's test file marked emulated.
TARGETS = tuple(pathlib.Path(spec.test_file).stem for spec in SPECS.values() if spec.emulated)


def _is_target(module) -> bool:
    return module is not None and module.__name__.rpartition(".")[2] in TARGETS


@pytest.hookimpl(tryfirst=True)
def pytest_generate_tests(metafunc):
    if not _is_target(metafunc.module):
        return
    marks = metafunc.definition.own_markers
    for i, mark in enumerate(marks):
        if mark.name != "parametrize" or not mark.args or mark.args[0] != "backend":
            continue
        values = list(mark.args[1])
        if "triton" in values and "cuda" not in values:
            marks[i] = pytest.mark.parametrize("backend", values + ["cuda"], **mark.kwargs).mark


def pytest_collection_modifyitems(config, items):
    # GPU-marked tests build CUDA tensors: they cannot run here (the emulated cases in
    # tests/emu/emu_cases.py cover their dtypes and paths on CPU tensors).
    keep, drop = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if "gpu" in item.keywords:
            drop.append(item)
        elif not _is_target(getattr(item, "module", None)) or params.get("backend") == "cuda":
            keep.append(item)
        else:
            drop.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_report_header(config):
    from sigvlp.ops import cuda_module

    mod = cuda_module.module()
    return (f"CUDA emulation: SIGVLP_CUDA_EMULATE={os.environ.get('SIGVLP_CUDA_EMULATE')}, "
            f"module {getattr(mod, '__name__', None)}, schedule {mod.schedule() if mod else None}, "
            f"max_grid_y {mod.max_grid_y() if mod else None}")
