"""rope3d: exact-rotation properties, backends against the fp64 reference, op registration,
and input validation."""

from __future__ import annotations

import math
import os

import pytest
import torch

import sigvlp.ops as ops
from sigvlp.ops import BackendError, default_sections, rope3d, rope3d_reference
from sigvlp.ops.rope import grid_positions
from sigvlp.ops.tolerances import assert_rope3d_at_floor, max_err, rope3d_low_precision

from _no_sync import HostReadError, forbid_host_reads, gpu_validation_policy, no_cuda_sync, two_gpus
from _varlen import EDGE_LENGTHS, cu_seqlens_of, grids_of, sequence_slices

HAS_CUDA = torch.cuda.is_available()
CPU_BACKENDS = ["torch", "triton"]  # triton runs in the interpreter without a GPU


def _inputs(lengths, nheads=2, head_dim=64, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    x = torch.randn(total, nheads, head_dim, generator=g).to(device=device, dtype=dtype)
    return x, cu_seqlens_of(lengths, device), grids_of(lengths, device)


# ----------------------------------------------------------------------------- the spec itself


def test_default_sections_split_two_three_three():
    assert default_sections(64) == (8, 12, 12)
    assert default_sections(128) == (16, 24, 24)  # Qwen2-VL's M-RoPE split of 128 dims
    for head_dim in (8, 16, 32, 48, 96, 256):
        n_t, n_h, n_w = default_sections(head_dim)
        assert n_t + n_h + n_w == head_dim // 2 and n_h == n_w and n_t >= 0


def test_grid_positions_are_t_major():
    cu = cu_seqlens_of([0, 12, 6])
    grid = torch.tensor([[0, 2, 2], [2, 3, 2], [1, 2, 3]], dtype=torch.int32)
    pos = grid_positions(cu, grid)
    expected = [(t, h, w) for t in range(2) for h in range(3) for w in range(2)]
    expected += [(0, h, w) for h in range(2) for w in range(3)]
    assert pos.tolist() == [list(map(float, p)) for p in expected]


def _naive_rope(x, positions, sections, theta, interleaved):
    """Element-by-element statement of the spec, for one tiny input."""
    out = x.clone().double()
    half = x.shape[-1] // 2
    for n in range(x.shape[0]):
        for p in range(half):
            axis, j, n_a = None, None, None
            start = 0
            for a, count in enumerate(sections):
                if start <= p < start + count:
                    axis, j, n_a = a, p - start, count
                start += count
            if axis is None:
                continue
            angle = float(positions[n, axis]) * theta ** (-j / n_a)
            c, s = math.cos(angle), math.sin(angle)
            i0, i1 = (2 * p, 2 * p + 1) if interleaved else (p, p + half)
            for hd in range(x.shape[1]):
                a0, a1 = float(x[n, hd, i0]), float(x[n, hd, i1])
                out[n, hd, i0] = a0 * c - a1 * s
                out[n, hd, i1] = a1 * c + a0 * s
    return out


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("sections", [None, (2, 1, 2)])
def test_reference_matches_elementwise_spec(interleaved, sections):
    torch.manual_seed(1)
    x = torch.randn(7, 2, 16, dtype=torch.float64)
    positions = torch.tensor([[0, 0, 0], [1, 2, 3], [5, 0, 1], [2.5, 7, 1], [9, 9, 9], [0, 4, 0], [3, 1, 2]],
                             dtype=torch.float64)
    cu = cu_seqlens_of([7])
    got = rope3d_reference(x, cu, positions=positions, theta=100.0, sections=sections, interleaved=interleaved,
                           compute_dtype=torch.float64)
    want = _naive_rope(x, positions, sections or default_sections(16), 100.0, interleaved)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # ... and so does the tests' independent oracle (its fp64 run), which the floors compare with.
    independent = rope3d_low_precision(x, cu, positions=positions, theta=100.0, sections=sections,
                                       interleaved=interleaved, compute_dtype=torch.float64)
    torch.testing.assert_close(independent, want, rtol=1e-12, atol=1e-12)
    if sections == (2, 1, 2):  # 5 of 8 pairs rotated; the other 3 must be untouched
        untouched = [5, 6, 7] if not interleaved else []
        for p in untouched:
            torch.testing.assert_close(got[..., p], x[..., p], rtol=0, atol=0)
            torch.testing.assert_close(got[..., p + 8], x[..., p + 8], rtol=0, atol=0)


# ----------------------------------------------------------------------------- exact rotation


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("interleaved", [False, True])
def test_norms_preserved_fp32(backend, interleaved):
    x, cu, grid = _inputs([40, 24], nheads=3)
    positions = torch.rand(64, 3) * 500
    for kwargs in ({"grid_thw": grid}, {"positions": positions}):
        y = rope3d(x, cu, interleaved=interleaved, backend=backend, **kwargs)
        rel = (y.double().norm(dim=-1) / x.double().norm(dim=-1) - 1).abs().max().item()
        assert rel < 1e-6, rel


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("interleaved", [False, True])
def test_scores_depend_only_on_relative_position(backend, interleaved):
    """<R(p) q, R(k) k> == <R(p + d) q, R(k + d) k> for any 3D shift d (fp32 angles, so
    the match is to fp32 accuracy of angles up to ~600 rad)."""
    torch.manual_seed(2)
    n = 32
    q = torch.randn(n, 1, 64)
    k = torch.randn(n, 1, 64)
    cu = cu_seqlens_of([n])
    pq = torch.randint(0, 40, (n, 3)).float()
    pk = torch.randint(0, 40, (n, 3)).float()
    shift = torch.tensor([[17.0, -5.0, 123.0]])

    def scores(p1, p2):
        rq = rope3d(q, cu, positions=p1, interleaved=interleaved, backend=backend)
        rk = rope3d(k, cu, positions=p2, interleaved=interleaved, backend=backend)
        return (rq.double() * rk.double()).sum(-1)

    base, shifted = scores(pq, pk), scores(pq + shift, pk + shift)
    scale = (q.norm(dim=-1) * k.norm(dim=-1)).double()
    assert ((base - shifted).abs() / scale).max().item() < 1e-4
    # ...and changing the relative offset does change them (the property is not vacuous).
    moved = scores(pq, pk + torch.tensor([[1.0, 0.0, 0.0]]))
    assert ((base - moved).abs() / scale).max().item() > 1e-2


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_inverse_undoes_forward(backend):
    x, cu, grid = _inputs([65, 63], nheads=2)
    for interleaved in (False, True):
        y = rope3d(x, cu, grid, interleaved=interleaved, backend=backend)
        back = rope3d(y, cu, grid, interleaved=interleaved, inverse=True, backend=backend)
        torch.testing.assert_close(back, x, rtol=1e-5, atol=1e-5)
        assert max_err(y, x) > 0.1  # it did rotate


# ----------------------------------------------------------------------------- backends vs fp64


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("interleaved", [False, True])
def test_varlen_edge_lengths_grid(backend, dtype, interleaved):
    x, cu, grid = _inputs(list(EDGE_LENGTHS), nheads=2, dtype=dtype)
    y = rope3d(x, cu, grid, interleaved=interleaved, backend=backend)
    assert_rope3d_at_floor(y, x, cu, grid, interleaved=interleaved)
    # Sequences are independent: each slice equals rope3d of that sequence alone.
    for b, sl in enumerate(sequence_slices(cu)):
        if sl.stop == sl.start:
            continue
        alone = rope3d(x[sl], cu_seqlens_of([sl.stop - sl.start]), grid[b : b + 1],
                       interleaved=interleaved, backend=backend)
        torch.testing.assert_close(y[sl], alone, rtol=0, atol=0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("inverse", [False, True])
def test_positions_input_and_custom_sections(backend, inverse):
    x, cu, _ = _inputs([50, 30], nheads=3, head_dim=32)
    positions = torch.rand(80, 3, generator=torch.Generator().manual_seed(3)) * 300
    for sections in (None, (4, 4, 4), (0, 8, 8), (16, 0, 0)):
        y = rope3d(x, cu, positions=positions, sections=sections, inverse=inverse, theta=500.0, backend=backend)
        assert_rope3d_at_floor(y, x, cu, positions=positions, sections=sections, inverse=inverse, theta=500.0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("head_dim", [8, 48, 96])
def test_head_dims_and_strided_input(backend, head_dim):
    x, cu, grid = _inputs([20, 44], nheads=4, head_dim=head_dim)
    # A view with non-trivial token and head strides (e.g. q taken out of a fused qkv tensor).
    big = torch.randn(64, 3, 4, head_dim)
    big[:, 1] = x
    view = big[:, 1]
    assert not view.is_contiguous()
    y = rope3d(view, cu, grid, backend=backend)
    assert_rope3d_at_floor(y, x, cu, grid)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_over_65536_tokens(backend):
    lengths = [40_000, 1, 0, 30_017]
    x, cu, grid = _inputs(lengths, nheads=1, head_dim=8)
    y = rope3d(x, cu, grid, backend=backend)
    assert_rope3d_at_floor(y, x, cu, grid)


# ----------------------------------------------------------------------------- autograd, op


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradient_is_inverse_rotation_and_matches_fp64(backend):
    x, cu, grid = _inputs([63, 1, 65], nheads=2)
    g = torch.randn_like(x)
    xr = x.clone().requires_grad_(True)
    (rope3d(xr, cu, grid, backend=backend) * g).sum().backward()
    torch.testing.assert_close(xr.grad, rope3d(g, cu, grid, inverse=True, backend=backend), rtol=0, atol=0)
    x64 = x.double().requires_grad_(True)
    (rope3d_reference(x64, cu, grid, compute_dtype=torch.float64) * g.double()).sum().backward()
    torch.testing.assert_close(xr.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck(backend):
    x, cu, grid = _inputs([5, 0, 7], nheads=2, head_dim=16)
    positions = torch.rand(12, 3) * 10
    op = torch.ops.sigvlp.rope3d.default
    samples = [
        (x.requires_grad_(True), cu, grid, None, 10000.0, [2, 3, 3], False, False, backend, False),
        (x.detach(), cu, None, positions, 100.0, [4, 2, 2], True, True, backend, True),
    ]
    for args in samples:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(compiler):
    x, cu, grid = _inputs([9, 7], nheads=2, head_dim=16)

    def f(x):
        return rope3d(x, cu, grid, theta=1000.0).square().sum()

    compiled = torch.compile(f, fullgraph=True, backend=compiler)
    xr = x.clone().requires_grad_(True)
    xe = x.clone().requires_grad_(True)
    torch.testing.assert_close(compiled(xr), f(xe))
    compiled(xr).backward()
    f(xe).backward()
    torch.testing.assert_close(xr.grad, xe.grad)


# ----------------------------------------------------------------------------- backend choice


def test_backend_selection(monkeypatch):
    x, cu, grid = _inputs([4], nheads=1, head_dim=8)
    assert ops.OPS["rope3d"].select(None, device=x.device, dtype=x.dtype).name == "torch"
    with pytest.raises(ValueError, match="backend"):
        rope3d(x, cu, grid, backend="fastest")
    if not HAS_CUDA:
        with pytest.raises(BackendError, match="cuda.*(CUDA tensors|no CUDA device|not built)"):
            rope3d(x, cu, grid, backend="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if not HAS_CUDA:
        with pytest.raises(BackendError, match="TRITON_INTERPRET"):
            rope3d(x, cu, grid, backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("SIGVLP_BACKEND", "triton")
    assert ops.OPS["rope3d"].select(None, device=x.device, dtype=x.dtype).name == "triton"
    monkeypatch.setenv("SIGVLP_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="SIGVLP_BACKEND"):
        rope3d(x, cu, grid)


# ----------------------------------------------------------------------------- bad input

_X, _CU, _GRID = _inputs([6, 4], nheads=2, head_dim=16)


@pytest.mark.parametrize(
    "kwargs, error, name",
    [
        (dict(x=_X.double()), TypeError, "x"),
        (dict(x=_X.to(torch.int32)), TypeError, "x"),
        (dict(x=_X[..., :15]), ValueError, "head_dim"),
        (dict(x=_X[0]), ValueError, "x"),
        (dict(cu_seqlens=_CU.long()), TypeError, "cu_seqlens"),
        (dict(cu_seqlens=torch.tensor([0, 11, 10], dtype=torch.int32)), ValueError, "non-decreasing"),
        (dict(cu_seqlens=torch.tensor([0, 6, 9], dtype=torch.int32)), ValueError, "cu_seqlens"),
        (dict(cu_seqlens=torch.tensor([1, 6, 10], dtype=torch.int32)), ValueError, "cu_seqlens"),
        (dict(cu_seqlens=torch.tensor([0], dtype=torch.int32)), ValueError, "cu_seqlens"),
        (dict(grid_thw=torch.tensor([[1, 2, 3], [1, 2, 3]], dtype=torch.int32)), ValueError, "grid_thw"),
        (dict(grid_thw=torch.tensor([[1, 2, 3]], dtype=torch.int32)), ValueError, "grid_thw"),
        (dict(grid_thw=_GRID.long()), TypeError, "grid_thw"),
        (dict(grid_thw=None), ValueError, "grid_thw, positions"),
        (dict(positions=torch.zeros(10, 3)), ValueError, "grid_thw, positions"),
        (dict(grid_thw=None, positions=torch.zeros(9, 3)), ValueError, "positions"),
        (dict(grid_thw=None, positions=torch.zeros(10, 3, dtype=torch.float64)), TypeError, "positions"),
        (dict(sections=(4, 4, 4)), ValueError, "sections"),
        (dict(sections=(4, 4)), TypeError, "sections"),
        (dict(sections=(4, -1, 2)), ValueError, "sections"),
        (dict(theta=0.5), ValueError, "theta"),
        (dict(interleaved=1), TypeError, "interleaved"),
    ],
)
def test_bad_input_is_named(kwargs, error, name):
    args = dict(x=_X, cu_seqlens=_CU, grid_thw=_GRID)
    args.update(kwargs)
    x, cu, grid = args.pop("x"), args.pop("cu_seqlens"), args.pop("grid_thw")
    with pytest.raises(error, match=name.replace("(", r"\(")):
        rope3d(x, cu, grid, **args)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_device_mismatch_is_named():
    x = _X.cuda()
    with pytest.raises(ValueError, match="cu_seqlens"):
        rope3d(x, _CU, _GRID.cuda())


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("interleaved", [False, True])
def test_gpu_backends(backend, dtype, interleaved):
    lengths = list(EDGE_LENGTHS) + [4096, 70_000]
    x, cu, grid = _inputs(lengths, nheads=16, head_dim=64, dtype=dtype, device="cuda")
    y = rope3d(x, cu, grid, interleaved=interleaved, backend=backend)
    assert_rope3d_at_floor(y, x, cu, grid, interleaved=interleaved)
    positions = torch.rand(x.shape[0], 3, device="cuda") * 1000
    y = rope3d(x, cu, positions=positions, interleaved=interleaved, inverse=True, backend=backend)
    assert_rope3d_at_floor(y, x, cu, positions=positions, interleaved=interleaved, inverse=True)
    # Unaligned layout: odd token stride forces the scalar path of the CUDA kernel.
    big = torch.randn(x.shape[0], 16 * 64 + 1, device="cuda", dtype=dtype)
    view = big[:, : 16 * 64].view(x.shape[0], 16, 64)
    y = rope3d(view, cu, grid, interleaved=interleaved, backend=backend)
    assert_rope3d_at_floor(y, view, cu, grid, interleaved=interleaved)


@pytest.mark.gpu
def test_gpu_auto_prefers_cuda_and_gradients():
    """auto runs a GPU kernel backend; its gradient is the inverse rotation of the fp64 oracle at
    bf16's precision floor (not the same backend's own inverse)."""
    x, cu, grid = _inputs([129, 63], nheads=4, head_dim=128, dtype=torch.bfloat16, device="cuda")
    assert ops.OPS["rope3d"].select(None, device=x.device, dtype=x.dtype).name in ("cuda", "triton")
    xr = x.clone().requires_grad_(True)
    g = torch.randn_like(x)
    (rope3d(xr, cu, grid) * g).sum().backward()
    assert_rope3d_at_floor(xr.grad, g, cu, grid, inverse=True)


# ----------------------------------------------------------------------------- host syncs, devices


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fast_path_reads_nothing_back(backend, monkeypatch):
    """With the GPU's validation policy (no value checks unless asked), forward and backward call
    no Tensor.item / tolist / cpu / __bool__ / __int__ / nonzero...; validate=True does (control)."""
    gpu_validation_policy(monkeypatch)
    x, cu, grid = _inputs([40, 1, 0, 23], nheads=2, head_dim=32)
    positions = torch.rand(64, 3) * 50
    g = torch.randn_like(x)
    xr = x.clone().requires_grad_(True)
    with forbid_host_reads():
        y = rope3d(xr, cu, grid, backend=backend)
        y.backward(g)
        yp = rope3d(x, cu, positions=positions, interleaved=True, backend=backend)
    torch.testing.assert_close(y, rope3d(x, cu, grid, backend=backend), rtol=0, atol=0)
    torch.testing.assert_close(xr.grad, rope3d(g, cu, grid, inverse=True, backend=backend), rtol=0, atol=0)
    torch.testing.assert_close(yp, rope3d(x, cu, positions=positions, interleaved=True, backend=backend))
    with forbid_host_reads(), pytest.raises(HostReadError):
        rope3d(x, cu, grid, backend=backend, validate=True)
    monkeypatch.setenv("SIGVLP_VALIDATE", "1")
    with pytest.raises(ValueError, match="cu_seqlens"):
        rope3d(x, torch.tensor([0, 40, 41, 41, 60], dtype=torch.int32), grid, backend=backend)


@pytest.mark.parametrize("backend", ["triton"])
def test_bad_index_values_unvalidated_stay_in_bounds(backend, monkeypatch):
    """Unchecked garbage cu_seqlens / grid_thw (any int32) give wrong angles, never a bad access (an
    out-of-bounds load crashes the interpreter) and what the op documents: every element of the
    (NaN-poisoned) output written, each rotary pair a rotation of x's pair (its norm kept), the
    pairs past the sections x's own, bit for bit."""
    gpu_validation_policy(monkeypatch)
    x, _, _ = _inputs([20, 12], nheads=2, head_dim=16)
    for cu, grid in (([0, 2**31 - 1, -5], [[1, 2, 3], [-7, 0, 2**31 - 1]]),
                     ([-(2**31), 7, 3], [[0, 0, 0], [2**30, 2**30, -1]])):
        y = rope3d(x, torch.tensor(cu, dtype=torch.int32), torch.tensor(grid, dtype=torch.int32),
                   sections=(2, 2, 2), backend=backend)  # 6 of the 8 pairs (i, i + 8) rotated
        assert not torch.isnan(y).any(), "unwritten (NaN-poisoned) elements"
        torch.testing.assert_close(torch.hypot(y[..., :8], y[..., 8:]), torch.hypot(x[..., :8], x[..., 8:]),
                                   rtol=1e-6, atol=1e-6)
        assert torch.equal(y[..., 6:8], x[..., 6:8]) and torch.equal(y[..., 14:], x[..., 14:])


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_no_host_sync(backend):
    x, cu, grid = _inputs([300, 1, 0, 1000], nheads=4, head_dim=64, dtype=torch.bfloat16, device="cuda")
    xr = x.clone().requires_grad_(True)
    rope3d(xr, cu, grid, backend=backend).sum().backward()  # warm-up: compilation
    xr.grad = None
    g = torch.randn_like(x)
    with no_cuda_sync():
        rope3d(xr, cu, grid, backend=backend).backward(g)
    assert_rope3d_at_floor(xr.grad, g, cu, grid, inverse=True)


@pytest.mark.gpu
@pytest.mark.skipif(not two_gpus(), reason="needs two CUDA devices")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_runs_on_the_tensors_device(backend):
    """Tensors on cuda:1 while cuda:0 is current: the kernel runs on cuda:1 (device guard)."""
    x, cu, grid = _inputs([300, 77], nheads=4, head_dim=64, dtype=torch.bfloat16, device="cuda:0")
    expected = rope3d(x, cu, grid, backend=backend).cpu()
    with torch.cuda.device(0):
        x1 = x.to("cuda:1").requires_grad_(True)
        y1 = rope3d(x1, cu.to("cuda:1"), grid.to("cuda:1"), backend=backend)
        y1.sum().backward()
        assert torch.cuda.current_device() == 0
    torch.cuda.synchronize(1)
    assert y1.device == torch.device("cuda:1") and torch.equal(y1.cpu(), expected)
    assert x1.grad.device == torch.device("cuda:1")
