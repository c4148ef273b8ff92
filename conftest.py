"""Test and benchmark setup (tests/ and benches/): Triton runs in its interpreter when there is
no GPU; in tests/, op outputs are NaN-poisoned before kernels write them (a test-only hook of
sigvlp.ops.backends), so unwritten elements fail comparisons."""

import math
import os
import pathlib

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Must be set before triton is imported anywhere.
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.pop("SIGVLP_BACKEND", None)  # tests choose backends explicitly
os.environ.pop("SIGVLP_VALIDATE", None)  # tests choose validation explicitly

import pytest  # noqa: E402

_BENCHES = pathlib.Path(__file__).resolve().parent / "benches"


def poison(t: torch.Tensor) -> None:
    """Fill a freshly allocated op output with NaN (floating point) so unwritten elements show."""
    if t.dtype.is_floating_point:
        t.fill_(math.nan)


@pytest.fixture(autouse=True)
def _poison_op_outputs(request):
    """Every op output allocated during a test (not a benchmark) starts as NaN."""
    if _BENCHES in pathlib.Path(str(request.path)).resolve().parents:
        yield
        return
    from sigvlp.ops import backends

    previous = backends.set_output_hook(poison)
    try:
        yield
    finally:
        backends.set_output_hook(previous)


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
