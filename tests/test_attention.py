"""rope_attention_varlen: backends against an fp64 oracle (forward, lse, dq/dk/dv), varlen edge
cases, the cross form (cu_seqlens_k: other key lengths, MAP pooling, bottom-right causal, rows with
no key), op registration (opcheck, torch.compile), input validation, and GPU-only checks. GPU
hot-path properties checked on the CPU (host reads, TTIR, specialisation) are in
tests/test_attention_hotpath.py.

Tolerances come from the precision floor: a backend's max error vs the fp64 oracle may be at most
~2x that of the same math done by torch at the input's precision (rope3d_reference + SDPA).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import sigvlp.ops as ops
from sigvlp.ops import rope3d_reference, rope_attention_varlen
from sigvlp.ops.attention import LARGE_GPU_MATRIX, SUPPORTED_HEAD_DIMS
from sigvlp.ops.tolerances import assert_at_floor, max_err

from _varlen import EDGE_LENGTHS, cu_seqlens_of, grids_of, sequence_slices

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"


# ----------------------------------------------------------------------------- inputs and oracles


def _inputs(lengths, nheads=2, nheads_kv=1, head_dim=64, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)

    def rnd(h):
        return torch.randn(total, h, head_dim, generator=g).to(device=device, dtype=dtype)

    q, k, v = rnd(nheads), rnd(nheads_kv), rnd(nheads_kv)
    cu = cu_seqlens_of(lengths, device)
    grid = grids_of(lengths, device)
    # Positions: non-integer, per-axis distinct, as a model with continuous coordinates might give.
    positions = (torch.rand(total, 3, generator=g) * torch.tensor([40.0, 30.0, 30.0])).to(device)
    return q, k, v, cu, grid, positions


def _rope_kw(mode, grid, positions):
    return {"grid_thw": grid} if mode == "grid" else {"positions": positions} if mode == "positions" else {}


def _oracle(q, k, v, cu, *, cu_k=None, grid_thw=None, positions=None, grid_thw_k=None, positions_k=None,
            causal=False, softmax_scale=None, theta=10000.0, sections=None, interleaved=False, dtype=torch.float64,
            dout=None, dlse=None, low_precision=False):
    """Loop over cu_seqlens slices: rope3d_reference rotation, softmax(scale QK^T) V.

    cu_k given: the cross form (k/v packed by cu_k, rotated by grid_thw_k/positions_k), causal
    aligned bottom-right (key j visible to query i iff j <= i + Lk - Lq); rows seeing no key: out 0,
    lse -inf. dtype float64: the exact answer. low_precision=True: the same math by torch at q's dtype
    (rotation rounded to q's dtype, SDPA at q's dtype): the precision floor.
    Returns out, lse and, when dout is given, dq, dk, dv by autograd.
    """
    if cu_k is None:
        cu_k, grid_thw_k, positions_k = cu, grid_thw, positions
    lp = q.dtype if low_precision else dtype
    leaves = [x.detach().to(lp).requires_grad_(dout is not None) for x in (q, k, v)]
    qd, kd, vd = leaves
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    score_dtype = torch.float32 if low_precision else dtype
    if grid_thw is not None or positions is not None:
        kw = dict(theta=theta, sections=sections, interleaved=interleaved, compute_dtype=score_dtype)
        qd = rope3d_reference(qd, cu, grid_thw, positions=positions, **kw)
        kd = rope3d_reference(kd, cu_k, grid_thw_k, positions=positions_k, **kw)
    group = q.shape[1] // k.shape[1]
    outs, lses = [], []
    for sq, sk in zip(sequence_slices(cu.cpu()), sequence_slices(cu_k.cpu())):
        qb = qd[sq].transpose(0, 1)
        kb = kd[sk].transpose(0, 1).repeat_interleave(group, 0)
        vb = vd[sk].transpose(0, 1).repeat_interleave(group, 0)
        n_q, n_k = qb.shape[1], kb.shape[1]
        s = (qb @ kb.transpose(1, 2)).to(score_dtype) * scale
        hidden = torch.zeros(n_q, n_k, dtype=torch.bool, device=s.device)
        if causal:
            hidden = torch.ones(n_q, n_k, dtype=torch.bool, device=s.device).triu(1 + n_k - n_q)
        s = s.masked_fill(hidden, float("-inf"))
        seen = ~hidden.all(-1) if n_k else torch.zeros(n_q, dtype=torch.bool, device=s.device)
        lse = torch.logsumexp(s.masked_fill(~seen[:, None], 0.0), -1).masked_fill(~seen, float("-inf"))
        if low_precision and n_q == n_k:
            o = F.scaled_dot_product_attention(qb, kb, vb, is_causal=causal, scale=scale)
        elif low_precision and n_k and bool(seen.all()):
            o = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=~hidden, scale=scale)
        else:
            p = torch.exp(s - lse.masked_fill(~seen, 0.0)[..., None])
            o = p.to(lp) @ vb
        lses.append(lse)
        outs.append(o.transpose(0, 1))
    out = torch.cat(outs, 0) if outs else qd.new_zeros(q.shape)
    lse = torch.cat(lses, 1) if lses else qd.new_zeros(q.shape[1], 0, dtype=torch.float32)
    if dout is None:
        return out.detach(), lse.detach()
    loss = (out.to(dtype) * dout.to(dtype)).sum()
    if dlse is not None:
        loss = loss + (lse.masked_fill(torch.isinf(lse), 0.0).to(dtype) * dlse.to(dtype)).sum()
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads)]
    return out.detach(), lse.detach(), *grads


def _cross_inputs(lengths_k, nheads_kv, head_dim, dtype, device, seed):
    g = torch.Generator().manual_seed(seed + 17)
    total = sum(lengths_k)
    k, v = (torch.randn(total, nheads_kv, head_dim, generator=g).to(device=device, dtype=dtype) for _ in range(2))
    positions = (torch.rand(total, 3, generator=g) * torch.tensor([20.0, 50.0, 10.0])).to(device)
    return k, v, cu_seqlens_of(lengths_k, device), grids_of(lengths_k, device), positions


def _run_and_check(lengths, *, backend, nheads=2, nheads_kv=1, head_dim=64, dtype=torch.float32, mode="grid",
                   causal=False, interleaved=False, max_seqlen=None, use_lse_grad=False, device="cpu",
                   make_strided=False, seed=0, lengths_k=None, mode_k=None, max_seqlen_k=None):
    """Forward, lse and dq/dk/dv vs the fp64 oracle at ~2x the precision floor. lengths_k: the cross
    form (k/v packed by their own lengths, rotated by mode_k, default mode)."""
    q, k, v, cu, grid, positions = _inputs(lengths, nheads, nheads_kv, head_dim, dtype, device, seed)
    rope = _rope_kw(mode, grid, positions)
    cross = {}
    oracle_cross = {}
    if lengths_k is not None:
        k, v, cu_k, grid_k, positions_k = _cross_inputs(lengths_k, nheads_kv, head_dim, dtype, device, seed)
        rope_k = _rope_kw(mode if mode_k is None else mode_k, grid_k, positions_k)
        cross = dict(cu_seqlens_k=cu_k, max_seqlen_k=max(lengths_k) if max_seqlen_k is None else max_seqlen_k,
                     **{f"{name}_k": val for name, val in rope_k.items()})
        oracle_cross = dict(cu_k=cu_k, **{f"{name}_k": val for name, val in rope_k.items()})
    if make_strided:  # q, k, v as views into one packed (total, heads, 3, head_dim) projection
        assert lengths_k is None
        total = q.shape[0]
        packed = torch.empty(total, nheads, 3, head_dim, dtype=dtype, device=device)
        packed[:, :, 0] = q
        packed[:, :nheads_kv, 1] = k
        packed[:, :nheads_kv, 2] = v
        q, k, v = packed[:, :, 0], packed[:, :nheads_kv, 1], packed[:, :nheads_kv, 2]
        assert not q.is_contiguous() and q.stride(-1) == 1
    g = torch.Generator().manual_seed(seed + 1)
    dout = torch.randn(q.shape, generator=g).to(device=device, dtype=dtype)
    dlse = torch.randn(nheads, q.shape[0], generator=g).to(device) if use_lse_grad else None
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    max_seqlen = max(lengths) if max_seqlen is None else max_seqlen
    out, lse = rope_attention_varlen(*leaves, cu, max_seqlen, causal=causal, interleaved=interleaved,
                                     return_lse=True, backend=backend, **rope, **cross)
    assert out.shape == q.shape and out.dtype == dtype and lse.shape == (nheads, q.shape[0])
    assert lse.dtype == torch.float32
    loss = (out.float() * dout.float()).sum()
    if use_lse_grad:
        loss = loss + (lse.masked_fill(torch.isinf(lse), 0.0) * dlse).sum()
    loss.backward()
    kw = dict(causal=causal, interleaved=interleaved, dout=dout, dlse=dlse, **rope, **oracle_cross)
    exact = _oracle(q, k, v, cu, **kw)
    floor = _oracle(q, k, v, cu, low_precision=True, **kw)
    slack = {torch.float32: 2e-7, torch.float16: 2e-4, torch.bfloat16: 2e-3}[dtype]  # for near-exact cases
    for name, got, ex, fl in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *[x.grad for x in leaves]),
                                 exact, floor):
        finite = ex[torch.isfinite(ex)]
        scale = max(1.0, finite.abs().max().item() if finite.numel() else 0.0)
        assert_at_floor(got, ex, fl, name=name, slack=slack * scale)
    return out, lse


# ----------------------------------------------------------------------------- torch backend (reference)


@pytest.mark.parametrize("mode", ["grid", "positions", "none"])
@pytest.mark.parametrize("causal", [False, True])
def test_torch_backend_edge_lengths(mode, causal):
    _run_and_check(EDGE_LENGTHS, backend="torch", nheads=4, nheads_kv=2, mode=mode, causal=causal)


@pytest.mark.parametrize("nheads,nheads_kv,head_dim,interleaved", [
    (1, 1, 32, False), (16, 16, 64, True), (16, 4, 96, False), (16, 1, 128, True)])
def test_torch_backend_heads_and_dims(nheads, nheads_kv, head_dim, interleaved):
    _run_and_check([1, 33, 0, 70], backend="torch", nheads=nheads, nheads_kv=nheads_kv, head_dim=head_dim,
                   interleaved=interleaved, causal=True, use_lse_grad=True)


def test_torch_backend_over_65536_tokens_sampled_rows():
    lengths = [8000, 0, 1] + [1500] * 39 + [129, 2]  # 66,632 tokens: one long, many short
    total = sum(lengths)
    assert total > 65536
    q, k, v, cu, grid, _ = _inputs(lengths, nheads=1, nheads_kv=1, head_dim=32)
    out = rope_attention_varlen(q, k, v, cu, max(lengths) + 7, grid, causal=True, backend="torch")
    assert not torch.isnan(out).any()
    qr = rope3d_reference(q.double(), cu, grid, compute_dtype=torch.float64)
    kr = rope3d_reference(k.double(), cu, grid, compute_dtype=torch.float64)
    cu_l = cu.tolist()
    rows = torch.randint(0, total, (48,), generator=torch.Generator().manual_seed(3)).tolist() + [0, total - 1]
    for r in rows:
        b = max(i for i in range(len(lengths)) if cu_l[i] <= r and cu_l[i + 1] > r)
        s = cu_l[b]
        keys = slice(s, r + 1)  # causal
        scores = torch.einsum("hd,nd->hn", qr[r], kr[keys, 0]) * 32 ** -0.5
        expected = torch.softmax(scores, -1) @ v[keys, 0].double()
        assert max_err(out[r], expected) < 2e-5, f"row {r}"


# ----------------------------------------------------------------------------- cpu backend (grouped batches)
# Non-causal without a gradient on lse: torch's fused CPU attention per group; causal or with an lse
# gradient: the explicit matmul formulas. Both paths against the fp64 oracle.


@pytest.mark.parametrize("mode", ["grid", "positions", "none"])
@pytest.mark.parametrize("causal,use_lse_grad", [(False, False), (False, True), (True, False)])
def test_cpu_backend_edge_lengths(mode, causal, use_lse_grad):
    _run_and_check(EDGE_LENGTHS, backend="cpu", nheads=4, nheads_kv=2, head_dim=32, mode=mode, causal=causal,
                   use_lse_grad=use_lse_grad)


@pytest.mark.parametrize("nheads,nheads_kv,head_dim,interleaved,causal", [
    (1, 1, 32, False, False), (16, 16, 64, True, True), (16, 4, 96, False, False), (4, 1, 128, True, False)])
def test_cpu_backend_heads_and_dims(nheads, nheads_kv, head_dim, interleaved, causal):
    _run_and_check([1, 33, 0, 70, 16, 48], backend="cpu", nheads=nheads, nheads_kv=nheads_kv, head_dim=head_dim,
                   interleaved=interleaved, causal=causal)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpu_backend_half_dtypes(dtype):
    _run_and_check([65, 1, 0, 127, 32, 32], backend="cpu", nheads=2, nheads_kv=1, head_dim=32, dtype=dtype)


def test_cpu_backend_over_65536_tokens():
    """66,000+ packed tokens (many sequences of the demo's lengths, a long one, empty and single ones),
    forward, lse and gradients against the fp64 oracle (the fused path; causal rows use the explicit
    path, checked above at the edge lengths)."""
    lengths = [0, 1, 1024, 65, 129] + [16 * (2 + i % 31) for i in range(250)]
    assert sum(lengths) > 65536
    _run_and_check(lengths, backend="cpu", nheads=1, nheads_kv=1, head_dim=32)


def test_cpu_backend_row_blocks(monkeypatch):
    """Query rows in blocks (a scores buffer cap far below one group): the same answer."""
    from sigvlp.ops import attention_cpu

    monkeypatch.setattr(attention_cpu, "BLOCK_ELEMENTS", 300)
    _run_and_check([1, 63, 0, 130, 129], backend="cpu", nheads=2, nheads_kv=1, head_dim=32, causal=True,
                   use_lse_grad=True)


@pytest.mark.parametrize("mode,interleaved", [("grid", False), ("positions", True)])
def test_cpu_backend_rotation_tables_broadcast_over_heads(monkeypatch, mode, interleaved):
    """Rotary tables too large to store per head are broadcast over the heads: the same answer."""
    from sigvlp.ops import attention_cpu

    monkeypatch.setattr(attention_cpu, "TABLE_ELEMENTS", 0)
    attention_cpu._grid_tables.cache_clear()  # tables cached under the default size would be reused
    try:
        _run_and_check([1, 63, 0, 130, 129], backend="cpu", nheads=4, nheads_kv=2, head_dim=32, mode=mode,
                       interleaved=interleaved)
    finally:
        attention_cpu._grid_tables.cache_clear()


def test_cpu_backend_group_plan():
    """Every sequence with queries and keys in exactly one group; each group's padded score elements
    within the slack of its real ones plus the overhead; equal lengths pad nothing; short sequences
    (texts, MAP's one query per sequence) share a few groups, long ones of different lengths (the
    demo's chunks: padding costs as much as real work) get one each."""
    from sigvlp.ops.attention_cpu import GROUP_OVERHEAD, GROUP_SLACK, plan_groups

    g = torch.Generator().manual_seed(0)
    lens_q = torch.randint(0, 600, (300,), generator=g).tolist()
    lens_k = [n if i % 3 else int(m) for i, (n, m) in enumerate(zip(lens_q, torch.randint(0, 90, (300,))))]
    groups = plan_groups(tuple(lens_q), tuple(lens_k))
    members = sorted(b for grp in groups for b in grp)
    assert members == [b for b in range(300) if lens_q[b] and lens_k[b]]
    for grp in groups:
        padded = len(grp) * max(lens_q[b] for b in grp) * max(lens_k[b] for b in grp)
        assert padded <= (1 + GROUP_SLACK) * sum(lens_q[b] * lens_k[b] for b in grp) + GROUP_OVERHEAD
    assert plan_groups((256,) * 8, (256,) * 8) == [list(range(8))]
    texts = tuple(20 + i % 30 for i in range(40))
    assert len(plan_groups(texts, texts)) <= 4
    assert plan_groups((1,) * 40, texts) == [sorted(range(40), key=lambda b: texts[b], reverse=True)]
    chunks = tuple(range(512, 255, -32))
    assert plan_groups(chunks, chunks) == [[b] for b in range(len(chunks))]


def test_relative_position_property():
    """Scores depend only on relative (t, h, w) offsets: shifting every position changes nothing."""
    q, k, v, cu, _, positions = _inputs([40, 25], nheads=2, nheads_kv=2)
    a = rope_attention_varlen(q, k, v, cu, 40, positions=positions, backend="torch")
    b = rope_attention_varlen(q, k, v, cu, 40, positions=positions + torch.tensor([7.0, -3.0, 11.0]),
                              backend="torch")
    torch.testing.assert_close(a, b, atol=2e-5, rtol=0)
    plain = rope_attention_varlen(q, k, v, cu, 40, backend="torch")
    assert max_err(a, plain) > 1e-2  # the rotation does something


def test_auto_backend_on_cpu_is_cpu_and_op_is_registered():
    assert "rope_attention_varlen" in ops.OPS
    assert ops.OPS["rope_attention_varlen"].names == ("triton", "cuda", "cpu", "torch")
    q, k, v, cu, grid, _ = _inputs([5, 3])
    qr = q.clone().requires_grad_(True)
    with ops.dispatch_log() as log:
        out = rope_attention_varlen(qr, k, v, cu, 5, grid)
        out.sum().backward()
    assert log and set(log) == {("rope_attention_varlen", "cpu")}, log  # what ran, forward and backward
    assert torch.equal(out, rope_attention_varlen(q, k, v, cu, 5, grid, backend="cpu"))
    torch.testing.assert_close(out, rope_attention_varlen(q, k, v, cu, 5, grid, backend="torch"))
    assert torch.isnan(ops.backends.empty_output((2,), torch.float32, q.device)).all()  # conftest poisons outputs


def test_cpu_backend_refuses_other_devices():
    reason = ops.OPS["rope_attention_varlen"].backends["cpu"].refusal(torch.device("cuda"), torch.float32)
    assert reason is not None and "CPU tensors only" in reason


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_no_tokens(backend):
    q, k, v, cu, grid, _ = _inputs([0, 0])
    out, lse = rope_attention_varlen(q, k, v, cu, 0, grid, return_lse=True, backend=backend)
    assert out.shape == (0, 2, 64) and lse.shape == (2, 0)


# ----------------------------------------------------------------------------- Triton (interpreter on CPU)


@pytest.mark.parametrize("causal,mode,interleaved", [(False, "grid", False), (True, "positions", True)])
def test_triton_edge_lengths_fp32(causal, mode, interleaved):
    _run_and_check(EDGE_LENGTHS, backend="triton", nheads=2, nheads_kv=1, mode=mode, causal=causal,
                   interleaved=interleaved, device=DEV)


@pytest.mark.parametrize("lengths,nheads,nheads_kv,head_dim,dtype,causal,mode", [
    ([65, 31, 1], 1, 1, 128, torch.float16, True, "grid"),
    ([40, 0, 23], 2, 2, 96, torch.float32, True, "none"),
    ([17, 33], 16, 1, 32, torch.float32, False, "grid"),
    ([63, 2], 4, 2, 64, torch.float16, False, "positions"),
])
def test_triton_heads_dims_dtypes(lengths, nheads, nheads_kv, head_dim, dtype, causal, mode):
    _run_and_check(lengths, backend="triton", nheads=nheads, nheads_kv=nheads_kv, head_dim=head_dim, dtype=dtype,
                   causal=causal, mode=mode, device=DEV)


def test_triton_many_short_sequences_larger_max_seqlen_strided_lse_grad():
    """Many tiny sequences (empty ones too), max_seqlen beyond the longest, q/k/v views with
    arbitrary token/head strides, and a gradient flowing through lse."""
    lengths = [3, 0, 1, 12, 7, 0, 16, 5, 9, 2, 1, 14]
    _run_and_check(lengths, backend="triton", nheads=4, nheads_kv=2, head_dim=32, causal=True, mode="grid",
                   max_seqlen=50, make_strided=True, use_lse_grad=True, device=DEV)


def test_triton_grid_equals_positions_and_backends_agree():
    """Triton: grid_thw and the same positions rotate alike; and the Triton and torch backends agree
    (both at the fp32 floor of the fp64 oracle, the floor from the test's own low-precision run)."""
    q, k, v, cu, grid, _ = _inputs([13, 20], nheads=2, nheads_kv=2, head_dim=32)
    from sigvlp.ops.rope import grid_positions

    pos = grid_positions(cu, grid)
    a = rope_attention_varlen(q, k, v, cu, 20, grid, backend="triton")
    b = rope_attention_varlen(q, k, v, cu, 20, positions=pos, backend="triton")
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    c = rope_attention_varlen(q, k, v, cu, 20, grid, backend="torch")
    exact, _ = _oracle(q, k, v, cu, grid_thw=grid)
    floor, _ = _oracle(q, k, v, cu, grid_thw=grid, low_precision=True)
    for name, got in (("triton", a), ("torch", c)):
        assert_at_floor(got, exact, floor, name=name, slack=2e-7 * exact.abs().max().item())
    assert max_err(a, c) <= 2 * max_err(floor, exact) + 2e-7 * exact.abs().max().item()


@pytest.mark.parametrize("blocks", [
    {"fwd": (16, 16), "dkdv": (16, 16), "dq": (16, 16)},
    {"fwd": (64, 32), "dkdv": (64, 32), "dq": (64, 16)},
    {"fwd": (128, 64), "dkdv": (16, 128), "dq": (128, 32)},
], ids=["equal", "q-block-larger", "gpu-like"])
def test_triton_block_shapes(blocks, monkeypatch):
    """The masking/partition logic holds for any block shapes the autotuner may pick."""
    from sigvlp.kernels import attention as kern

    if HAS_CUDA:
        pytest.skip("block shapes are forced only under the interpreter; the GPU tests autotune")
    monkeypatch.setattr(kern, "INTERPRETER_BLOCKS", blocks)
    _run_and_check([1, 63, 0, 130], backend="triton", nheads=2, nheads_kv=1, head_dim=32, causal=True,
                   mode="grid")


def test_autotune_configs_keep_invariants():
    from sigvlp.kernels import attention as kern

    for tuned in (kern._fwd_tuned, kern._dq_tuned):  # causal: keys before the query block are unmasked
        assert all(c.kwargs["BLOCK_M"] % c.kwargs["BLOCK_N"] == 0 for c in tuned.configs)
    for tuned in (kern._fwd_tuned, kern._dkdv_tuned, kern._dq_tuned):
        assert not {"max_seqlen", "total_tokens", "batch"} & set(tuned.keys)  # lengths never recompile


def test_triton_fused_rotation_is_rope3d():
    """Rotating inside the kernel equals rope3d then unrotated attention (same Triton kernels),
    forward and gradients: the fused rotation is rope3d's, and dq/dk get its transpose."""
    q, k, v, cu, grid, _ = _inputs([21, 0, 40], nheads=2, nheads_kv=1, head_dim=64)
    dout = torch.randn_like(q)
    fused = [x.clone().requires_grad_() for x in (q, k, v)]
    out = rope_attention_varlen(*fused, cu, 40, grid, interleaved=True, causal=True, backend="triton")
    out.backward(dout)
    sep = [x.clone().requires_grad_() for x in (q, k, v)]
    qr = ops.rope3d(sep[0], cu, grid, interleaved=True, backend="triton")
    kr = ops.rope3d(sep[1], cu, grid, interleaved=True, backend="triton")
    # interleaved=True without a rotation changes nothing but the split of Q K^T (summation order).
    out2 = rope_attention_varlen(qr, kr, sep[2], cu, 40, causal=True, interleaved=True, backend="triton")
    out2.backward(dout)
    if HAS_CUDA:
        torch.testing.assert_close(out, out2, atol=1e-6, rtol=0)
    else:
        assert torch.equal(out, out2)  # identical fp32 arithmetic in the interpreter
    for a, b in zip(fused, sep):
        torch.testing.assert_close(a.grad, b.grad, atol=2e-6, rtol=0)


def test_triton_fused_rotation_is_rope3d_at_large_positions():
    """Same check with positions up to ~2000 and a theta whose log2 is not an fp32 number: the
    fused rotation must take log2(theta)'s low part too, or angles drift by ~1e-4 rad. (On a GPU,
    where float kernel arguments are fp32, this is what tells the two apart; the interpreter keeps
    Python floats at fp64.)"""
    q, k, v, cu, _, _ = _inputs([33, 30], nheads=2, nheads_kv=2, head_dim=32)
    positions = torch.rand(q.shape[0], 3, generator=torch.Generator().manual_seed(5)) * 2000
    kw = dict(positions=positions, theta=777.0)
    out = rope_attention_varlen(q, k, v, cu, 33, backend="triton", **kw)
    qr = ops.rope3d(q, cu, backend="triton", **kw)
    kr = ops.rope3d(k, cu, backend="triton", **kw)
    out2 = rope_attention_varlen(qr, kr, v, cu, 33, backend="triton")
    if HAS_CUDA:
        torch.testing.assert_close(out, out2, atol=1e-6, rtol=0)
    else:
        assert torch.equal(out, out2)


# ----------------------------------------------------------------------------- cross form (cu_seqlens_k)

# Query lengths against key lengths: empty on either side, one query vs many keys and many vs one
# (causal then leaves most rows with no visible key), lengths straddling the block sizes.
CROSS_Q = (0, 1, 63, 65, 129, 1, 65, 3)
CROSS_K = (65, 129, 0, 1, 63, 1, 65, 40)
CROSS_BACKENDS = ["torch", "cpu", "triton"]


_CROSS_CASES = [("grid", "grid", False), ("grid", "positions", True), ("positions", "positions", False),
                ("none", "none", True)]


@pytest.mark.parametrize("backend,mode,mode_k,causal", [(b, *c) for b in ("torch", "cpu") for c in _CROSS_CASES] + [
    ("triton", *c) for c in _CROSS_CASES[1:3] if "triton" in CROSS_BACKENDS])
def test_cross_edge_lengths(backend, mode, mode_k, causal):
    _run_and_check(CROSS_Q, lengths_k=CROSS_K, backend=backend, nheads=2, nheads_kv=1, head_dim=32, mode=mode,
                   mode_k=mode_k, causal=causal, use_lse_grad=True, device=DEV if backend == "triton" else "cpu")


@pytest.mark.parametrize("backend", CROSS_BACKENDS)
def test_cross_one_query_per_sequence_map_pooling(backend):
    """MAP pooling: one probe query per sequence against all its tokens, no rotation, GQA."""
    lengths_k = [1, 0, 129, 64, 7]
    out, lse = _run_and_check([1] * len(lengths_k), lengths_k=lengths_k, backend=backend, nheads=4, nheads_kv=1,
                              head_dim=64, mode="none", max_seqlen=1,
                              device=DEV if backend == "triton" else "cpu")
    assert torch.equal(out[1].cpu(), torch.zeros_like(out[1].cpu()))  # no keys: zero output, lse -inf
    assert torch.isinf(lse[:, 1]).all() and (lse[:, 1] < 0).all()


@pytest.mark.parametrize("backend", CROSS_BACKENDS)
def test_cross_with_self_packing_equals_self_form(backend):
    """cu_seqlens_k = cu_seqlens and the same positions on both sides is the self form, exactly."""
    device = DEV if backend == "triton" else "cpu"
    q, k, v, cu, grid, _ = _inputs([17, 0, 40], nheads=2, nheads_kv=1, head_dim=32, device=device)
    a = rope_attention_varlen(q, k, v, cu, 40, grid, causal=True, backend=backend)
    b = rope_attention_varlen(q, k, v, cu, 40, grid, cu_seqlens_k=cu.clone(), max_seqlen_k=40,
                              grid_thw_k=grid.clone(), causal=True, backend=backend)
    assert torch.equal(a, b)


def test_cross_causal_is_bottom_right_aligned():
    """With 2 queries and 5 keys, causal query 0 sees keys 0..3 and query 1 all 5 (flash-attn >= 2.1)."""
    q, _, _, cu, _, _ = _inputs([2], nheads=1, nheads_kv=1, head_dim=32)
    k, v, cu_k, _, _ = _cross_inputs([5], 1, 32, torch.float32, "cpu", 0)
    out = rope_attention_varlen(q, k, v, cu, 2, cu_seqlens_k=cu_k, max_seqlen_k=5, causal=True, backend="torch")
    for i, visible in ((0, 4), (1, 5)):
        p = torch.softmax((q[i, 0].double() @ k[:visible, 0].double().T) * 32 ** -0.5, -1)
        assert max_err(out[i, 0], p @ v[:visible, 0].double()) < 1e-6


def _cross_bad_cases():
    q, _, _, cu, grid, pos = _inputs([4, 6], nheads=4, nheads_kv=2, head_dim=32)
    k, v, cu_k, grid_k, pos_k = _cross_inputs([5, 3], 2, 32, torch.float32, "cpu", 0)
    base = (q, k, v, cu, 6)
    return {
        "cu_seqlens_k batch": (base, dict(cu_seqlens_k=cu_k[:2], max_seqlen_k=5), ValueError, "cu_seqlens_k"),
        "cu_seqlens_k dtype": (base, dict(cu_seqlens_k=cu_k.long(), max_seqlen_k=5), TypeError, "cu_seqlens_k"),
        "cu_seqlens_k end": (base, dict(cu_seqlens_k=torch.tensor([0, 5, 9], dtype=torch.int32), max_seqlen_k=5),
                             ValueError, "cu_seqlens_k"),
        "max_seqlen_k small": (base, dict(cu_seqlens_k=cu_k, max_seqlen_k=4), ValueError, "max_seqlen_k"),
        "max_seqlen_k float": (base, dict(cu_seqlens_k=cu_k, max_seqlen_k=5.0), TypeError, "max_seqlen_k"),
        "q rotated, k not": ((*base, grid), dict(cu_seqlens_k=cu_k, max_seqlen_k=5), ValueError,
                             "grid_thw_k/positions_k"),
        "k rotated, q not": (base, dict(cu_seqlens_k=cu_k, max_seqlen_k=5, positions_k=pos_k), ValueError,
                             "grid_thw/positions"),
        "grid_thw_k product": ((*base, grid), dict(cu_seqlens_k=cu_k, max_seqlen_k=5, grid_thw_k=grid), ValueError,
                               "grid_thw_k"),
        "grid_thw_k shape": ((*base, grid), dict(cu_seqlens_k=cu_k, max_seqlen_k=5, grid_thw_k=grid_k[:1]),
                             ValueError, "grid_thw_k"),
        "positions_k shape": (base, dict(cu_seqlens_k=cu_k, max_seqlen_k=5, positions=pos, positions_k=pos),
                              ValueError, "positions_k"),
        "grid_thw_k and positions_k": ((*base, grid), dict(cu_seqlens_k=cu_k, max_seqlen_k=5, grid_thw_k=grid_k,
                                                          positions_k=pos_k), ValueError, "positions_k"),
        "grid_thw_k without cu_seqlens_k": ((q, q[:, :2], q[:, :2], cu, 6, grid),
                                            dict(grid_thw_k=grid), ValueError, "grid_thw_k"),
        "max_seqlen_k without cu_seqlens_k": ((q, q[:, :2], q[:, :2], cu, 6), dict(max_seqlen_k=9), ValueError,
                                              "max_seqlen_k"),
        "self form, k rows": (base, {}, ValueError, "k"),
    }


@pytest.mark.parametrize("case", list(_cross_bad_cases()))
def test_cross_bad_input(case):
    args, kwargs, exc, name = _cross_bad_cases()[case]
    with pytest.raises(exc, match=name):
        rope_attention_varlen(*args, **kwargs)


@pytest.mark.parametrize("backend", CROSS_BACKENDS)
def test_cross_opcheck(backend):
    q, _, _, cu, grid, _ = _inputs([3, 0, 17], nheads=2, nheads_kv=1, head_dim=32)
    k, v, cu_k, grid_k, _ = _cross_inputs([9, 4, 1], 1, 32, torch.float32, "cpu", 0)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    args = (q, k, v, cu, cu_k, 17, 9, grid, None, grid_k, None, 10000.0, [4, 6, 6], False, 32 ** -0.5, True, True,
            True, backend)
    torch.library.opcheck(torch.ops.sigvlp.rope_attention_varlen.default, args)


# ----------------------------------------------------------------------------- op registration


def _op_args(backend, requires_grad=True):
    q, k, v, cu, grid, _ = _inputs([3, 0, 17], nheads=2, nheads_kv=1, head_dim=32)
    q, k, v = (x.requires_grad_(requires_grad) for x in (q, k, v))
    # q, k, v, cu_seqlens, cu_seqlens_k, max_seqlen, max_seqlen_k, grid_thw, positions, grid_thw_k,
    # positions_k, theta, sections, interleaved, softmax_scale, causal, cross, validate, backend
    return (q, k, v, cu, cu, 17, 17, grid, None, grid, None, 10000.0, [4, 6, 6], False, 32 ** -0.5, True, False,
            True, backend)


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_opcheck(backend):
    torch.library.opcheck(torch.ops.sigvlp.rope_attention_varlen.default, _op_args(backend))


def test_opcheck_backward_op():
    op_args = _op_args("torch", requires_grad=False)
    q, k, v = op_args[:3]
    out, lse = torch.ops.sigvlp.rope_attention_varlen(*op_args)
    args = (torch.randn_like(out), torch.randn_like(lse), q, k, v, out, lse, *op_args[3:16], False, "torch")
    torch.library.opcheck(torch.ops.sigvlp.rope_attention_varlen_backward.default, args)


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_torch_compile_fullgraph(backend):
    q, k, v, cu, grid, _ = _inputs([9, 0, 30], nheads=4, nheads_kv=2, head_dim=32)

    cu_probe = torch.arange(4, dtype=torch.int32)

    def f(q, k, v):
        out, lse = rope_attention_varlen(q, k, v, cu, 30, grid, causal=True, return_lse=True, backend=backend)
        # and the cross form, as MAP pooling: one query per sequence (sequence 1 has no keys)
        pooled = rope_attention_varlen(q[:3], k, v, cu_probe, 1, cu_seqlens_k=cu, max_seqlen_k=30, backend=backend)
        return out.sum() + (out * out).sum() + lse.sum() + (pooled * pooled).sum()

    compiled = torch.compile(f, fullgraph=True)
    eager_leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    comp_leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    torch.testing.assert_close(compiled(*comp_leaves), f(*eager_leaves))
    compiled(*comp_leaves).backward()
    f(*eager_leaves).backward()
    for a, b in zip(comp_leaves, eager_leaves):
        torch.testing.assert_close(a.grad, b.grad)


# ----------------------------------------------------------------------------- bad input


def _bad_cases():
    q, k, v, cu, grid, pos = _inputs([4, 6], nheads=4, nheads_kv=2, head_dim=32)
    half = torch.float16
    return {
        "q not a tensor": ((q.tolist(), k, v, cu, 6), {}, TypeError, "q"),
        "q int dtype": ((q.int(), k, v, cu, 6), {}, TypeError, "q"),
        "k dtype mismatch": ((q, k.to(half), v, cu, 6), {}, TypeError, "k"),
        "v dtype mismatch": ((q, k, v.to(half), cu, 6), {}, TypeError, "v"),
        "q 2-D": ((q[:, 0], k, v, cu, 6), {}, ValueError, "q"),
        "k tokens": ((q, k[:-1], v, cu, 6), {}, ValueError, "k"),
        "k head_dim": ((q, k[..., :16], v, cu, 6), {}, ValueError, "k"),
        "v shape": ((q, k, v[:, :1], cu, 6), {}, ValueError, "v"),
        "heads not divisible": ((q, k[:, :1].expand(-1, 3, -1), v[:, :1].expand(-1, 3, -1), cu, 6), {},
                                ValueError, "nheads_kv"),
        "head_dim 48": ((q[..., :24].repeat(1, 1, 2), k[..., :24].repeat(1, 1, 2), v[..., :24].repeat(1, 1, 2),
                         cu, 6), {}, ValueError, "head_dim"),
        "cu_seqlens int64": ((q, k, v, cu.long(), 6), {}, TypeError, "cu_seqlens"),
        "cu_seqlens short": ((q, k, v, cu[:1], 6), {}, ValueError, "cu_seqlens"),
        "cu_seqlens wrong end": ((q, k, v, torch.tensor([0, 4, 9], dtype=torch.int32), 6), {}, ValueError,
                                 "cu_seqlens"),
        "cu_seqlens decreasing": ((q, k, v, torch.tensor([0, 7, 6, 10], dtype=torch.int32), 7), {}, ValueError,
                                  "cu_seqlens"),
        "max_seqlen too small": ((q, k, v, cu, 5), {}, ValueError, "max_seqlen"),
        "max_seqlen float": ((q, k, v, cu, 6.0), {}, TypeError, "max_seqlen"),
        "grid shape": ((q, k, v, cu, 6, grid[:1]), {}, ValueError, "grid_thw"),
        "grid dtype": ((q, k, v, cu, 6, grid.long()), {}, TypeError, "grid_thw"),
        "grid product": ((q, k, v, cu, 6, torch.tensor([[1, 2, 2], [1, 2, 2]], dtype=torch.int32)), {},
                         ValueError, "grid_thw"),
        "grid and positions": ((q, k, v, cu, 6, grid), {"positions": pos}, ValueError, "positions"),
        "positions shape": ((q, k, v, cu, 6), {"positions": pos[:-1]}, ValueError, "positions"),
        "sections too many": ((q, k, v, cu, 6, grid), {"sections": [8, 8, 8]}, ValueError, "sections"),
        "theta": ((q, k, v, cu, 6, grid), {"theta": 0.5}, ValueError, "theta"),
        "softmax_scale": ((q, k, v, cu, 6), {"softmax_scale": -1.0}, ValueError, "softmax_scale"),
        "causal not bool": ((q, k, v, cu, 6), {"causal": 1}, TypeError, "causal"),
        "backend": ((q, k, v, cu, 6), {"backend": "flash"}, ValueError, "backend"),
    }


@pytest.mark.parametrize("case", list(_bad_cases()))
def test_bad_input(case):
    args, kwargs, exc, name = _bad_cases()[case]
    with pytest.raises(exc, match=name):
        rope_attention_varlen(*args, **kwargs)


@pytest.mark.gpu
def test_bad_input_device_mismatch():
    q, k, v, cu, grid, _ = _inputs([4, 6], device="cuda")
    with pytest.raises(ValueError, match="k"):
        rope_attention_varlen(q, k.cpu(), v, cu, 6, grid)
    with pytest.raises(ValueError, match="cu_seqlens"):
        rope_attention_varlen(q, k, v, cu.cpu(), 6, grid)
    with pytest.raises(ValueError, match="grid_thw"):
        rope_attention_varlen(q, k, v, cu, 6, grid.cpu())


def test_supported_head_dims():
    assert SUPPORTED_HEAD_DIMS == (32, 64, 96, 128)


# ----------------------------------------------------------------------------- GPU only


GPU_LENGTHS = [0, 1, 63, 65, 127, 129, 1000, 4096, 2]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,head_dim,causal", LARGE_GPU_MATRIX,
                         ids=[f"{str(d)[6:]}-{hd}-{'causal' if c else 'full'}" for d, hd, c in LARGE_GPU_MATRIX])
def test_gpu_triton_large(dtype, head_dim, causal):
    """Every head_dim in bf16 and fp16 at GPU lengths, causal and not (the sweep gpu_check.sh runs and
    precompiles: sigvlp.ops.attention.LARGE_GPU_MATRIX, each (head_dim, causal) once per dtype)."""
    _run_and_check(GPU_LENGTHS, backend="triton", nheads=16, nheads_kv=4, head_dim=head_dim, dtype=dtype,
                   causal=causal, mode="grid", device="cuda", max_seqlen=5000)


@pytest.mark.gpu
@pytest.mark.parametrize("mode,interleaved", [("positions", False), ("none", False), ("grid", True)])
def test_gpu_triton_modes_fp32_and_bf16(mode, interleaved):
    for dtype in (torch.float32, torch.bfloat16):
        _run_and_check([129, 700, 1, 0, 64], backend="triton", nheads=8, nheads_kv=8, dtype=dtype, mode=mode,
                       interleaved=interleaved, causal=True, device="cuda", use_lse_grad=True)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim,dtype", [(64, torch.bfloat16), (128, torch.float16), (32, torch.float32)])
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_triton_cross_form(head_dim, dtype, causal):
    """Cross form at GPU sizes: key lengths differ from query lengths (more, fewer, none), q by grid,
    k by positions, GQA; forward, lse and gradients vs the fp64 oracle."""
    _run_and_check([0, 1, 63, 65, 129, 700, 2000, 1], lengths_k=[65, 129, 0, 1, 63, 2048, 700, 4000],
                   backend="triton", nheads=8, nheads_kv=2, head_dim=head_dim, dtype=dtype, causal=causal,
                   mode="grid", mode_k="positions", device="cuda", use_lse_grad=True)


@pytest.mark.gpu
def test_gpu_triton_map_pooling_one_query_per_sequence():
    lengths_k = [1024 * 3, 256, 1, 0, 4096, 777]
    _run_and_check([1] * len(lengths_k), lengths_k=lengths_k, backend="triton", nheads=16, nheads_kv=16,
                   head_dim=64, dtype=torch.bfloat16, mode="none", max_seqlen=1, device="cuda")


def _gpu_compiled_variants():
    """Compiled variants of every kernel the op launches (Triton's per-device kernel caches)."""
    from sigvlp.kernels import attention as kern
    from sigvlp.kernels import rope

    total = 0
    for fn in (kern._fwd_kernel, kern._bwd_preprocess_kernel, kern._bwd_dkdv_kernel, kern._bwd_dq_kernel,
               rope.rotary_table_kernel):
        caches = getattr(fn, "device_caches", None)
        if caches is None:
            pytest.skip("this Triton version keeps its kernel cache elsewhere")
        total += sum(len(entry[0]) for entry in caches.values())
    return total


def _gpu_step(lengths, lengths_k=None):
    q, k, v, cu, grid, _ = _inputs(lengths, nheads=8, nheads_kv=2, dtype=torch.bfloat16, device="cuda")
    kw = {}
    if lengths_k is not None:
        k, v, cu_k, grid_k, _ = _cross_inputs(lengths_k, 2, 64, torch.bfloat16, "cuda", 0)
        kw = dict(cu_seqlens_k=cu_k, max_seqlen_k=max(lengths_k), grid_thw_k=grid_k)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    rope_attention_varlen(*leaves, cu, max(lengths), grid, causal=True, **kw).float().square().sum().backward()
    return [x.grad for x in leaves]


@pytest.mark.gpu
def test_gpu_backward_is_deterministic_and_lengths_do_not_recompile():
    for lengths_k in (None, [7, 3000, 16]):
        a = _gpu_step([300, 1000, 5], lengths_k)
        b = _gpu_step([300, 1000, 5], lengths_k)
        for x, y in zip(a, b):
            assert torch.equal(x, y), "backward must be deterministic (no atomics)"
    before = _gpu_compiled_variants()
    # token totals and max lengths that are, and are not, multiples of 16 (and equal to 1)
    for lengths, lengths_k in (([17, 2000, 3], [1, 1, 1]), ([4096], [64]), ([16, 48], [33, 15]),
                               ([1] * 50 + [333], None), ([1], [1])):
        _gpu_step(lengths)
        if lengths_k is not None:
            _gpu_step(lengths, lengths_k)
    assert _gpu_compiled_variants() == before, "a new sequence length compiled new kernel variants"


@pytest.mark.gpu
def test_gpu_over_2_pow_31_elements_forward_and_backward():
    """Offsets beyond int32: 1.1M tokens x 16 heads x 128 dims (> 2^31 elements in q, k, v, out and
    every gradient). Sampled sequences, including the last (all its elements past 2^31), vs the fp64
    oracle on that sequence alone (sequences are independent), at 2x the precision floor."""
    lengths = [1024] * 1075
    total, H, D = sum(lengths), 16, 128
    assert (total - 1024) * H * D > 2 ** 31
    g = torch.Generator(device="cuda").manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=g)

    q, k, v, dout = rnd(total, H, D), rnd(total, H, D), rnd(total, H, D), rnd(total, H, D)
    cu = cu_seqlens_of(lengths, "cuda")
    grid = grids_of(lengths, "cuda")
    leaves = [x.requires_grad_() for x in (q, k, v)]
    out = rope_attention_varlen(*leaves, cu, 1024, grid, causal=True)
    out.backward(dout)
    sub_cu = cu_seqlens_of([1024], "cuda")
    for b in (0, 700, len(lengths) - 1):
        sl = slice(b * 1024, (b + 1) * 1024)
        kw = dict(grid_thw=grid[b : b + 1], causal=True, dout=dout[sl])
        exact = _oracle(q[sl], k[sl], v[sl], sub_cu, **kw)
        floor = _oracle(q[sl], k[sl], v[sl], sub_cu, low_precision=True, **kw)
        got = (out[sl], None, q.grad[sl], k.grad[sl], v.grad[sl])
        for name, x, ex, fl in zip(("out", "lse", "dq", "dk", "dv"), got, exact, floor):
            if x is not None:  # slack: half a bf16 ulp of the largest exact value
                assert_at_floor(x, ex, fl, name=f"{name} of sequence {b}", slack=2 ** -9 * ex.abs().max().item())
    del leaves, out


@pytest.mark.gpu
def test_gpu_matches_varlen_attn_and_flash_attn_on_rotated_inputs():
    """Our fused kernel is at least as accurate (up to 2x and half a bf16 ulp) as the FA2 kernels of
    torch's varlen_attn / flash-attn on the same rotated inputs, both vs the fp64 oracle."""
    refs = {}
    try:
        from torch.nn.attention.varlen import varlen_attn
        refs["varlen_attn"] = varlen_attn
    except ImportError:
        pass
    try:
        from flash_attn import flash_attn_varlen_func
        refs["flash_attn"] = flash_attn_varlen_func
    except ImportError:
        pass
    if not refs:
        pytest.skip("neither torch.nn.attention.varlen nor flash_attn is installed")
    lengths = [1, 500, 2048, 77]
    q, k, v, cu, grid, _ = _inputs(lengths, nheads=16, nheads_kv=16, head_dim=128, dtype=torch.bfloat16,
                                   device="cuda")
    out = rope_attention_varlen(q, k, v, cu, 2048, grid, causal=True)
    qr, kr = ops.rope3d(q, cu, grid), ops.rope3d(k, cu, grid)
    exact, _ = _oracle(q, k, v, cu, grid_thw=grid, causal=True)
    slack = 2 ** -9 * exact.abs().max().item()
    for name, fn in refs.items():
        if name == "varlen_attn":
            try:
                ref = fn(qr, kr, v, cu, cu, 2048, 2048, window_size=(-1, 0))
            except TypeError:  # older signature
                ref = fn(qr, kr, v, cu, cu, 2048, 2048, is_causal=True)
        else:
            ref = fn(qr, kr, v, cu, cu, 2048, 2048, causal=True)
        assert max_err(out, exact) <= 2 * max_err(ref, exact) + slack, name


@pytest.mark.gpu
def test_gpu_second_device_forward_and_backward():
    """Tensors on cuda:1 while cuda:0 is current: every launch (tables, forward, backward) runs on
    the tensors' device and gives what the same call gives on cuda:0."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    results = []
    for device in ("cuda:0", "cuda:1"):
        q, k, v, cu, grid, _ = _inputs([100, 33], nheads=4, nheads_kv=2, dtype=torch.bfloat16, device=device)
        kq, kv, cu_k, _, pos_k = _cross_inputs([7, 90], 2, 64, torch.bfloat16, device, 0)
        leaves = [x.requires_grad_() for x in (q, k, v)]
        with torch.cuda.device(0):
            out = rope_attention_varlen(*leaves, cu, 100, grid, causal=True)
            pooled = rope_attention_varlen(q, kq, kv, cu, 100, cu_seqlens_k=cu_k, max_seqlen_k=90,
                                           positions=grid_positions_of(cu, grid), positions_k=pos_k)
            (out.float().sum() + pooled.float().sum()).backward()
        results.append([t.detach().cpu() for t in (out, pooled, *[x.grad for x in leaves])])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def grid_positions_of(cu, grid):
    from sigvlp.ops.rope import grid_positions

    return grid_positions(cu, grid, int(cu[-1]))
