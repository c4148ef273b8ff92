"""The "cpu" backend of rope_attention_varlen: sequences grouped by length into a few padded batches.

The torch backend (the readable reference, `rope_attention_varlen_reference`) runs a Python loop
per sequence: on the CPU, where a step packs 10-200 short sequences, that loop of small matmuls is
most of the attention's time. This backend computes the same thing with a handful of batched
matmuls:

1. Plan (host, from the lengths): sequences with queries are sorted by (key length, query length),
   longest first, and cut greedily into groups; a group pads every member to its longest query and
   key length, and a sequence joins the current group while the group's padded score elements stay
   within GROUP_SLACK of its real ones (plus GROUP_OVERHEAD elements, about what one more batched
   call costs). Equal lengths (the common case) pad nothing; a step of 30-150 sequences makes 2-10
   groups. Plans are cached by the lengths (a step's layers and backward reuse one).
2. Per group: q, k, v rows gathered into (nheads, n, Pq | Pk, head_dim) (padding reads a zero row),
   scores by one batched matmul, padded keys (and causal masking, bottom-right aligned) set to -inf,
   lse = logsumexp, P = exp(S - lse), O = P V; rows scattered back (padding writes a scratch row).
   Query rows are processed in blocks so that one block's scores stay under BLOCK_ELEMENTS.
3. Backward by the FlashAttention formulas from the saved lse (as the reference):
   delta = rowsum(dO * O) - dlse, dS = P (dP - delta), dQ = scale dS K, dK = scale dS^T Q, dV = P^T dO.

RoPE is applied to the whole packed q and k first (rope3d's vectorised torch path) and inverted on
dq and dk, exactly as the reference does. Compute is float32 (fp16/bf16 inputs are upcast).

The lengths are read on the host (cu_seqlens.tolist()): for CPU tensors that is a memory read, not
a device sync, and the backend refuses every other device (sigvlp.ops.backends.unavailable_reason).
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch

from sigvlp.ops.rope import rope3d_reference

__all__ = ["forward", "backward", "plan_groups", "GROUP_SLACK", "GROUP_OVERHEAD", "BLOCK_ELEMENTS"]

#: a group may pad up to this fraction of its real score elements (0.25: at most 25% wasted work)
GROUP_SLACK = 0.25
#: score elements one more group costs in fixed overhead (about 20 torch calls of ~5 us against
#: ~6 ns per fp32 score element at head_dim 32 on one core): merging is free below this
GROUP_OVERHEAD = 16384
#: score elements (nheads x rows x keys) computed at once; bounds the scores buffer to 64 MiB fp32
BLOCK_ELEMENTS = 1 << 24


class Group(NamedTuple):
    """n sequences padded to pq query rows and pk keys. rows_q (n, pq), rows_k (n, pk): packed row of
    each padded position (padding: the scratch row, index total); key_bias (n, 1, pk) 0 / -inf for
    real / padded keys, None when no key is padded; offset (n, 1, 1) Lk - Lq per sequence (causal)."""

    rows_q: torch.Tensor
    rows_k: torch.Tensor
    key_bias: Optional[torch.Tensor]
    offset: torch.Tensor


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


@functools.lru_cache(maxsize=16)
def _plan(cu_q: tuple[int, ...], cu_k: tuple[int, ...]) -> tuple[Group, ...]:
    lens_q = tuple(b - a for a, b in zip(cu_q[:-1], cu_q[1:]))
    lens_k = tuple(b - a for a, b in zip(cu_k[:-1], cu_k[1:]))
    out = []
    for members in plan_groups(lens_q, lens_k):
        lq = [lens_q[b] for b in members]
        lk = [lens_k[b] for b in members]
        pq, pk = max(lq), max(lk)
        rows_q = _rows([cu_q[b] for b in members], lq, pq, cu_q[-1])
        rows_k = _rows([cu_k[b] for b in members], lk, pk, cu_k[-1])
        key_bias = None
        if min(lk) < pk:
            key_bias = torch.zeros(len(members), 1, pk).masked_fill_(rows_k[:, None, :] == cu_k[-1], float("-inf"))
        offset = (torch.tensor(lk) - torch.tensor(lq))[:, None, None]
        out.append(Group(rows_q, rows_k, key_bias, offset))
    return tuple(out)


def _groups(seq: dict) -> tuple[Group, ...]:
    cu_q = tuple(seq["cu_q"].tolist())  # CPU tensors only: a memory read, no sync
    cu_k = tuple(seq["cu_k"].tolist())
    return _plan(cu_q, cu_k)


def _padded(x: torch.Tensor, group: int = 1) -> torch.Tensor:
    """(total, h, d) -> (total + 1, h * group, d) float32 with a zero scratch row at index total."""
    x = x.float()
    if group > 1:
        x = x.repeat_interleave(group, dim=1)
    return torch.cat([x, x.new_zeros(1, *x.shape[1:])])


def _rotated(x, cu, grid, pos, theta, sections, interleaved, inverse):
    x = x.float()
    if grid is None and pos is None:
        return x
    return rope3d_reference(x, cu, grid, positions=pos, theta=theta, sections=sections, interleaved=interleaved,
                            inverse=inverse, compute_dtype=torch.float32)


def _gather(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Rows (n, P) of a padded (total + 1, h, d) tensor as (n, h, P, d) (a strided view of the copy)."""
    return x[rows].transpose(1, 2)


def _scatter(dst: torch.Tensor, rows: torch.Tensor, x: torch.Tensor) -> None:
    """dst[rows] = x for x (n, h, P, d) and a padded dst (total + 1, h, d); padding lands on the scratch row."""
    dst.index_copy_(0, rows.reshape(-1), x.transpose(1, 2).reshape(-1, *dst.shape[1:]))


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
    qe = _padded(_rotated(q, seq["cu_q"], seq["grid_q"], seq["pos_q"], theta, sections, interleaved, False))
    ke = _padded(_rotated(k, seq["cu_k"], seq["grid_k"], seq["pos_k"], theta, sections, interleaved, False), group)
    return qe, ke, _padded(v, group)


def forward(q, k, v, out, lse, seq, theta, sections, interleaved, scale, causal):
    """Writes out (q's shape and dtype) and lse (nheads, total_q) fp32; arguments already validated.
    Non-causal groups run torch's fused CPU attention kernel (aten's flash attention for CPU, with
    the padded keys as an additive -inf mask); causal groups the explicit matmul path."""
    total_q, heads, head_dim = q.shape
    qe, ke, ve = _inputs(q, k, v, seq, theta, sections, interleaved)
    oe = qe.new_zeros(qe.shape)
    le = qe.new_full((total_q + 1, heads), float("-inf"))
    for g in _groups(seq):
        qb, kb, vb = _gather(qe, g.rows_q), _gather(ke, g.rows_k), _gather(ve, g.rows_k)
        if causal:
            o, l = _explicit_forward(qb, kb, vb, g, scale, causal)
        else:
            o, l = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qb, kb, vb, 0.0, False,
                                                                              attn_mask=_mask(g), scale=scale)
        _scatter(oe, g.rows_q, o)
        le.index_copy_(0, g.rows_q.reshape(-1), l.transpose(1, 2).reshape(-1, heads))
    out.copy_(oe[:-1])
    lse.copy_(le[:-1].transpose(0, 1))


def backward(dout, dlse, q, k, v, out, lse, dq, dk, dv, seq, theta, sections, interleaved, scale, causal):
    """Writes dq, dk, dv (the inputs' shapes and dtypes) from dout, dlse (or None) and the saved lse.
    Without causal masking and without a gradient on lse: torch's fused CPU attention backward;
    otherwise the explicit formulas with delta = rowsum(dO * O) - dlse."""
    total_k, heads_kv, head_dim = k.shape
    heads = q.shape[1]
    qe, ke, ve = _inputs(q, k, v, seq, theta, sections, interleaved)
    doe, oe = _padded(dout), _padded(out)
    # per query row and head: lse (-inf as 0) and delta; the scratch row 0 (its dO is 0: no gradient)
    delta = (dout.float() * out.float()).sum(-1)
    if dlse is not None:
        delta = delta - dlse.float().transpose(0, 1)
    stats = torch.stack([_padded(_finite(lse).transpose(0, 1)[..., None])[..., 0],
                         _padded(delta[..., None])[..., 0]], -1)
    dqe, dke, dve = torch.zeros_like(qe), torch.zeros_like(ke), torch.zeros_like(ve)
    for g in _groups(seq):
        qb, kb, vb, dob = _gather(qe, g.rows_q), _gather(ke, g.rows_k), _gather(ve, g.rows_k), _gather(doe, g.rows_q)
        st = _gather(stats, g.rows_q)  # (n, h, pq, 2)
        if causal or dlse is not None:
            gq, gk, gv = _explicit_backward(dob, qb, kb, vb, st[..., 0], st[..., 1], g, scale, causal)
        else:
            gq, gk, gv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                dob, qb, kb, vb, _gather(oe, g.rows_q), st[..., 0], 0.0, False, attn_mask=_mask(g), scale=scale)
        _scatter(dqe, g.rows_q, gq)
        _scatter(dke, g.rows_k, gk)
        _scatter(dve, g.rows_k, gv)
    group = heads // heads_kv
    dk_r = dke[:-1].view(total_k, heads_kv, group, head_dim).sum(2)
    dq.copy_(_rotated(dqe[:-1], seq["cu_q"], seq["grid_q"], seq["pos_q"], theta, sections, interleaved, True))
    dk.copy_(_rotated(dk_r, seq["cu_k"], seq["grid_k"], seq["pos_k"], theta, sections, interleaved, True))
    dv.copy_(dve[:-1].view(total_k, heads_kv, group, head_dim).sum(2))
