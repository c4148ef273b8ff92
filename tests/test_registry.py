"""sigvlp.ops.registry and the shared varlen helpers: every op's spec is complete and every list of
op names in the project derives from it; cu_seqlens_from_lengths and SUPPORTED_HEAD_DIMS."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import sigvlp.ops as ops
from sigvlp.model.config import SigVLPConfig
from sigvlp.ops import SUPPORTED_HEAD_DIMS, cu_seqlens_from_lengths

# ----------------------------------------------------------------------------- varlen helpers


@pytest.mark.parametrize("lengths", [[3, 0, 5], (1,), [], np.array([4, 4, 2]), torch.tensor([7, 0, 1], dtype=torch.int32)])
def test_cu_seqlens_from_lengths_matches_a_running_sum(lengths):
    values = [int(v) for v in lengths]
    cu = cu_seqlens_from_lengths(lengths if not isinstance(lengths, np.ndarray) else list(lengths))
    assert cu.dtype == torch.int32 and cu.shape == (len(values) + 1,)
    running = [0]
    for v in values:
        running.append(running[-1] + v)
    assert cu.tolist() == running


def test_cu_seqlens_from_lengths_device_and_errors():
    assert cu_seqlens_from_lengths([2, 3], device="meta").device.type == "meta"
    with pytest.raises(ValueError, match="lengths: expected non-negative"):
        cu_seqlens_from_lengths([1, -1])
    with pytest.raises(TypeError, match="lengths: expected ints"):
        cu_seqlens_from_lengths([1.5])
    with pytest.raises(TypeError, match="lengths: expected an integer tensor"):
        cu_seqlens_from_lengths(torch.tensor([1.0]))
    with pytest.raises(ValueError, match="lengths: expected a 1-D tensor"):
        cu_seqlens_from_lengths(torch.ones(2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="int32"):
        cu_seqlens_from_lengths([2**30, 2**30])


def test_one_list_of_head_dims():
    """The attention op, its CUDA backend and the model config use the one tuple in sigvlp.ops."""
    from sigvlp.model import config
    from sigvlp.ops import _attention_cuda, attention

    assert attention.SUPPORTED_HEAD_DIMS is SUPPORTED_HEAD_DIMS
    assert _attention_cuda.SUPPORTED_HEAD_DIMS is SUPPORTED_HEAD_DIMS
    assert config._HEAD_DIMS is SUPPORTED_HEAD_DIMS
    with pytest.raises(ValueError, match="head"):
        SigVLPConfig(width=48 * 2, heads=2)  # head_dim 48: not served
