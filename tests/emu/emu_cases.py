"""CUDA kernels on the CPU emulation: the paths the op test files reach only on a GPU.

Run by tests/test_cuda_emu.py in a subprocess with SIGVLP_CUDA_EMULATE=1 (together with the op
test files' CPU tests, which gain a "cuda" backend there). Covers every launcher branch: rope3d
in fp32/fp16/bf16 on the vector and scalar paths, grid and positions inputs; Newton-Schulz in
fp32 (split TF32), bf16 and fp16, batched past the grid limit (lowered in the emulation), steps
= 0; the sigmoid-loss pass in every dtype with and without ids and gradients; results that do not
depend on the thread schedule; memory safety for any cu_seqlens / grid values.
"""

from __future__ import annotations

import math

import pytest
import torch

from sigvlp.ops import cu_seqlens_from_lengths, cuda_module, newton_schulz, rope3d, sigmoid_loss
from sigvlp.ops.sigmoid_loss import sigmoid_loss_dense
from sigvlp.ops.tolerances import assert_at_floor, assert_rope3d_at_floor, max_err, newton_schulz_low_precision
from sigvlp.optim import KELLER_COEFFICIENTS

if not cuda_module.emulated():  # this file only runs in the emulated subprocess
    pytest.skip("needs SIGVLP_CUDA_EMULATE=1 (run by tests/test_cuda_emu.py)", allow_module_level=True)

EMU = cuda_module.module()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture
def emu():
    """The emulation module, its schedule/limits restored after the test."""
    schedule, max_grid_y, workers = EMU.schedule(), EMU.max_grid_y(), EMU.workers()
    yield EMU
    EMU.set_schedule(schedule)
    EMU.set_max_grid_y(max_grid_y)
    EMU.set_workers(workers)


def test_the_cuda_backend_is_the_emulation():
    assert EMU.__name__ == "sigvlp._cuda_emu" and EMU.emulated
    assert cuda_module.unavailable_reason(torch.device("cpu")) is None
    x = torch.randn(4, 1, 8)
    y = rope3d(x, torch.tensor([0, 4], dtype=torch.int32), torch.tensor([[1, 2, 2]], dtype=torch.int32), backend="cuda")
    assert y.shape == x.shape and torch.isfinite(y).all()


# ----------------------------------------------------------------------------- rope3d


def _rope_inputs(lengths, nheads, head_dim, dtype, seed=0, pad=0):
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    wide = torch.randn(total, nheads, head_dim + pad, generator=g).to(dtype)
    x = wide[..., :head_dim]  # pad > 0: head stride not a multiple of a 16-byte vector
    cu = cu_seqlens_from_lengths(lengths)
    grid = []
    for n in lengths:  # (T, H, W) with T * H * W == n, W not always 1
        w = 3 if n % 3 == 0 and n else 1
        grid.append([max(n // w, 0), 1, w] if n else [0, 4, 4])
    return x, cu, torch.tensor(grid, dtype=torch.int32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("pad", [0, 2], ids=["vector", "scalar"])
def test_rope_dtypes_paths_edge_lengths(dtype, interleaved, pad):
    lengths = [1, 0, 7, 64, 129, 2]
    x, cu, grid = _rope_inputs(lengths, nheads=3, head_dim=64, dtype=dtype, pad=pad)
    for inverse in (False, True):
        y = rope3d(x, cu, grid, interleaved=interleaved, inverse=inverse, backend="cuda")
        assert_rope3d_at_floor(y, x, cu, grid, interleaved=interleaved, inverse=inverse)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [4, 24, 40])
def test_rope_positions_and_odd_head_dims(dtype, head_dim):
    x, cu, _ = _rope_inputs([9, 20], nheads=2, head_dim=head_dim, dtype=dtype, seed=1)
    positions = torch.rand(29, 3, generator=torch.Generator().manual_seed(2)) * 500
    for interleaved in (False, True):
        y = rope3d(x, cu, positions=positions, interleaved=interleaved, theta=1000.0, backend="cuda")
        assert_rope3d_at_floor(y, x, cu, positions=positions, interleaved=interleaved, theta=1000.0)


def _raw_rope(x, out, cu, grid, batch=None):
    EMU.rope3d(x=x.data_ptr(), out=out.data_ptr(), dtype=0, total_tokens=x.shape[0], nheads=x.shape[1],
               head_dim=x.shape[2], x_stride_token=x.stride(0), x_stride_head=x.stride(1),
               out_stride_token=out.stride(0), out_stride_head=out.stride(1), cu_seqlens=cu.data_ptr(),
               batch=cu.shape[0] - 1 if batch is None else batch, grid_thw=grid.data_ptr(), positions=0,
               log2_theta=math.log2(10000.0), n_t=4, n_h=6, n_w=6, interleaved=False, inverse=False, stream=0)


@pytest.mark.parametrize("cu_values, grid_values", [
    ([5, 3, 100], [[0, 0, 0], [-1, 7, -3]]),                  # decreasing, past the end, zero/negative grid
    ([-7, 2**31 - 1, -2**31], [[2**31 - 1, 2**31 - 1, 2**31 - 1], [1, -2**31, 1]]),
    ([0, 0, 0], [[1, 1, 1], [1, 1, 1]]),                       # every token "past" the sequences
])
def test_rope_kernel_is_memory_safe_for_any_cu_seqlens_and_grid(cu_values, grid_values):
    """Issue 14 #1: unvalidated int32 values give wrong positions, never a bad access or a trap
    (the sanitizer builds run the same values, tests/emu/driver.cpp)."""
    x = torch.randn(10, 2, 32)
    out = torch.full_like(x, math.nan)
    _raw_rope(x, out, torch.tensor(cu_values, dtype=torch.int32), torch.tensor(grid_values, dtype=torch.int32))
    assert torch.isfinite(out).all()
    # Norm-preserving whatever the positions: each pair is still a rotation.
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=1e-5)


def test_rope_launcher_refuses_an_empty_batch_with_a_grid():
    x = torch.randn(3, 1, 8)
    with pytest.raises(RuntimeError, match="rope3d"):
        _raw_rope(x, torch.empty_like(x), torch.tensor([0], dtype=torch.int32), torch.zeros(0, 3, dtype=torch.int32))


def test_bindings_refuse_missing_and_unknown_keywords():
    """The keywords come from csrc/launchers.h's X-macro lists (EMU.launcher_fields())."""
    fields = EMU.launcher_fields()
    assert fields["rope3d"][0] == "x" and len(fields["rope3d"]) == len(set(fields["rope3d"]))
    with pytest.raises(TypeError, match="missing keyword argument x"):
        EMU.rope3d(out=0)
    kw = dict.fromkeys(fields["rope3d"], 0)
    kw.update(nheads=1, head_dim=8, x_stride_token=8, x_stride_head=8, out_stride_token=8, out_stride_head=8,
              log2_theta=1.0, n_t=1, n_h=1, n_w=1, interleaved=False, inverse=False)
    with pytest.raises(TypeError, match="unexpected keyword argument bogus"):
        EMU.rope3d(**kw, bogus=1)
    EMU.rope3d(**kw)  # zero tokens: nothing to do
    for name, keywords in fields.items():  # every launcher is bound with its declared keywords
        assert getattr(EMU, name).__doc__.rstrip().endswith("Keyword arguments: " + " ".join(keywords)), name


# ----------------------------------------------------------------------------- newton_schulz


def _ns_fp64(G, steps=5, coefficients=KELLER_COEFFICIENTS):
    X = G.double()
    X = X / torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True).clamp(min=1e-7)
    tall = X.shape[-2] > X.shape[-1]
    if tall:
        X = X.mT
    for _ in range(steps):
        a, b, c = coefficients
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return X.mT if tall else X


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(80, 130), (130, 80), (3, 64, 64), (2, 17, 33), (65, 65)],
                         ids=["wide-partial", "tall", "batched-full-tiles", "batched-one-tile", "mirror-tiles"])
def test_newton_schulz_dtypes_and_tiles(dtype, shape):
    G = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    exact = _ns_fp64(G)
    out = newton_schulz(G.to(dtype), backend="cuda", precision="input")
    floor_run = newton_schulz_low_precision(G, [KELLER_COEFFICIENTS] * 5, dtype)
    assert torch.isfinite(out).all()
    # The floor: the spec's iteration run at `dtype` (operands rounded to it, fp32 accumulation);
    # a kernel may differ in where it rounds, not in how much. fp32 runs on split TF32 (products
    # good to ~2^-22, not 2^-24): the slack of tests/test_newton_schulz.py's fp32 oracle test.
    slack = 1e-6 if dtype == torch.float32 else torch.finfo(dtype).eps
    assert_at_floor(out, exact, floor_run, name=str(dtype), slack=slack)


@pytest.mark.parametrize("steps", [0, 1, 5])
def test_newton_schulz_batches_past_the_grid_limit(emu, steps):
    G = torch.randn(7, 20, 36, generator=torch.Generator().manual_seed(4))
    whole = newton_schulz(G, steps=steps, backend="cuda")
    emu.set_max_grid_y(3)  # 7 matrices -> launches of 3, 3, 1
    chunked = newton_schulz(G, steps=steps, backend="cuda")
    assert torch.equal(whole, chunked)
    assert max_err(chunked, _ns_fp64(G, steps)) < 1e-5
    emu.set_max_grid_y(1)
    assert torch.equal(newton_schulz(G, steps=steps, backend="cuda"), whole)


def test_newton_schulz_launcher_refuses_tall_input():
    x = torch.randn(1, 8, 4)
    with pytest.raises(RuntimeError, match="newton_schulz: invalid argument"):
        EMU.newton_schulz(x=x.data_ptr(), out=x.data_ptr(), dtype=0, batch=1, rows=8, cols=4, out_stride_batch=32,
                          out_stride_row=4, out_stride_col=1, inv_norm=0, coefficients=[], steps=0, gram=0,
                          poly=0, scratch0=0, scratch1=0, stream=0)
    with pytest.raises(ValueError, match="coefficients must hold 3 floats per step"):
        EMU.newton_schulz(x=0, out=0, dtype=0, batch=1, rows=4, cols=8, out_stride_batch=32, out_stride_row=8,
                          out_stride_col=1, inv_norm=0, coefficients=[1.0], steps=1, gram=0, poly=0, scratch0=0,
                          scratch1=0, stream=0)


# ----------------------------------------------------------------------------- sigmoid loss


def _sl_case(n, m, d, dtype, ids, seed=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1).to(dtype)
    y = torch.nn.functional.normalize(torch.randn(m, d, generator=g), dim=-1).to(dtype)
    t, b = torch.tensor(10.0), torch.tensor(-10.0)
    iid = tid = None
    if ids:
        iid = torch.randint(0, max(1, n // 2), (n,), generator=g)
        tid = torch.randint(0, max(1, n // 2), (m,), generator=g)
    return x, y, t, b, iid, tid


def _sl_grads(fn, x, y, t, b, iid, tid, dtype=None):
    xs, ys, ts, bs = (v.detach().to(dtype or v.dtype).requires_grad_(True) for v in (x, y, t, b))
    loss = fn(xs, ys, ts, bs, iid, tid)
    loss.backward()
    return [loss.detach(), xs.grad, ys.grad, ts.grad, bs.grad]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, m, d, ids", [(64, 64, 32, False), (70, 130, 72, True), (1, 5, 16, True),
                                          (129, 3, 100, True)])
def test_sigmoid_loss_dtypes_ids_partial_tiles(dtype, n, m, d, ids):
    x, y, t, b, iid, tid = _sl_case(n, m, d, dtype, ids)
    got = _sl_grads(lambda *a: sigmoid_loss(*a[:4], image_ids=a[4], text_ids=a[5], backend="cuda"),
                    x, y, t, b, iid, tid)
    exact = _sl_grads(lambda *a: sigmoid_loss_dense(*a), x, y, t, b, iid, tid, dtype=torch.float64)
    low = _sl_grads(lambda *a: sigmoid_loss_dense(*a), x, y, t.to(dtype), b.to(dtype), iid, tid)
    eps = torch.finfo(dtype).eps
    for name, g_, e, lo in zip(["loss", "dx", "dy", "dt", "db"], got, exact, low):
        assert torch.isfinite(g_).all(), name
        assert_at_floor(g_, e, lo, name=name, slack=eps * max(1.0, e.abs().max().item()))


# ----------------------------------------------------------------------------- schedules


def _all_kernels():
    outs = []
    for dtype in DTYPES:
        x, cu, grid = _rope_inputs([5, 40, 3], nheads=2, head_dim=32, dtype=dtype)
        outs.append(rope3d(x, cu, grid, backend="cuda"))
        G = torch.randn(2, 70, 90, generator=torch.Generator().manual_seed(6)).to(dtype)
        outs.append(newton_schulz(G, steps=2, backend="cuda", precision="input"))
        xs, ys, t, b, iid, tid = _sl_case(70, 40, 48, dtype, True)
        outs += _sl_grads(lambda *a: sigmoid_loss(*a[:4], image_ids=a[4], text_ids=a[5], backend="cuda"),
                          xs, ys, t, b, iid, tid)
    return outs


def test_results_do_not_depend_on_the_thread_schedule(emu):
    """Between barriers the block's threads run forward, reversed or in a seeded shuffle, on one
    or two workers: every kernel's output is bitwise the same (no order-dependent reads)."""
    emu.set_schedule("forward")
    reference = _all_kernels()
    for schedule, workers in [("reversed", 1), ("shuffle:1", 1), ("shuffle:2", 2)]:
        emu.set_schedule(schedule)
        emu.set_workers(workers)
        for i, (a, b) in enumerate(zip(reference, _all_kernels())):
            assert torch.equal(a, b), f"output {i} differs under schedule {schedule}, {workers} workers"


def test_schedule_names(emu):
    emu.set_schedule("shuffle:42")
    assert emu.schedule() == "shuffle:42"
    with pytest.raises(ValueError, match="schedule"):
        emu.set_schedule("sideways")
