"""sigvlp.ops.registry and the shared varlen helpers: every op's spec is complete and every list of
op names in the project derives from it; cu_seqlens_from_lengths and SUPPORTED_HEAD_DIMS."""

from __future__ import annotations

import dataclasses
import pathlib
import re

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
    from sigvlp.ops import _attention_cuda, attention

    assert attention.SUPPORTED_HEAD_DIMS is SUPPORTED_HEAD_DIMS
    assert _attention_cuda.SUPPORTED_HEAD_DIMS is SUPPORTED_HEAD_DIMS
    # the model config validates against that tuple (read when it validates: --help stays torch-free)
    with pytest.raises(ValueError, match=re.escape(str(SUPPORTED_HEAD_DIMS))):
        SigVLPConfig(width=48 * 2, heads=2)  # head_dim 48: not served
    for head_dim in SUPPORTED_HEAD_DIMS:
        SigVLPConfig(width=head_dim * 2, heads=2, text_width=head_dim * 2, text_heads=2)


# ----------------------------------------------------------------------------- the registry

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_every_op_has_a_complete_spec():
    from sigvlp.ops.registry import SPECS

    assert list(SPECS) == list(ops.OPS) and SPECS, "sigvlp.ops.OPS derives from the registry"
    for name, spec in SPECS.items():
        assert spec.name == name and spec.backends is ops.OPS[name]
        assert callable(getattr(ops, name)), f"sigvlp.ops.{name}: the public function"
        assert hasattr(torch.ops.sigvlp, name), f"torch.ops.sigvlp.{name}: the custom op"
        assert (ROOT / spec.test_file).is_file() and (ROOT / spec.bench).is_file(), spec
        assert "torch" in spec.backends.names, f"{name}: the reference backend"
        assert ("triton" in spec.backends.names) == (spec.launch_survey is not None), name


def test_register_refuses_a_second_op_of_the_same_name_and_mismatched_backends():
    from sigvlp.ops.registry import SPECS, OpSpec, register

    spec = SPECS["rope3d"]
    assert register(spec) is spec  # registering the same spec again is harmless
    with pytest.raises(ValueError, match="already registered"):
        register(dataclasses.replace(spec, bench_cap_s=1))
    with pytest.raises(ValueError, match="backends belong to 'rope3d'"):
        register(dataclasses.replace(spec, name="rope4d"))
    with pytest.raises(TypeError, match="OpSpec"):
        register("rope3d")
    assert "rope4d" not in SPECS and SPECS["rope3d"] is spec
    assert OpSpec.__dataclass_params__.frozen


def test_emulation_run_covers_the_emulated_ops():
    """The emulated subprocess of tests/test_cuda_emu.py runs exactly the spec'd op test files, and
    its plugin gives "cuda" to the same modules."""
    import sys

    from sigvlp.ops.registry import SPECS

    sys.path.insert(0, str(ROOT / "tests" / "emu"))
    try:
        import cuda_emu_plugin
    finally:
        sys.path.pop(0)
    emulated = [s.test_file for s in SPECS.values() if s.emulated]
    assert emulated and [f"tests/{m}.py" for m in cuda_emu_plugin.TARGETS] == emulated
    for spec in SPECS.values():  # an op with a CUDA backend is covered by the emulation one way or another
        if "cuda" in spec.backends.names and not spec.emulated:
            assert (ROOT / "tests" / f"{pathlib.Path(spec.test_file).stem}_cuda.py").is_file(), spec.name
