"""Test and benchmark setup (tests/ and benches/): Triton runs in its interpreter when there is
no GPU, and op outputs are NaN-poisoned before kernels write them, so unwritten elements fail
comparisons."""

import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Must be set before triton is imported anywhere.
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("SIGVLP_POISON_OUTPUTS", "1")
os.environ.pop("SIGVLP_BACKEND", None)  # tests choose backends explicitly

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
