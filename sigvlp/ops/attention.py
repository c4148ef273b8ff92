"""sigvlp.ops.rope_attention_varlen: attention over varlen packed sequences with 3D RoPE inside.

Semantics (the spec; `rope_attention_varlen_reference` is its readable form), as
flash_attn_varlen_func names them:
- q (total_q, nheads, head_dim); k and v (total_k, nheads_kv, head_dim), nheads a multiple of
  nheads_kv (query head h reads KV head h // (nheads / nheads_kv)). Query sequence b owns q rows
  cu_seqlens[b]:cu_seqlens[b+1] and attends to k/v rows cu_seqlens_k[b]:cu_seqlens_k[b+1] only.
  cu_seqlens_k=None (self-attention): k/v share q's packing (cu_seqlens_k = cu_seqlens).
- Rotation: self form, grid_thw or positions rotates q and k (as `rope3d` rotates them, same theta,
  sections, interleaved). Cross form (cu_seqlens_k given): q by grid_thw/positions, k by
  grid_thw_k/positions_k; both sides or neither.
- causal: query i of a sequence with Lq queries and Lk keys sees key j iff j <= i + Lk - Lq (aligned
  bottom-right, as flash-attn >= 2.1); for Lq == Lk the usual lower triangle. A query that sees no key
  (causal with Lq > Lk, or Lk == 0) gets out = 0, lse = -inf and zero gradients.
- out = softmax(softmax_scale * rot(q) rot(k)^T) v per sequence and head, in q's dtype;
  lse (nheads, total_q) fp32 = natural-log logsumexp of the scaled scores.
- Gradients for q, k, v (and through lse when it is used). The Triton kernel rotates q/k tiles as it
  loads them and never stores a rotated copy; see kernels/attention.py.

Host reads. Shape/dtype/device checks are free and always run. Value checks (cu_seqlens monotonic and
ending at the token counts, max_seqlen >= the longest sequence, grid products) read tensor data on the
host, so they run for CPU tensors, and for CUDA tensors only with validate=True or SIGVLP_VALIDATE=1:
the CUDA hot path makes no device-to-host copy (CUDA-graph capturable). Unvalidated bad values give
wrong numbers, never out-of-bounds memory access (the kernels clamp every offset).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from sigvlp.ops import _attention_cuda, _checks, attention_cpu
from sigvlp.ops.backends import (Backend, BackendSet, device_guard, empty_output, resolve_request,
                                 validation_enabled)
from sigvlp.ops.registry import KeyRatio, OpSpec, as64, leaf, rand64, register, weighted_grads
from sigvlp.ops.rope import _resolve_sections, rope3d_reference
from sigvlp.ops.varlen import SUPPORTED_HEAD_DIMS, cu_seqlens_from_lengths

__all__ = ["rope_attention_varlen", "rope_attention_varlen_reference", "SUPPORTED_HEAD_DIMS"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Query rows per chunk in the torch backend: bounds its scores buffer to chunk x seqlen per head.
_REF_CHUNK = 1024


# ----------------------------------------------------------------------------- reference


def _rotate(x, cu_seqlens, grid_thw, positions, theta, sections, interleaved, inverse, dtype):
    x = x.to(dtype)
    if grid_thw is None and positions is None:
        return x
    return rope3d_reference(x, cu_seqlens, grid_thw, positions=positions, theta=theta, sections=sections,
                            interleaved=interleaved, inverse=inverse, compute_dtype=dtype)


def _sequences(cu_q, cu_k):
    """(q_start, q_end, k_start, k_end) of every sequence with queries (host copy: reference only)."""
    q = cu_q.detach().to("cpu", torch.int64).tolist()
    k = cu_k.detach().to("cpu", torch.int64).tolist()
    return [(a, b, c, d) for a, b, c, d in zip(q[:-1], q[1:], k[:-1], k[1:]) if b > a]


def _scores(qc, kb, scale, causal, row0, offset):
    """Scaled scores (nheads, rows, Lk) of query rows row0.. against all keys of the sequence, masked.
    causal: key j visible to query i iff j <= i + offset (offset = Lk - Lq, bottom-right aligned)."""
    s = torch.matmul(qc, kb.transpose(1, 2)) * scale
    if causal:
        rows = torch.arange(row0, row0 + qc.shape[1], device=qc.device)[:, None] + offset
        cols = torch.arange(kb.shape[1], device=qc.device)[None, :]
        s = s.masked_fill(cols > rows, float("-inf"))
    return s


def _finite_lse(lse):
    """lse with -inf (rows that see no key) replaced by 0, so exp(scores - lse) is 0 there, not NaN."""
    return lse.masked_fill(lse == float("-inf"), 0.0)


def rope_attention_varlen_reference(q, k, v, cu_seqlens, grid_thw=None, *, cu_seqlens_k=None, positions=None,
                                    grid_thw_k=None, positions_k=None, theta=10000.0, sections=None,
                                    interleaved=False, softmax_scale=None, causal=False,
                                    compute_dtype=torch.float32):
    """Readable forward: returns (out in q's dtype, lse fp32). Loops over sequences, not tokens;
    compute_dtype=float64 gives the exact answer. Self form when cu_seqlens_k is None (then
    grid_thw/positions rotate k too)."""
    if cu_seqlens_k is None:
        cu_seqlens_k, grid_thw_k, positions_k = cu_seqlens, grid_thw, positions
    head_dim = q.shape[-1]
    sections = _resolve_sections(sections, head_dim)
    scale = head_dim ** -0.5 if softmax_scale is None else softmax_scale
    group = q.shape[1] // k.shape[1]
    qr = _rotate(q, cu_seqlens, grid_thw, positions, theta, sections, interleaved, False, compute_dtype)
    kr = _rotate(k, cu_seqlens_k, grid_thw_k, positions_k, theta, sections, interleaved, False, compute_dtype)
    vc = v.to(compute_dtype)
    out = torch.zeros(q.shape, dtype=compute_dtype, device=q.device)
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=torch.float32, device=q.device)
    for sq, eq, sk, ek in _sequences(cu_seqlens, cu_seqlens_k):
        if ek == sk:
            continue  # no keys: out 0, lse -inf
        qb = qr[sq:eq].transpose(0, 1)
        kb = kr[sk:ek].transpose(0, 1).repeat_interleave(group, 0)
        vb = vc[sk:ek].transpose(0, 1).repeat_interleave(group, 0)
        offset = (ek - sk) - (eq - sq)
        for r in range(0, eq - sq, _REF_CHUNK):
            sc = _scores(qb[:, r : r + _REF_CHUNK], kb, scale, causal, r, offset)
            lse_c = torch.logsumexp(sc, dim=-1)
            p = torch.exp(sc - _finite_lse(lse_c)[..., None])
            out[sq + r : sq + r + sc.shape[1]] = torch.matmul(p, vb).transpose(0, 1)
            lse[:, sq + r : sq + r + sc.shape[1]] = lse_c.float()
    return out.to(q.dtype), lse


def _reference_backward(dout, dlse, q, k, v, lse, cu_q, cu_k, grid_q, pos_q, grid_k, pos_k, theta, sections,
                        interleaved, scale, causal, compute_dtype=torch.float32):
    """dq, dk, dv by the FlashAttention backward formulas, per sequence, from the saved lse."""
    total_q, nheads, head_dim = q.shape
    total_k, nheads_kv, _ = k.shape
    group = nheads // nheads_kv
    cd = compute_dtype
    qr = _rotate(q, cu_q, grid_q, pos_q, theta, sections, interleaved, False, cd)
    kr = _rotate(k, cu_k, grid_k, pos_k, theta, sections, interleaved, False, cd)
    vc, doc = v.to(cd), dout.to(cd)
    dq_r = torch.zeros(total_q, nheads, head_dim, dtype=cd, device=q.device)
    dk_r = torch.zeros(total_k, nheads, head_dim, dtype=cd, device=q.device)
    dv_h = torch.zeros(total_k, nheads, head_dim, dtype=cd, device=q.device)
    for sq, eq, sk, ek in _sequences(cu_q, cu_k):
        if ek == sk:
            continue
        qb = qr[sq:eq].transpose(0, 1)
        kb = kr[sk:ek].transpose(0, 1).repeat_interleave(group, 0)
        vb = vc[sk:ek].transpose(0, 1).repeat_interleave(group, 0)
        dob = doc[sq:eq].transpose(0, 1)
        lseb = _finite_lse(lse[:, sq:eq]).to(cd)
        offset = (ek - sk) - (eq - sq)
        dkb = torch.zeros_like(kb)
        dvb = torch.zeros_like(vb)
        for r in range(0, eq - sq, _REF_CHUNK):
            rows = slice(r, r + _REF_CHUNK)
            p = torch.exp(_scores(qb[:, rows], kb, scale, causal, r, offset) - lseb[:, rows, None])
            do_c = dob[:, rows]
            dvb += torch.matmul(p.transpose(1, 2), do_c)
            dp = torch.matmul(do_c, vb.transpose(1, 2))
            # delta = rowsum(dO * O) = rowsum(P * dP); minus dlse when the lse output is used.
            delta = (p * dp).sum(-1, keepdim=True)
            if dlse is not None:
                delta = delta - dlse[:, sq + r : sq + r + p.shape[1], None].to(cd)
            ds = p * (dp - delta)
            dq_r[sq + r : sq + r + p.shape[1]] = (torch.matmul(ds, kb) * scale).transpose(0, 1)
            dkb += torch.matmul(ds.transpose(1, 2), qb[:, rows]) * scale
        dk_r[sk:ek] = dkb.transpose(0, 1)
        dv_h[sk:ek] = dvb.transpose(0, 1)
    dk_r = dk_r.view(total_k, nheads_kv, group, head_dim).sum(2)
    dv = dv_h.view(total_k, nheads_kv, group, head_dim).sum(2)
    dq = _rotate(dq_r, cu_q, grid_q, pos_q, theta, sections, interleaved, True, cd)
    dk = _rotate(dk_r, cu_k, grid_k, pos_k, theta, sections, interleaved, True, cd)
    return dq, dk, dv


# ----------------------------------------------------------------------------- backends
# Forward runners write out and lse; backward runners write dq, dk, dv. Arguments validated.
# `seq` is the dict of sequence metadata: cu_q, cu_k, max_q, max_k, grid_q, pos_q, grid_k, pos_k.


def _run_torch(q, k, v, out, lse, seq, theta, sections, interleaved, scale, causal):
    o, l = rope_attention_varlen_reference(
        q, k, v, seq["cu_q"], seq["grid_q"], cu_seqlens_k=seq["cu_k"], positions=seq["pos_q"],
        grid_thw_k=seq["grid_k"], positions_k=seq["pos_k"], theta=theta, sections=sections,
        interleaved=interleaved, softmax_scale=scale, causal=causal)
    out.copy_(o)
    lse.copy_(l)


def _run_torch_backward(dout, dlse, q, k, v, out, lse, dq, dk, dv, seq, theta, sections, interleaved, scale,
                        causal):
    gq, gk, gv = _reference_backward(dout, dlse, q, k, v, lse, seq["cu_q"], seq["cu_k"], seq["grid_q"],
                                     seq["pos_q"], seq["grid_k"], seq["pos_k"], theta, sections, interleaved,
                                     scale, causal)
    dq.copy_(gq)
    dk.copy_(gk)
    dv.copy_(gv)


def _run_triton(q, k, v, out, lse, seq, theta, sections, interleaved, scale, causal):
    from sigvlp.kernels import attention as triton_attention  # noqa: PLC0415 (Triton loads on first use)

    triton_attention.forward(q, k, v, out, lse, **seq, sections=sections, theta=theta, interleaved=interleaved,
                             softmax_scale=scale, causal=causal)


def _run_triton_backward(dout, dlse, q, k, v, out, lse, dq, dk, dv, seq, theta, sections, interleaved, scale,
                         causal):
    from sigvlp.kernels import attention as triton_attention  # noqa: PLC0415 (Triton loads on first use)

    delta = empty_output(lse.shape, torch.float32, lse.device)
    triton_attention.backward(dout, dlse, q, k, v, out, lse, delta, dq, dk, dv, **seq, sections=sections,
                              theta=theta, interleaved=interleaved, softmax_scale=scale, causal=causal)


def _triton_limits(head_dim: int, **_):
    if head_dim not in SUPPORTED_HEAD_DIMS:
        return f"head_dim {head_dim} not supported (supports {SUPPORTED_HEAD_DIMS})"
    return None

BACKENDS = BackendSet("rope_attention_varlen", [
    Backend("triton", _run_triton, limits=_triton_limits),
    Backend("cuda", _attention_cuda.forward, dtypes=_attention_cuda.DTYPES, limits=_attention_cuda.limits),
    Backend("cpu", attention_cpu.forward),
    Backend("torch", _run_torch),
])
_BACKWARD = {"triton": _run_triton_backward, "cuda": _attention_cuda.backward, "cpu": attention_cpu.backward,
             "torch": _run_torch_backward}


# ----------------------------------------------------------------------------- torch ops


def _prepare(x):
    return x if x is None or x.stride(-1) == 1 else x.contiguous()


def _contig(x):
    return x.contiguous() if x is not None else None


def _check_values(q, k, cu_q, cu_k, max_q, max_k, grid_q, grid_k, cross):
    """Value checks: read cu_seqlens/grid on the host (only when validation is on)."""
    sides = [("cu_seqlens", "max_seqlen", "grid_thw", q.shape[0], cu_q, max_q, grid_q)]
    if cross:
        sides.append(("cu_seqlens_k", "max_seqlen_k", "grid_thw_k", k.shape[0], cu_k, max_k, grid_k))
    for cu_name, max_name, grid_name, total, cu, max_len, grid in sides:
        _checks.check_cu_seqlens_values(cu, total, name=cu_name)
        cu_host = cu.detach().to("cpu", torch.int64)
        longest = int((cu_host[1:] - cu_host[:-1]).max())
        if max_len < longest:
            raise ValueError(f"{max_name}: must be >= the longest sequence ({longest}), got {max_len}")
        if grid is not None:
            _checks.check_grid_thw_values(grid, cu, name=grid_name)


def _seq_dict(cu_q, cu_k, max_q, max_k, grid_q, pos_q, grid_k, pos_k):
    return dict(cu_q=cu_q.contiguous(), cu_k=cu_k.contiguous(), max_q=max_q, max_k=max_k, grid_q=_contig(grid_q),
                pos_q=_contig(pos_q), grid_k=_contig(grid_k), pos_k=_contig(pos_k))


@torch.library.custom_op("sigvlp::rope_attention_varlen", mutates_args=())
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                  cu_seqlens_k: torch.Tensor, max_seqlen: int, max_seqlen_k: int, grid_thw: Optional[torch.Tensor],
                  positions: Optional[torch.Tensor], grid_thw_k: Optional[torch.Tensor],
                  positions_k: Optional[torch.Tensor], theta: float, sections: list[int], interleaved: bool,
                  softmax_scale: float, causal: bool, cross: bool, validate: bool,
                  backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    if validate:
        _check_values(q, k, cu_seqlens, cu_seqlens_k, max_seqlen, max_seqlen_k, grid_thw, grid_thw_k, cross)
    impl = BACKENDS.select(backend, device=q.device, dtype=q.dtype, head_dim=q.shape[-1], cross=cross)
    q, k, v = _prepare(q), _prepare(k), _prepare(v)
    out = empty_output(q.shape, q.dtype, q.device)
    lse = empty_output((q.shape[1], q.shape[0]), torch.float32, q.device)
    seq = _seq_dict(cu_seqlens, cu_seqlens_k, max_seqlen, max_seqlen_k, grid_thw, positions, grid_thw_k, positions_k)
    impl.run(q, k, v, out, lse, seq, theta, tuple(sections), interleaved, softmax_scale, causal)
    return out, lse


@_attention_op.register_fake
def _(q, k, v, cu_seqlens, cu_seqlens_k, max_seqlen, max_seqlen_k, grid_thw, positions, grid_thw_k, positions_k,
      theta, sections, interleaved, softmax_scale, causal, cross, validate, backend):
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty((q.shape[1], q.shape[0]), dtype=torch.float32, device=q.device))


@torch.library.custom_op("sigvlp::rope_attention_varlen_backward", mutates_args=())
def _attention_backward_op(dout: torch.Tensor, dlse: Optional[torch.Tensor], q: torch.Tensor, k: torch.Tensor,
                           v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, cu_seqlens: torch.Tensor,
                           cu_seqlens_k: torch.Tensor, max_seqlen: int, max_seqlen_k: int,
                           grid_thw: Optional[torch.Tensor], positions: Optional[torch.Tensor],
                           grid_thw_k: Optional[torch.Tensor], positions_k: Optional[torch.Tensor],
                           theta: float, sections: list[int], interleaved: bool, softmax_scale: float, causal: bool,
                           cross: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    impl = BACKENDS.select(backend, device=q.device, dtype=q.dtype, head_dim=q.shape[-1], cross=cross)
    q, k, v, out, dout = _prepare(q), _prepare(k), _prepare(v), _prepare(out), _prepare(dout)
    dq = empty_output(q.shape, q.dtype, q.device)
    dk = empty_output(k.shape, k.dtype, k.device)
    dv = empty_output(v.shape, v.dtype, v.device)
    seq = _seq_dict(cu_seqlens, cu_seqlens_k, max_seqlen, max_seqlen_k, grid_thw, positions, grid_thw_k, positions_k)
    with device_guard(q.device):  # as Backend.run is for the forward: launches on q's device
        _BACKWARD[impl.name](dout, _contig(dlse), q, k, v, out, lse.contiguous(), dq, dk, dv, seq, theta,
                             tuple(sections), interleaved, softmax_scale, causal)
    return dq, dk, dv


@_attention_backward_op.register_fake
def _(dout, dlse, q, k, v, out, lse, cu_seqlens, cu_seqlens_k, max_seqlen, max_seqlen_k, grid_thw, positions,
      grid_thw_k, positions_k, theta, sections, interleaved, softmax_scale, causal, cross, backend):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    (q, k, v, cu_q, cu_k, max_q, max_k, grid_q, pos_q, grid_k, pos_k, theta, sections, interleaved, scale, causal,
     cross, _validate, backend) = inputs
    out, lse = output
    ctx.set_materialize_grads(False)  # dlse None when lse is unused (most callers): backends skip its term
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, grid_q, pos_q, grid_k, pos_k)
    ctx.args = (max_q, max_k, theta, sections, interleaved, scale, causal, cross, backend)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_q, cu_k, grid_q, pos_q, grid_k, pos_k = ctx.saved_tensors
    max_q, max_k, theta, sections, interleaved, scale, causal, cross, backend = ctx.args
    if dout is None:  # only lse was used
        dout = torch.zeros_like(out)
    dq, dk, dv = _attention_backward_op(dout, dlse, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, grid_q, pos_q,
                                        grid_k, pos_k, theta, sections, interleaved, scale, causal, cross, backend)
    return (dq, dk, dv) + (None,) * 16


_attention_op.register_autograd(_backward, setup_context=_setup_context)


def _check_max_seqlen(value, name):
    if isinstance(value, bool) or not isinstance(value, (int, torch.SymInt)):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name}: expected >= 0, got {value}")


def _check_rotation(grid_thw, positions, batch, total, device, grid_name, pos_name):
    if grid_thw is not None and positions is not None:
        raise ValueError(f"{grid_name}, {pos_name}: give at most one of them (got both)")
    if grid_thw is not None:
        _checks.check_grid_thw(grid_thw, batch, device, name=grid_name)
    if positions is not None:
        _checks.check_positions(positions, total, device, name=pos_name)


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cross: bool) -> None:
    """rope_attention_varlen's checks of q, k and v (dtypes, devices, shapes, head counts)."""
    _checks.check_tensor(q, "q", dtypes=_DTYPES, ndim=3)
    for name, t in (("k", k), ("v", v)):
        _checks.check_tensor(t, name, ndim=3, device=q.device)
        if t.dtype != q.dtype:
            raise TypeError(f"{name}: expected q's dtype {str(q.dtype).removeprefix('torch.')}, "
                            f"got {str(t.dtype).removeprefix('torch.')}")
    total, nheads, head_dim = q.shape
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"q: head_dim (last dim) must be one of {SUPPORTED_HEAD_DIMS}, got {head_dim}")
    if (not cross and k.shape[0] != total) or k.shape[2] != head_dim:
        rows = "total_k" if cross else f"total_tokens={total}"
        raise ValueError(f"k: expected shape ({rows}, nheads_kv, head_dim={head_dim}), got {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v: expected k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    if k.shape[1] == 0 or nheads % k.shape[1] != 0:
        raise ValueError(f"k: nheads_kv ({k.shape[1]}) must divide q's nheads ({nheads})")


def _check_cross_keys(cu_seqlens, cu_seqlens_k, max_seqlen_k, grid_thw_k, positions_k, total_k: int,
                      q_rot: bool) -> None:
    """The cross form's key-side checks: cu_seqlens_k, max_seqlen_k, k's rotation (given iff q's)."""
    device = cu_seqlens.device
    _checks.check_cu_seqlens(cu_seqlens_k, device, name="cu_seqlens_k")
    if cu_seqlens_k.shape != cu_seqlens.shape:
        raise ValueError(f"cu_seqlens_k: expected cu_seqlens' shape {tuple(cu_seqlens.shape)} (one key "
                         f"sequence per query sequence), got {tuple(cu_seqlens_k.shape)}")
    _check_max_seqlen(max_seqlen_k, "max_seqlen_k")
    _check_rotation(grid_thw_k, positions_k, cu_seqlens.shape[0] - 1, total_k, device, "grid_thw_k", "positions_k")
    k_rot = grid_thw_k is not None or positions_k is not None
    if q_rot != k_rot:
        given, missing = (("grid_thw/positions", "grid_thw_k/positions_k") if q_rot
                          else ("grid_thw_k/positions_k", "grid_thw/positions"))
        raise ValueError(f"{missing}: the cross form rotates q and k by their own positions; {given} was "
                         f"given, so give {missing} too (or neither side for no rotation)")


def _check_scalars(theta, sections, softmax_scale, head_dim: int, **flags) -> tuple[list, float]:
    """theta, sections, softmax_scale and the bool flags of rope_attention_varlen, checked; returns the
    resolved (sections, softmax_scale)."""
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not math.isfinite(theta) or theta <= 1.0:
        raise ValueError(f"theta: expected a finite number > 1, got {theta!r}")
    sections = _resolve_sections(sections, head_dim)
    if softmax_scale is None:
        softmax_scale = head_dim ** -0.5
    elif (isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float))
          or not math.isfinite(softmax_scale) or softmax_scale <= 0):
        raise ValueError(f"softmax_scale: expected a finite number > 0 or None, got {softmax_scale!r}")
    for flag_name, flag in flags.items():
        if not isinstance(flag, bool):
            raise TypeError(f"{flag_name}: expected a bool, got {type(flag).__name__}")
    return sections, softmax_scale


def rope_attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                          max_seqlen: int, grid_thw: Optional[torch.Tensor] = None, *,
                          cu_seqlens_k: Optional[torch.Tensor] = None, max_seqlen_k: Optional[int] = None,
                          positions: Optional[torch.Tensor] = None, grid_thw_k: Optional[torch.Tensor] = None,
                          positions_k: Optional[torch.Tensor] = None, theta: float = 10000.0,
                          sections: Optional[Sequence[int]] = None, interleaved: bool = False,
                          softmax_scale: Optional[float] = None, causal: bool = False, return_lse: bool = False,
                          backend: Optional[str] = None, validate: bool = False):
    """Attention within each packed sequence, q and k rotated by 3D RoPE inside the kernel.

    q (total_q, nheads, head_dim); k, v (total_k, nheads_kv, head_dim), nheads % nheads_kv == 0,
    head_dim in SUPPORTED_HEAD_DIMS (32, 64, 96, 128), one float dtype and device for all. cu_seqlens int32 (batch + 1,)
    from 0 to total_q; max_seqlen (int) >= the longest query sequence.
    Self-attention (cu_seqlens_k None): total_k == total_q, k/v packed like q; grid_thw (int32
    (batch, 3)) or positions (float32 (total_q, 3)) rotate q and k as in `rope3d` (neither: none).
    Cross form (as flash_attn_varlen_func): cu_seqlens_k int32 (batch + 1,) from 0 to total_k,
    max_seqlen_k (default max_seqlen) >= the longest key sequence; q rotated by grid_thw/positions,
    k by grid_thw_k (int32 (batch, 3)) / positions_k (float32 (total_k, 3)); both sides or neither.
    causal: bottom-right aligned (query i sees key j <= i + Lk - Lq); rows that see no key give 0
    (lse -inf). Returns out (q's shape and dtype), or (out, lse) with lse (nheads, total_q) fp32
    when return_lse. backend: None/"auto", "torch" (the per-sequence reference), "cpu" (CPU tensors:
    torch's fused CPU attention per group of similar lengths; auto's choice on the CPU), "triton" or
    "cuda" (fp16/bf16 only).
    validate: also check cu_seqlens/max_seqlen/grid values on CUDA tensors (a device-to-host copy;
    CPU tensors are always checked; SIGVLP_VALIDATE=1 turns it on everywhere). Bad values raise
    ValueError naming the argument; unchecked bad values give wrong numbers, never bad accesses.
    Errors: TypeError/ValueError naming the argument; BackendError when the backend cannot serve.
    """
    cross = cu_seqlens_k is not None
    _check_qkv(q, k, v, cross)
    device = q.device
    _checks.check_cu_seqlens(cu_seqlens, device)
    _check_max_seqlen(max_seqlen, "max_seqlen")
    _check_rotation(grid_thw, positions, cu_seqlens.shape[0] - 1, q.shape[0], device, "grid_thw", "positions")
    if cross:
        max_seqlen_k = max_seqlen if max_seqlen_k is None else max_seqlen_k
        _check_cross_keys(cu_seqlens, cu_seqlens_k, max_seqlen_k, grid_thw_k, positions_k, k.shape[0],
                          grid_thw is not None or positions is not None)
        cu_k, grid_k, pos_k = cu_seqlens_k, grid_thw_k, positions_k
    else:
        for name, value in (("max_seqlen_k", max_seqlen_k), ("grid_thw_k", grid_thw_k),
                            ("positions_k", positions_k)):
            if value is not None and not (name == "max_seqlen_k" and value == max_seqlen):
                raise ValueError(f"{name}: only for the cross form; give cu_seqlens_k too (self-attention "
                                 f"rotates k by grid_thw/positions)")
        max_seqlen_k, cu_k, grid_k, pos_k = max_seqlen, cu_seqlens, grid_thw, positions
    sections, softmax_scale = _check_scalars(theta, sections, softmax_scale, q.shape[2],
                                             interleaved=interleaved, causal=causal, return_lse=return_lse)
    backend = resolve_request(backend, BACKENDS.names) if backend not in (None, "auto") else "auto"
    out, lse = _attention_op(q, k, v, cu_seqlens, cu_k, max_seqlen, max_seqlen_k, grid_thw, positions, grid_k, pos_k,
                             float(theta), list(sections), interleaved, float(softmax_scale), causal, cross,
                             validation_enabled(validate, device), backend)
    return (out, lse) if return_lse else out


# ----------------------------------------------------------------------------- registry


def _selftest_case(dtype, device, gen):
    """Three sequences (17, 40, 1 tokens), GQA with 4 query heads on 2 k/v heads of 64."""
    grid = torch.tensor([[1, 1, 17], [2, 4, 5], [1, 1, 1]], dtype=torch.int32)
    lengths = [17, 40, 1]
    cu = cu_seqlens_from_lengths(lengths)
    q = leaf(rand64(gen, 58, 4, 64), dtype, device)
    k = leaf(rand64(gen, 58, 2, 64), dtype, device)
    v = leaf(rand64(gen, 58, 2, 64), dtype, device)
    w = rand64(gen, 58, 4, 64)

    def run(backend):
        out = rope_attention_varlen(q, k, v, cu.to(device), max(lengths), grid.to(device), backend=backend)
        return [out], weighted_grads([out], [q, k, v], [w])

    def oracle():
        leaves = [as64(t) for t in (q, k, v)]
        out, _ = rope_attention_varlen_reference(*leaves, cu, grid, compute_dtype=torch.float64)
        return [out], weighted_grads([out], leaves, [w])

    return run, oracle


def _launch_survey(lengths, rows):
    cu = cu_seqlens_from_lengths(lengths)
    grid = torch.tensor([[1, 1, n] for n in lengths], dtype=torch.int32)
    for head_dim in (64, 128):
        q, k, v = (torch.randn(sum(lengths), 4, head_dim, dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        out = rope_attention_varlen(q, k, v, cu, max(lengths), grid, backend="triton")
        out.float().sum().backward()


def _gpu_launches():
    """The Triton configurations gpu_check's GPU tests and benches launch (OpSpec.launch_configs):
    kwargs of sigvlp.precompile's attention case (dtype, head_dim, rotation, causal, interleaved,
    cross = the keys' rotation in the cross form, lse = lse returned with a gradient)."""
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    grid = dict(rotation="grid", interleaved=False)
    # tests/test_attention.py test_gpu_triton_large (each head_dim x dtype once, causal alternating;
    # also the 2^31-element and varlen/flash-attn comparisons: bf16 128 causal) and the benches'
    # bf16 head_dim 64 / 128 without masking (bench_attention, bench_model, bench_flops_vs_slices)
    large = [dict(dtype=d, head_dim=hd, causal=c, **grid) for d, hd, c in LARGE_GPU_MATRIX]
    benches = [dict(dtype=bf16, head_dim=hd, causal=False, **grid) for hd in (64, 128)]
    # test_gpu_triton_modes_fp32_and_bf16: every rotation mode, causal, lse gradient, fp32 and bf16
    modes = [dict(dtype=d, head_dim=64, rotation=r, causal=True, interleaved=i, lse=True)
             for d in (fp32, bf16) for r, i in (("positions", False), ("none", False), ("grid", True))]
    # test_gpu_triton_cross_form (q by grid, k by positions, lse gradient), the deterministic test's
    # cross form (k by grid), MAP pooling and bench_attention's cross cases (no rotation)
    cross = [dict(dtype=d, head_dim=hd, causal=c, cross="positions", lse=True, **grid)
             for hd, d in ((64, bf16), (128, fp16), (32, fp32)) for c in (False, True)]
    cross += [dict(dtype=bf16, head_dim=64, causal=True, cross="grid", **grid),
              dict(dtype=bf16, head_dim=64, rotation="none", causal=False, interleaved=False, cross="none"),
              dict(dtype=bf16, head_dim=64, causal=False, cross="positions", **grid)]
    return tuple(large + benches + modes + cross)


#: tests/test_attention.py's large GPU sweep, (dtype, head_dim, causal): every head_dim in both
#: 16-bit dtypes, each (head_dim, causal) pair once per dtype; also precompiled (launch_configs).
LARGE_GPU_MATRIX = ((torch.bfloat16, 32, False), (torch.bfloat16, 64, True), (torch.bfloat16, 96, False),
                    (torch.bfloat16, 128, True), (torch.float16, 32, True), (torch.float16, 64, False),
                    (torch.float16, 96, True), (torch.float16, 128, False))


# emulated=False: the CUDA attention has its own emulated tests (tests/test_attention_cuda.py).
SPEC = register(OpSpec(
    name="rope_attention_varlen", backends=BACKENDS, selftest=_selftest_case,
    selftest_facts={"head_dim": 64, "cross": False}, test_file="tests/test_attention.py", emulated=False,
    launch_survey=_launch_survey, triton_autotuned=True, launch_configs=_gpu_launches(),
    bench="benches/bench_attention.py", bench_cap_s=45,
    # the optimized unfused baseline, then the common one that public fused-RoPE kernels compare with:
    # rotary applied in PyTorch as Hugging Face's Qwen-VL vision code does, then torch's varlen
    # attention or flash-attn's flash_attn_varlen_func (bench_attention's vision shapes)
    key_ratios=tuple(KeyRatio(f"attention: sigvlp fused (Triton, CUDA) vs {what}", "attention",
                              ("sigvlp", "sigvlp_cuda"), base)
                     for what, base in (("rope3d + varlen attention", "rope3d+varlen_attn"),
                                        ("HF Qwen-VL rotary + varlen attention", "hf_rotary+varlen_attn"),
                                        ("HF Qwen-VL rotary + flash_attn_varlen_func", "hf_rotary+flash_attn"))),
    interpreter_no_bf16_dot=True,
))
