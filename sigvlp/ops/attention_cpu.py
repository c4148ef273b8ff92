"""The "cpu" backend of rope_attention_varlen: torch's fused CPU attention per group of sequences.

The torch backend (the readable reference, `rope_attention_varlen_reference`) runs a Python loop
per sequence of small explicit matmuls, exp and logsumexp. This backend runs aten's flash attention
for CPU (`_scaled_dot_product_flash_attention_for_cpu` and its backward: blocked, no scores buffer)
once per group of sequences:

1. Plan (host, from the lengths; cached by them, so a step's layers and backward reuse one):
   sequences with queries and keys are sorted by (key length, query length), longest first, and cut
   greedily into groups; a group pads every member to its longest query and key length, and a
   sequence joins the current group while the group's padded score elements stay within
   GROUP_SLACK of its real ones plus GROUP_OVERHEAD / nheads elements (what one more call costs).
   Padding costs as much as real work in the fused kernel, so long sequences of different lengths
   (the demo's chunks of 32..512 tokens) get one group each, read as views of the packed tensors;
   short ones (texts, MAP's one query per sequence) and equal lengths share groups.
2. Per group: q, k, v rows as (n, nheads, P, head_dim) strided views (a one-sequence group) or
   gathered copies (padding reads a zero scratch row; padded keys get an additive -inf mask);
   outputs written back per group (a block copy, or the real rows by index_copy_).
   Causal groups (bottom-right aligned) and a gradient on lse take the explicit path: scores by
   batched matmuls in blocks of query rows (at most BLOCK_ELEMENTS scores), lse = logsumexp,
   P = exp(S - lse), O = P V; backward by the FlashAttention formulas from the saved lse:
   delta = rowsum(dO * O) - dlse, dS = P (dP - delta), dQ = scale dS K, dK = scale dS^T Q, dV = P^T dO.

RoPE: the packed q and k are turned once per call (x C + swap(x) S, the same fp32 roundings as
rope3d_reference) by cos/sin tables computed once per packing (cached by the host lengths and
grid), and dq, dk turned back. Compute is float32 (fp16/bf16 inputs are upcast).

The lengths are read on the host (cu_seqlens.tolist()): for CPU tensors that is a memory read, not
a device sync, and the backend refuses every other device (sigvlp.ops.backends.unavailable_reason).
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch

from sigvlp.ops.rope import grid_positions, rotary_angles

__all__ = ["forward", "backward", "plan_groups", "GROUP_SLACK", "GROUP_OVERHEAD", "BLOCK_ELEMENTS"]

#: a group may pad up to this fraction of its real score elements: 0, since torch's fused CPU
#: attention spends as long on a padded score element as on a real one (measured at the demo's
#: lengths 32..512: one group per sequence beats 5 groups padded within 25% by 1.35x)
GROUP_SLACK = 0.0
#: score elements (nheads x rows x keys) one more group costs in fixed overhead: about 130 us per
#: call (forward and backward, gathers included) against ~16 ns per element at head_dim 32 on one
#: core; the plan divides it by nheads (short texts and MAP's one-query rows merge below this)
GROUP_OVERHEAD = 8192
#: score elements (nheads x rows x keys) computed at once; bounds the scores buffer to 64 MiB fp32
BLOCK_ELEMENTS = 1 << 24
#: rotary tables are stored per head up to this many elements each (16 MiB fp32; 4 packings cached)
TABLE_ELEMENTS = 1 << 22


class Group(NamedTuple):
    """n sequences padded to pq query rows and pk keys. rows_q (n, pq), rows_k (n, pk): packed row of
    each padded position (padding: the scratch row, index total); key_bias (n, 1, pk) 0 / -inf for
    real / padded keys, None when no key is padded; offset (n, 1, 1) Lk - Lq per sequence (causal);
    span (q_start, q_end, k_start, k_end) for a group of one sequence (read and written as views,
    no gather), else None; real_q / real_k: (positions of the real rows in the flattened (n * pq) /
    (n * pk) padded layout, their packed rows), None for a span."""

    rows_q: torch.Tensor
    rows_k: torch.Tensor
    key_bias: Optional[torch.Tensor]
    offset: torch.Tensor
    span: Optional[tuple[int, int, int, int]]
    real_q: Optional[tuple[torch.Tensor, torch.Tensor]]
    real_k: Optional[tuple[torch.Tensor, torch.Tensor]]


class Plan(NamedTuple):
    """The groups, and idle_q / idle_k: the packed query / key rows of sequences in no group (their
    outputs are the fill values: out 0, lse -inf, zero gradients)."""

    groups: tuple[Group, ...]
    idle_q: torch.Tensor
    idle_k: torch.Tensor


def plan_groups(lens_q: tuple[int, ...], lens_k: tuple[int, ...], slack: float = GROUP_SLACK,
                overhead: int = GROUP_OVERHEAD) -> list[list[int]]:
    """Sequence indices per group, longest first; see the module docstring for the rule. Sequences
    without queries or without keys are in no group (their rows stay out 0, lse -inf). lens_q, lens_k: per sequence query and key counts (host ints)."""
    order = sorted((b for b in range(len(lens_q)) if lens_q[b] > 0 and lens_k[b] > 0), key=lambda b: (lens_k[b], lens_q[b]),
                   reverse=True)
    groups: list[list[int]] = []
    pq = pk = real = 0
    for b in order:
        lq, lk = lens_q[b], lens_k[b]
        if groups:
            n = len(groups[-1]) + 1
            new_pq, new_pk, new_real = max(pq, lq), max(pk, lk), real + lq * lk
            if n * new_pq * new_pk <= (1 + slack) * new_real + overhead:
                groups[-1].append(b)
                pq, pk, real = new_pq, new_pk, new_real
                continue
        groups.append([b])
        pq, pk, real = lq, lk, lq * lk
    return groups


def _rows(starts: list[int], lens: list[int], pad: int, scratch: int) -> torch.Tensor:
    pos = torch.arange(pad)
    start = torch.tensor(starts)[:, None]
    length = torch.tensor(lens)[:, None]
    return torch.where(pos < length, start + pos, scratch)


def _real(rows: torch.Tensor, scratch: int) -> tuple[torch.Tensor, torch.Tensor]:
    flat = rows.reshape(-1)
    where = (flat != scratch).nonzero().squeeze(1)
    return where, flat[where]


def _idle(groups: list[Group], side: str, total: int) -> torch.Tensor:
    used = torch.zeros(total + 1, dtype=torch.bool)
    for g in groups:
        used[g.rows_q if side == "q" else g.rows_k] = True
    return (~used[:-1]).nonzero().squeeze(1)


@functools.lru_cache(maxsize=16)
def _plan(cu_q: tuple[int, ...], cu_k: tuple[int, ...], heads: int) -> Plan:
    lens_q = tuple(b - a for a, b in zip(cu_q[:-1], cu_q[1:]))
    lens_k = tuple(b - a for a, b in zip(cu_k[:-1], cu_k[1:]))
    out = []
    for members in plan_groups(lens_q, lens_k, GROUP_SLACK, GROUP_OVERHEAD // heads):
        lq = [lens_q[b] for b in members]
        lk = [lens_k[b] for b in members]
        pq, pk = max(lq), max(lk)
        rows_q = _rows([cu_q[b] for b in members], lq, pq, cu_q[-1])
        rows_k = _rows([cu_k[b] for b in members], lk, pk, cu_k[-1])
        key_bias = None
        if min(lk) < pk:
            key_bias = torch.zeros(len(members), 1, pk).masked_fill_(rows_k[:, None, :] == cu_k[-1], float("-inf"))
        offset = (torch.tensor(lk) - torch.tensor(lq))[:, None, None]
        if len(members) == 1:
            b = members[0]
            out.append(Group(rows_q, rows_k, key_bias, offset, (cu_q[b], cu_q[b + 1], cu_k[b], cu_k[b + 1]), None, None))
        else:
            out.append(Group(rows_q, rows_k, key_bias, offset, None, _real(rows_q, cu_q[-1]), _real(rows_k, cu_k[-1])))
    return Plan(tuple(out), _idle(out, "q", cu_q[-1]), _idle(out, "k", cu_k[-1]))


def _host(t: torch.Tensor) -> tuple:
    return tuple(t.reshape(-1).tolist())  # CPU tensors only: a memory read, no sync


# ----------------------------------------------------------------------------- rotation


def _tables(positions: torch.Tensor, heads: int, head_dim: int, sections: tuple, theta: float,
            interleaved: bool):
    """(C, S) (tokens, heads or 1, head_dim) fp32, contiguous: the rotation is x C + swap(x) S, swap
    exchanging the two members of each pair, C = (cos, cos) and S = (-sin, sin) per pair;
    rope3d_reference's angles and cos/sin, so the same numbers (a cos + b (-sin) rounds as
    a cos - b sin). Stored per head up to TABLE_ELEMENTS (the products then run as one flat loop,
    about 2x faster), above it broadcast over heads (bounded memory)."""
    angles = rotary_angles(positions, sections, head_dim, theta, torch.float32)[:, None, :]
    cos, sin = torch.cos(angles), torch.sin(angles)
    pair = (lambda lo, hi: torch.stack([lo, hi], -1).flatten(-2)) if interleaved else (
        lambda lo, hi: torch.cat([lo, hi], -1))
    tokens = positions.shape[0]
    shape = (tokens, heads if tokens * heads * head_dim <= TABLE_ELEMENTS else 1, head_dim)
    return pair(cos, cos).expand(shape).contiguous(), pair(-sin, sin).expand(shape).contiguous()


@functools.lru_cache(maxsize=4)
def _grid_tables(cu: tuple, grid: tuple, heads: int, head_dim: int, sections: tuple, theta: float,
                 interleaved: bool):
    """_tables of a grid_thw packing, cached by the host lengths and grid: a step's layers, forward and
    backward, compute them once."""
    positions = grid_positions(torch.tensor(cu), torch.tensor(grid, dtype=torch.int32).view(-1, 3), cu[-1])
    return _tables(positions, heads, head_dim, sections, theta, interleaved)


def _side_tables(side: str, seq: dict, heads: int, head_dim: int, sections: tuple, theta: float, interleaved: bool):
    cu, grid, pos = seq[f"cu_{side}"], seq[f"grid_{side}"], seq[f"pos_{side}"]
    if grid is not None:
        return _grid_tables(_host(cu), _host(grid), heads, head_dim, sections, theta, interleaved)
    if pos is not None:
        return _tables(pos, heads, head_dim, sections, theta, interleaved)
    return None


def _rotation(seq: dict, heads: int, heads_k: int, head_dim: int, sections: tuple, theta: float, interleaved: bool):
    """(q's tables, k's tables), each (C, S) or None (no rotation); self-attention shares them."""
    tq = _side_tables("q", seq, heads, head_dim, sections, theta, interleaved)
    if heads_k == heads and all(seq[f"{n}_k"] is seq[f"{n}_q"] for n in ("cu", "grid", "pos")):
        return tq, tq
    return tq, _side_tables("k", seq, heads_k, head_dim, sections, theta, interleaved)


def _swap(x: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """x with the two members of every rotary pair exchanged (a copy, fp32)."""
    if interleaved:
        return x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2).float()
    half = x.shape[-1] // 2
    return torch.cat([x[..., half:], x[..., :half]], -1).float()


def _turn(dst: torch.Tensor, x: torch.Tensor, tables, interleaved: bool, inverse: bool) -> torch.Tensor:
    """dst (fp32) = x turned by the tables' angles (negative when inverse): x C + swap(x) S, or
    x C - swap(x) S, which rounds as rope3d_reference's fp32 a cos - b sin, b cos + a sin."""
    if tables is None:
        return dst.copy_(x)
    # x copied into dst first: the products then run on contiguous fp32 rows (about 2x faster than
    # reading the strided q/k views of the qkv projection twice; the same products, the same roundings)
    c, s = tables
    dst.copy_(x)
    swapped = _swap(dst, interleaved).mul_(s)
    dst.mul_(c)
    return dst.sub_(swapped) if inverse else dst.add_(swapped)


def _padded(x: torch.Tensor, group: int = 1, tables=None, interleaved: bool = False) -> torch.Tensor:
    """(total, h[, d]) -> (total + 1, h * group[, d]) float32, rotated by `tables` when given, with a
    zero scratch row at index total."""
    buf = torch.empty((x.shape[0] + 1, *x.shape[1:]), dtype=torch.float32)
    buf[-1].zero_()
    _turn(buf[:-1], x, tables, interleaved, False)
    return buf.repeat_interleave(group, dim=1) if group > 1 else buf


def _unturn(dst: torch.Tensor, x: torch.Tensor, tables, interleaved: bool) -> None:
    """dst (any float dtype) = x (fp32) turned back (the gradient of the rotation)."""
    if dst.dtype == torch.float32:
        _turn(dst, x, tables, interleaved, True)
    else:
        dst.copy_(_turn(torch.empty_like(x), x, tables, interleaved, True))


# ----------------------------------------------------------------------------- groups


def _gather(x: torch.Tensor, g: Group, side: str) -> torch.Tensor:
    """The group's query (side "q") or key ("k") rows of a padded (total + 1, h[, d]) tensor as
    (n, h, P[, d]): a strided view of a copy, or of x itself for a one-sequence group (torch's CPU
    attention reads strides, and writes its outputs in this (n, P, h, d) layout)."""
    if g.span is not None:
        start, end = g.span[:2] if side == "q" else g.span[2:]
        return x[start:end].unsqueeze(0).transpose(1, 2)
    rows = g.rows_q if side == "q" else g.rows_k
    return x.index_select(0, rows.reshape(-1)).view(*rows.shape, *x.shape[1:]).transpose(1, 2)


def _flat(x: torch.Tensor) -> torch.Tensor:
    """(n, h, P[, d]) -> (n * P, h[, d]) (free for the (n, P, h, d) layout)."""
    x = x.transpose(1, 2)
    return x.reshape(-1, *x.shape[2:])


def _assemble(parts: list, plan: Plan, side: str, fill: float, dst: torch.Tensor) -> torch.Tensor:
    """dst (total, h[, d], any float dtype, any strides) from the groups' outputs `parts` (each the
    flattened (n * P, h[, d]) padded rows of its group): a span's rows copied as one block, a padded
    group's real rows by one gather and one index_copy_; rows of no group set to `fill`."""
    for part, g in zip(parts, plan.groups):
        if g.span is not None:
            start, end = g.span[:2] if side == "q" else g.span[2:]
            dst[start:end].copy_(part)
        else:
            where, rows = g.real_q if side == "q" else g.real_k
            dst.index_copy_(0, rows, part.index_select(0, where).to(dst.dtype))
    idle = plan.idle_q if side == "q" else plan.idle_k
    if idle.numel():
        dst.index_fill_(0, idle, fill)
    return dst


def _masked_scores(qb, kb, g: Group, scale: float, causal: bool, r0: int) -> torch.Tensor:
    """Scaled scores (n, h, rows, pk) of query rows r0.. of the group, padded / hidden keys at -inf."""
    s = torch.matmul(qb, kb.transpose(-1, -2)).mul_(scale)
    if g.key_bias is not None:
        s.add_(g.key_bias[:, None])
    if causal:
        i = torch.arange(r0, r0 + qb.shape[2])[None, None, :, None] + g.offset[:, None]
        j = torch.arange(kb.shape[2])
        s.masked_fill_(j > i, float("-inf"))
    return s


def _finite(lse: torch.Tensor) -> torch.Tensor:
    return lse.masked_fill(lse == float("-inf"), 0.0)


def _block_rows(g: Group, heads: int) -> int:
    n, pq = g.rows_q.shape
    return max(1, min(pq, BLOCK_ELEMENTS // max(1, heads * n * g.rows_k.shape[1])))


def _explicit_forward(qb, kb, vb, g: Group, scale: float, causal: bool):
    """(out (n, h, pq, d), lse (n, h, pq)) by matmul, logsumexp, exp, matmul over blocks of query rows."""
    step = _block_rows(g, qb.shape[1])
    outs, lses = [], []
    for r0 in range(0, qb.shape[2], step):
        s = _masked_scores(qb[:, :, r0:r0 + step], kb, g, scale, causal, r0)
        lse = torch.logsumexp(s, dim=-1)
        outs.append(torch.matmul(s.sub_(_finite(lse)[..., None]).exp_(), vb))
        lses.append(lse)
    return torch.cat(outs, 2), torch.cat(lses, 2)


def _explicit_backward(dob, qb, kb, vb, lse_b, delta_b, g: Group, scale: float, causal: bool):
    """(dq, dk, dv) of one group (each like its input) by the FlashAttention formulas, in row blocks."""
    step = _block_rows(g, qb.shape[1])
    dqs, dk, dv = [], torch.zeros_like(kb), torch.zeros_like(vb)
    for r0 in range(0, qb.shape[2], step):
        rows = slice(r0, r0 + step)
        p = _masked_scores(qb[:, :, rows], kb, g, scale, causal, r0).sub_(lse_b[:, :, rows, None]).exp_()
        do = dob[:, :, rows]
        dv += torch.matmul(p.transpose(-1, -2), do)
        ds = torch.matmul(do, vb.transpose(-1, -2)).sub_(delta_b[:, :, rows, None]).mul_(p)
        dqs.append(torch.matmul(ds, kb).mul_(scale))
        dk += torch.matmul(ds.transpose(-1, -2), qb[:, :, rows]).mul_(scale)
    return torch.cat(dqs, 2), dk, dv


def _mask(g: Group):
    return None if g.key_bias is None else g.key_bias[:, None]


def _inputs(q, k, v, seq, theta, sections, interleaved):
    group = q.shape[1] // k.shape[1]
    tq, tk = _rotation(seq, q.shape[1], k.shape[1], q.shape[-1], sections, theta, interleaved)
    return _padded(q, 1, tq, interleaved), _padded(k, group, tk, interleaved), _padded(v, group), (tq, tk)


def forward(q, k, v, out, lse, seq, theta, sections, interleaved, scale, causal):
    """Writes out (q's shape and dtype) and lse (nheads, total_q) fp32; arguments already validated.
    Non-causal groups run torch's fused CPU attention kernel (aten's flash attention for CPU, with
    the padded keys as an additive -inf mask); causal groups the explicit matmul path."""
    heads, head_dim = q.shape[1:]
    plan = _plan(_host(seq["cu_q"]), _host(seq["cu_k"]), q.shape[1])
    qe, ke, ve, _ = _inputs(q, k, v, seq, theta, sections, interleaved)
    outs, lses = [], []
    for g in plan.groups:
        qb, kb, vb = _gather(qe, g, "q"), _gather(ke, g, "k"), _gather(ve, g, "k")
        if causal:
            o, l = _explicit_forward(qb, kb, vb, g, scale, causal)
        else:
            o, l = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qb, kb, vb, 0.0, False,
                                                                              attn_mask=_mask(g), scale=scale)
        outs.append(_flat(o))
        lses.append(_flat(l))
    _assemble(outs, plan, "q", 0.0, out)
    _assemble(lses, plan, "q", float("-inf"), lse.transpose(0, 1))


def _group_grads(g, qe, ke, ve, doe, oe, le, de, scale, causal):
    """(dq, dk, dv) of one group, (n, h, P, d) each: torch's fused CPU attention backward when de
    (the per-row delta) is None, else the explicit formulas."""
    qb, kb, vb, dob, lb = (_gather(x, g, side) for x, side in ((qe, "q"), (ke, "k"), (ve, "k"), (doe, "q"),
                                                             (le, "q")))
    if de is not None:
        return _explicit_backward(dob, qb, kb, vb, lb, _gather(de, g, "q"), g, scale, causal)
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dob, qb, kb, vb, _gather(oe, g, "q"), lb, 0.0, False, attn_mask=_mask(g), scale=scale)


def backward(dout, dlse, q, k, v, out, lse, dq, dk, dv, seq, theta, sections, interleaved, scale, causal):
    """Writes dq, dk, dv (the inputs' shapes and dtypes) from dout, dlse (or None) and the saved lse.
    Without causal masking and without a gradient on lse: torch's fused CPU attention backward;
    otherwise the explicit formulas with delta = rowsum(dO * O) - dlse."""
    total_k, heads_kv, head_dim = k.shape
    heads = q.shape[1]
    plan = _plan(_host(seq["cu_q"]), _host(seq["cu_k"]), q.shape[1])
    qe, ke, ve, (tq, tk) = _inputs(q, k, v, seq, theta, sections, interleaved)
    doe = _padded(dout)
    # per query row and head: lse (-inf as 0) and delta, with 0 in the scratch row (its dO is 0: no gradient)
    le = _padded(_finite(lse).transpose(0, 1))
    oe = de = None
    if causal or dlse is not None:
        delta = (dout.float() * out.float()).sum(-1)
        de = _padded(delta if dlse is None else delta - dlse.float().transpose(0, 1))
    else:
        oe = _padded(out)
    grads = [_group_grads(g, qe, ke, ve, doe, oe, le, de, scale, causal) for g in plan.groups]
    gq, gk, gv = ([_flat(x[i]) for x in grads] for i in range(3))
    group = heads // heads_kv
    _unturn(dq, _assemble(gq, plan, "q", 0.0, torch.empty(dq.shape)), tq, interleaved)
    dk_h = _assemble(gk, plan, "k", 0.0, torch.empty(total_k, heads, head_dim))
    _unturn(dk, dk_h.view(total_k, heads_kv, group, head_dim).sum(2) if group > 1 else dk_h, tk, interleaved)
    if group > 1:
        dv_h = _assemble(gv, plan, "k", 0.0, torch.empty(total_k, heads, head_dim))
        dv.copy_(dv_h.view(total_k, heads_kv, group, head_dim).sum(2))
    else:
        _assemble(gv, plan, "k", 0.0, dv)
