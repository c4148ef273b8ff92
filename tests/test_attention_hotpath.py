"""rope_attention_varlen on the GPU hot path, checked without a GPU (issue 14):

- no device-to-host read on the fast path (Tensor.item/tolist/cpu/... raise when sigvlp calls them);
- no sin/cos inside any loop of the attention kernels (compiled to Triton IR for sm_90, no driver);
- no recompilation for new lengths: every integer launch argument that changes with the lengths
  is in its kernel's do_not_specialize list (totals that are and are not multiples of 16).
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

import sigvlp
import sigvlp.kernels
import sigvlp.ops.attention as attention_op
from sigvlp.ops import rope_attention_varlen

from _attention_ttir import trig_in_loops
from _varlen import cu_seqlens_of, grids_of

TESTS = pathlib.Path(__file__).resolve().parent
OUR_CODE = tuple(str(pathlib.Path(m.__file__).resolve().parent) for m in (sigvlp, sigvlp.kernels))
HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"


@functools.lru_cache(maxsize=None)
def _static_survey() -> dict:
    """Run tests/_attention_ttir.py in a fresh interpreter without TRITON_INTERPRET (it compiles)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(TESTS / "_attention_ttir.py")], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _inputs(lengths_q, lengths_k=None, nheads=2, nheads_kv=1, head_dim=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths_k = lengths_q if lengths_k is None else lengths_k
    q = torch.randn(sum(lengths_q), nheads, head_dim, generator=g).to(DEV)
    k, v = (torch.randn(sum(lengths_k), nheads_kv, head_dim, generator=g).to(DEV) for _ in range(2))
    return q, k, v


def _forward_backward(lengths_q, lengths_k=None, *, mode="grid", causal=True, validate=False):
    """One fused forward + backward through the public op (Triton backend), self or cross form."""
    q, k, v = (x.requires_grad_() for x in _inputs(lengths_q, lengths_k))
    cu = cu_seqlens_of(lengths_q, DEV)
    kw = dict(causal=causal, backend="triton", validate=validate, return_lse=True)
    if mode == "grid":
        kw["grid_thw"] = grids_of(lengths_q, DEV)
    elif mode == "positions":
        kw["positions"] = torch.rand(q.shape[0], 3, device=DEV) * 9
    if lengths_k is not None:
        kw.update(cu_seqlens_k=cu_seqlens_of(lengths_k, DEV), max_seqlen_k=max(lengths_k))
        if mode == "grid":
            kw["grid_thw_k"] = grids_of(lengths_k, DEV)
        elif mode == "positions":
            kw["positions_k"] = torch.rand(k.shape[0], 3, device=DEV) * 9
    out, lse = rope_attention_varlen(q, k, v, cu, max(lengths_q), **kw)
    (out.float().square().sum() + lse.masked_fill(torch.isinf(lse), 0).sum()).backward()
    return out


# ----------------------------------------------------------------------------- 1. no host reads


_HOST_READS = ("item", "tolist", "cpu", "numpy", "nonzero", "__bool__", "__int__", "__float__", "__index__")


def _is_cpu(dev) -> bool:
    return (isinstance(dev, str) and dev.startswith("cpu")) or (isinstance(dev, torch.device) and dev.type == "cpu")


@pytest.fixture
def forbid_host_reads(monkeypatch):
    """Tensor methods that copy device values to the host raise when called from sigvlp's code
    (Triton's interpreter and torch internals may still use them). Validation follows the CUDA
    policy (only when asked), so the CPU run takes the GPU's fast path."""
    def guarded(name, original):
        def method(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(OUR_CODE):
                raise AssertionError(f"host read: Tensor.{name} called from {caller}")
            return original(self, *args, **kwargs)
        return method

    for name in _HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, guarded(name, getattr(torch.Tensor, name)))
    original_to = torch.Tensor.to

    def to(self, *args, **kwargs):
        caller = sys._getframe(1).f_code.co_filename
        if caller.startswith(OUR_CODE) and (any(_is_cpu(a) for a in args) or _is_cpu(kwargs.get("device"))):
            raise AssertionError(f"host read: Tensor.to(cpu) called from {caller}")
        return original_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", to)
    monkeypatch.setattr(attention_op, "validation_enabled", lambda validate, device: validate)


@pytest.mark.parametrize("lengths_q,lengths_k,mode", [
    ([5, 0, 20], None, "grid"), ([3, 1, 9], [7, 0, 12], "positions"), ([1, 1], [9, 4], "none")],
    ids=["self-grid", "cross-positions", "cross-map"])
def test_fast_path_makes_no_host_reads(forbid_host_reads, lengths_q, lengths_k, mode):
    out = _forward_backward(lengths_q, lengths_k, mode=mode)
    assert out.shape[0] == sum(lengths_q)


def test_validation_is_a_host_read(forbid_host_reads):
    """The control: with validate=True the value checks read cu_seqlens back, and the guard sees it."""
    with pytest.raises(AssertionError, match="host read"):
        _forward_backward([5, 0, 20], validate=True)


# ----------------------------------------------------------------------------- 3. no sin/cos in loops


def test_trig_detector_sees_loops():
    ttir = """tt.func @k() {
      %0 = math.sin %a : tensor<16xf32>
      %1 = scf.for %i = %c0 to %n step %c1 iter_args(%x = %0) -> (tensor<16xf32>) : i32 {
        %2 = tt.extern_elementwise %x {symbol = "__nv_cosf"} : (tensor<16xf32>) -> tensor<16xf32>
        scf.yield %2 : tensor<16xf32>
      }
      %3 = scf.while (%y = %1) : (tensor<16xf32>) -> tensor<16xf32> {
        scf.condition(%c) %y : tensor<16xf32>
      } do {
      ^bb0(%z: tensor<16xf32>):
        %4 = math.cos %z : tensor<16xf32>
        scf.yield %4 : tensor<16xf32>
      }
      %5 = math.cos %3 : tensor<16xf32>
      tt.return
    }"""
    assert trig_in_loops(ttir) == (4, 2)


def test_attention_kernels_have_no_sin_cos_in_loops():
    """Every attention kernel (fwd, dK/dV, dQ; grid_thw and positions; causal or not), compiled for
    sm_90 with bf16 and head_dim 64: no sin/cos at all (rotation values come from per-call tables).
    Before the tables: 6 sin/cos in the forward's TTIR, 4 inside loops (8/6 in causal dK/dV)."""
    survey = _static_survey()["ttir"]
    assert len(survey) == 12
    for variant, counts in survey.items():
        assert counts["loops"] >= 2, f"{variant}: no loops found in the TTIR (did the survey compile it?)"
        assert counts["sincos_in_loops"] == 0, f"{variant}: {counts}"
        assert counts["sincos"] == 0, f"{variant}: {counts}"


# ----------------------------------------------------------------------------- 4. no recompiles


def _record_launches(monkeypatch):
    """kernel name -> list of its integer launch arguments (by name), for every launch."""
    from sigvlp.kernels import attention as kern
    from sigvlp.kernels import rope

    launches = {}
    original = kern._positional

    def recording(kernel, named):
        fn = kernel
        while not hasattr(fn, "arg_names") and hasattr(fn, "fn"):
            fn = fn.fn
        name = getattr(fn, "__name__", None) or fn.fn.__name__
        ints = {k: v for k, v in named.items() if isinstance(v, int) and not isinstance(v, bool)}
        launches.setdefault(name, []).append(ints)
        return original(kernel, named)

    monkeypatch.setattr(kern, "_positional", recording)

    class TableKernel:  # rotary_tables launches with keywords: record them
        def __getitem__(self, grid):
            def launch(**kwargs):
                ints = {k: v for k, v in kwargs.items() if isinstance(v, int) and not isinstance(v, bool)
                        and not k.isupper()}
                launches.setdefault("rotary_table_kernel", []).append(ints)
                return original_table[grid](**kwargs)
            return launch

    original_table = rope.rotary_table_kernel
    monkeypatch.setattr(rope, "rotary_table_kernel", TableKernel())
    return launches


@pytest.mark.parametrize("mode", ["grid", "positions"])
def test_new_lengths_change_only_unspecialised_arguments(monkeypatch, mode):
    """Two batches, token totals 48 (q) / 64 (k), multiples of 16, then 31 / 19: every integer
    argument of every kernel launch that differs between them is in that kernel's
    do_not_specialize list (Triton specialises the others on % 16 and == 1: a recompile)."""
    lists = _static_survey()["do_not_specialize"]
    launches = _record_launches(monkeypatch)
    _forward_backward([16, 32], [48, 16], mode=mode)
    first = {name: list(calls) for name, calls in launches.items()}
    launches.clear()
    _forward_backward([17, 14], [18, 1], mode=mode)
    assert set(first) == set(launches)
    assert {"_fwd_kernel", "_bwd_preprocess_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel",
            "rotary_table_kernel"} <= set(first)
    for name in first:
        for a, b in zip(first[name], launches[name]):
            changed = {arg for arg in a if a[arg] != b[arg]}
            assert changed, f"{name}: the test's lengths changed no argument"
            assert changed <= set(lists[name]), f"{name}: {sorted(changed - set(lists[name]))} specialised"
    assert first["_fwd_kernel"][0]["total_q"] % 16 == 0 and launches["_fwd_kernel"][0]["total_q"] % 16 != 0


# ----------------------------------------------------------------------------- 1. memory safety


def _padded(x, margin=64):
    """x as a view in the middle of a NaN-filled buffer: a read outside x's rows shows up as NaN."""
    buf = torch.full((x.shape[0] + 2 * margin, *x.shape[1:]), float("nan"), dtype=x.dtype, device=x.device)
    buf[margin : margin + x.shape[0]] = x
    return buf[margin : margin + x.shape[0]]


@pytest.mark.parametrize("cross", [False, True])
def test_garbage_index_values_never_read_outside_the_inputs(monkeypatch, cross):
    """Unvalidated bad cu_seqlens / grid values (negative, decreasing, past the end, huge) give
    wrong numbers but every read stays inside q, k, v (sentinel NaN around them never leaks)."""
    from sigvlp.ops import backends as _backend

    monkeypatch.setattr(attention_op, "validation_enabled", lambda validate, device: validate)
    monkeypatch.setattr(_backend, "_output_hook", lambda t: t.zero_())  # unwritten rows stay 0
    q, k, v = (_padded(x).requires_grad_() for x in _inputs([20], [13] if cross else None))
    cu = torch.tensor([-7, 5, 3, 2 ** 31 - 1, 12], dtype=torch.int32, device=DEV)
    grid = torch.tensor([[2 ** 30, 2 ** 30, 7], [-3, 0, 5], [1, -1, 2 ** 31 - 1], [0, 0, 0]], dtype=torch.int32,
                        device=DEV)
    kw = dict(grid_thw=grid, causal=True, backend="triton", return_lse=True)
    if cross:
        kw.update(cu_seqlens_k=torch.tensor([3, -1, 2 ** 31 - 1, 40, 0], dtype=torch.int32, device=DEV),
                  max_seqlen_k=9, grid_thw_k=grid.flip(0).contiguous())
    out, lse = rope_attention_varlen(q, k, v, cu, 16, **kw)
    (out.sum() + lse.masked_fill(torch.isinf(lse), 0).sum()).backward()
    for name, t in (("out", out), ("lse", lse), ("dq", q.grad), ("dk", k.grad), ("dv", v.grad)):
        assert not torch.isnan(t).any(), f"{name}: NaN read from outside the inputs"


# ----------------------------------------------------------------------------- 5. launch configs


@pytest.mark.parametrize("arch,limit", [(80, 166912), (86, 101376), (90, 232448)])
def test_autotune_pruning_keeps_configs_within_shared_memory(monkeypatch, arch, limit):
    """For every head_dim, dtype and rotation mode, each kernel's pruner keeps at least one config
    and only configs whose shared-memory bound fits the device (compiled sizes are checked against
    the limits by tests/test_launch_limits.py)."""
    from sigvlp.kernels import device_info
    from sigvlp.kernels import attention as kern

    monkeypatch.setattr(device_info, "shared_memory_limit", lambda device: limit)
    monkeypatch.setattr(device_info, "arch", lambda device: arch)
    for which, tuned in (("fwd", kern._fwd_tuned), ("dkdv", kern._dkdv_tuned), ("dq", kern._dq_tuned)):
        prune = tuned.early_config_prune
        for head_dim in kern.SUPPORTED_HEAD_DIMS:
            for dtype, prec in ((torch.bfloat16, "tf32"), (torch.float16, "tf32"), (torch.float32, "ieee")):
                for rotate in (False, True):
                    q = torch.empty(1, 1, head_dim, dtype=dtype)
                    kept = prune(tuned.configs, {"Q": q}, HEAD_DIM=head_dim, DOT_PREC=prec, ROTATE=rotate)
                    assert kept, (which, head_dim, dtype, rotate)
                    for cfg in kept:
                        size = kern._smem_estimate(which, cfg, head_dim=head_dim, elt=q.element_size(),
                                                   rotate=rotate, arch=arch)
                        assert size <= limit, (which, head_dim, dtype, rotate, cfg, size)
