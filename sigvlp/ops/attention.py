"""sigvlp.ops.rope_attention_varlen: self-attention over varlen packed sequences with 3D RoPE inside.

Semantics (the spec; `rope_attention_varlen_reference` is its readable form):
- q (total_tokens, nheads, head_dim), k and v (total_tokens, nheads_kv, head_dim), nheads a
  multiple of nheads_kv (query head h reads KV head h // (nheads / nheads_kv)); sequence b owns
  tokens cu_seqlens[b]:cu_seqlens[b+1] and attends only within itself (causal: to tokens at or
  before its own index).
- With grid_thw or positions, q and k are first rotated exactly as `rope3d` rotates them (same
  arguments: theta, sections, interleaved); with neither, plain varlen attention.
- out = softmax(softmax_scale * rot(q) rot(k)^T) v per sequence and head, in q's dtype;
  lse (nheads, total_tokens) fp32 = natural-log logsumexp of the scaled scores.
- Gradients for q, k, v (and through lse when it is used). The Triton kernel rotates q/k tiles as it
  loads them and never stores a rotated copy; see kernels/attention.py.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from sigvlp.ops import _checks
from sigvlp.ops._backend import Backend, BackendSet, empty_output, resolve_request
from sigvlp.ops.rope import _resolve_sections, rope3d_reference

__all__ = ["rope_attention_varlen", "rope_attention_varlen_reference", "SUPPORTED_HEAD_DIMS"]

SUPPORTED_HEAD_DIMS = (32, 64, 96, 128)
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


def _sequences(cu_seqlens):
    cu = cu_seqlens.detach().to("cpu", torch.int64).tolist()
    return [(s, e) for s, e in zip(cu[:-1], cu[1:]) if e > s]


def _scores(qc, kb, scale, causal, row0):
    """Scaled scores (nheads, rows, L) of query rows row0.. against all keys of the sequence, masked."""
    s = torch.matmul(qc, kb.transpose(1, 2)) * scale
    if causal:
        rows = torch.arange(row0, row0 + qc.shape[1], device=qc.device)[:, None]
        cols = torch.arange(kb.shape[1], device=qc.device)[None, :]
        s = s.masked_fill(cols > rows, float("-inf"))
    return s


def rope_attention_varlen_reference(q, k, v, cu_seqlens, grid_thw=None, *, positions=None, theta=10000.0,
                                    sections=None, interleaved=False, softmax_scale=None, causal=False,
                                    compute_dtype=torch.float32):
    """Readable forward: returns (out in q's dtype, lse fp32). Loops over sequences, not tokens;
    compute_dtype=float64 gives the exact answer."""
    head_dim = q.shape[-1]
    sections = _resolve_sections(sections, head_dim)
    scale = head_dim ** -0.5 if softmax_scale is None else softmax_scale
    group = q.shape[1] // k.shape[1]
    qr = _rotate(q, cu_seqlens, grid_thw, positions, theta, sections, interleaved, False, compute_dtype)
    kr = _rotate(k, cu_seqlens, grid_thw, positions, theta, sections, interleaved, False, compute_dtype)
    vc = v.to(compute_dtype)
    out = torch.zeros(q.shape, dtype=compute_dtype, device=q.device)
    lse = torch.zeros(q.shape[1], q.shape[0], dtype=torch.float32, device=q.device)
    for s, e in _sequences(cu_seqlens):
        qb = qr[s:e].transpose(0, 1)
        kb = kr[s:e].transpose(0, 1).repeat_interleave(group, 0)
        vb = vc[s:e].transpose(0, 1).repeat_interleave(group, 0)
        for r in range(0, e - s, _REF_CHUNK):
            sc = _scores(qb[:, r : r + _REF_CHUNK], kb, scale, causal, r)
            lse_c = torch.logsumexp(sc, dim=-1)
            out[s + r : s + r + sc.shape[1]] = torch.matmul(torch.exp(sc - lse_c[..., None]), vb).transpose(0, 1)
            lse[:, s + r : s + r + sc.shape[1]] = lse_c.float()
    return out.to(q.dtype), lse


def _reference_backward(dout, dlse, q, k, v, lse, cu_seqlens, grid_thw, positions, theta, sections, interleaved,
                        scale, causal, compute_dtype=torch.float32):
    """dq, dk, dv by the FlashAttention backward formulas, per sequence, from the saved lse."""
    total, nheads, head_dim = q.shape
    nheads_kv = k.shape[1]
    group = nheads // nheads_kv
    cd = compute_dtype
    qr = _rotate(q, cu_seqlens, grid_thw, positions, theta, sections, interleaved, False, cd)
    kr = _rotate(k, cu_seqlens, grid_thw, positions, theta, sections, interleaved, False, cd)
    vc, doc = v.to(cd), dout.to(cd)
    dq_r = torch.zeros(total, nheads, head_dim, dtype=cd, device=q.device)
    dk_r = torch.zeros(total, nheads, head_dim, dtype=cd, device=q.device)
    dv_h = torch.zeros(total, nheads, head_dim, dtype=cd, device=q.device)
    for s, e in _sequences(cu_seqlens):
        qb = qr[s:e].transpose(0, 1)
        kb = kr[s:e].transpose(0, 1).repeat_interleave(group, 0)
        vb = vc[s:e].transpose(0, 1).repeat_interleave(group, 0)
        dob = doc[s:e].transpose(0, 1)
        lseb = lse[:, s:e].to(cd)
        dkb = torch.zeros_like(kb)
        dvb = torch.zeros_like(vb)
        for r in range(0, e - s, _REF_CHUNK):
            rows = slice(r, r + _REF_CHUNK)
            p = torch.exp(_scores(qb[:, rows], kb, scale, causal, r) - lseb[:, rows, None])
            do_c = dob[:, rows]
            dvb += torch.matmul(p.transpose(1, 2), do_c)
            dp = torch.matmul(do_c, vb.transpose(1, 2))
            # delta = rowsum(dO * O) = rowsum(P * dP); minus dlse when the lse output is used.
            delta = (p * dp).sum(-1, keepdim=True)
            if dlse is not None:
                delta = delta - dlse[:, s + r : s + r + p.shape[1], None].to(cd)
            ds = p * (dp - delta)
            dq_r[s + r : s + r + p.shape[1]] = (torch.matmul(ds, kb) * scale).transpose(0, 1)
            dkb += torch.matmul(ds.transpose(1, 2), qb[:, rows]) * scale
        dk_r[s:e] = dkb.transpose(0, 1)
        dv_h[s:e] = dvb.transpose(0, 1)
    dk_r = dk_r.view(total, nheads_kv, group, head_dim).sum(2)
    dv = dv_h.view(total, nheads_kv, group, head_dim).sum(2)
    dq = _rotate(dq_r, cu_seqlens, grid_thw, positions, theta, sections, interleaved, True, cd)
    dk = _rotate(dk_r, cu_seqlens, grid_thw, positions, theta, sections, interleaved, True, cd)
    return dq, dk, dv


# ----------------------------------------------------------------------------- backends
# Forward runners write out and lse; backward runners write dq, dk, dv. Arguments validated.


def _run_torch(q, k, v, out, lse, cu_seqlens, max_seqlen, grid_thw, positions, theta, sections, interleaved,
               scale, causal):
    o, l = rope_attention_varlen_reference(q, k, v, cu_seqlens, grid_thw, positions=positions, theta=theta,
                                           sections=sections, interleaved=interleaved, softmax_scale=scale,
                                           causal=causal)
    out.copy_(o)
    lse.copy_(l)


def _run_torch_backward(dout, dlse, q, k, v, out, lse, dq, dk, dv, cu_seqlens, max_seqlen, grid_thw, positions,
                        theta, sections, interleaved, scale, causal):
    gq, gk, gv = _reference_backward(dout, dlse, q, k, v, lse, cu_seqlens, grid_thw, positions, theta, sections,
                                     interleaved, scale, causal)
    dq.copy_(gq)
    dk.copy_(gk)
    dv.copy_(gv)


def _run_triton(q, k, v, out, lse, cu_seqlens, max_seqlen, grid_thw, positions, theta, sections, interleaved,
                scale, causal):
    from sigvlp.kernels import attention as triton_attention  # noqa: PLC0415 (Triton loads on first use)

    triton_attention.forward(q, k, v, out, lse, cu_seqlens, max_seqlen, grid_thw, positions, sections, theta,
                             interleaved, scale, causal)


def _run_triton_backward(dout, dlse, q, k, v, out, lse, dq, dk, dv, cu_seqlens, max_seqlen, grid_thw, positions,
                         theta, sections, interleaved, scale, causal):
    from sigvlp.kernels import attention as triton_attention  # noqa: PLC0415

    delta = empty_output(lse.shape, torch.float32, lse.device)
    triton_attention.backward(dout, dlse, q, k, v, out, lse, delta, dq, dk, dv, cu_seqlens, max_seqlen, grid_thw,
                              positions, sections, theta, interleaved, scale, causal)


def _triton_limits(head_dim: int, **_):
    if head_dim not in SUPPORTED_HEAD_DIMS:
        return f"head_dim {head_dim} not supported (supports {SUPPORTED_HEAD_DIMS})"
    return None


BACKENDS = BackendSet("rope_attention_varlen", [
    Backend("triton", _run_triton, limits=_triton_limits),
    Backend("torch", _run_torch),
])
_BACKWARD = {"triton": _run_triton_backward, "torch": _run_torch_backward}


# ----------------------------------------------------------------------------- torch ops


def _prepare(x):
    return x if x is None or x.stride(-1) == 1 else x.contiguous()


def _check_values(q, cu_seqlens, max_seqlen, grid_thw):
    _checks.check_cu_seqlens_values(cu_seqlens, q.shape[0])
    cu = cu_seqlens.detach().to("cpu", torch.int64)
    longest = int((cu[1:] - cu[:-1]).max())
    if max_seqlen < longest:
        raise ValueError(f"max_seqlen: must be >= the longest sequence ({longest}), got {max_seqlen}")
    if grid_thw is not None:
        _checks.check_grid_thw_values(grid_thw, cu_seqlens)


@torch.library.custom_op("sigvlp::rope_attention_varlen", mutates_args=())
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                  grid_thw: Optional[torch.Tensor], positions: Optional[torch.Tensor], theta: float,
                  sections: list[int], interleaved: bool, softmax_scale: float, causal: bool,
                  backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    _check_values(q, cu_seqlens, max_seqlen, grid_thw)
    impl = BACKENDS.select(backend, device=q.device, dtype=q.dtype, head_dim=q.shape[-1])
    q, k, v = _prepare(q), _prepare(k), _prepare(v)
    out = empty_output(q.shape, q.dtype, q.device)
    lse = empty_output((q.shape[1], q.shape[0]), torch.float32, q.device)
    impl.run(q, k, v, out, lse, cu_seqlens.contiguous(), max_seqlen,
             grid_thw.contiguous() if grid_thw is not None else None,
             positions.contiguous() if positions is not None else None,
             theta, tuple(sections), interleaved, softmax_scale, causal)
    return out, lse


@_attention_op.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, grid_thw, positions, theta, sections, interleaved, softmax_scale, causal,
      backend):
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty((q.shape[1], q.shape[0]), dtype=torch.float32, device=q.device))


@torch.library.custom_op("sigvlp::rope_attention_varlen_backward", mutates_args=())
def _attention_backward_op(dout: torch.Tensor, dlse: Optional[torch.Tensor], q: torch.Tensor, k: torch.Tensor,
                           v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, cu_seqlens: torch.Tensor,
                           max_seqlen: int, grid_thw: Optional[torch.Tensor], positions: Optional[torch.Tensor],
                           theta: float, sections: list[int], interleaved: bool, softmax_scale: float, causal: bool,
                           backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    impl = BACKENDS.select(backend, device=q.device, dtype=q.dtype, head_dim=q.shape[-1])
    q, k, v, out, dout = _prepare(q), _prepare(k), _prepare(v), _prepare(out), _prepare(dout)
    dq = empty_output(q.shape, q.dtype, q.device)
    dk = empty_output(k.shape, k.dtype, k.device)
    dv = empty_output(v.shape, v.dtype, v.device)
    _BACKWARD[impl.name](dout, dlse.contiguous() if dlse is not None else None, q, k, v, out, lse.contiguous(),
                         dq, dk, dv, cu_seqlens.contiguous(), max_seqlen,
                         grid_thw.contiguous() if grid_thw is not None else None,
                         positions.contiguous() if positions is not None else None,
                         theta, tuple(sections), interleaved, softmax_scale, causal)
    return dq, dk, dv


@_attention_backward_op.register_fake
def _(dout, dlse, q, k, v, out, lse, cu_seqlens, max_seqlen, grid_thw, positions, theta, sections, interleaved,
      softmax_scale, causal, backend):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, grid_thw, positions, theta, sections, interleaved, scale, causal, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, grid_thw, positions)
    ctx.args = (max_seqlen, theta, sections, interleaved, scale, causal, backend)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_seqlens, grid_thw, positions = ctx.saved_tensors
    max_seqlen, theta, sections, interleaved, scale, causal, backend = ctx.args
    dq, dk, dv = _attention_backward_op(dout, dlse, q, k, v, out, lse, cu_seqlens, max_seqlen, grid_thw, positions,
                                        theta, sections, interleaved, scale, causal, backend)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None, None


_attention_op.register_autograd(_backward, setup_context=_setup_context)


def rope_attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                          max_seqlen: int, grid_thw: Optional[torch.Tensor] = None, *,
                          positions: Optional[torch.Tensor] = None, theta: float = 10000.0,
                          sections: Optional[Sequence[int]] = None, interleaved: bool = False,
                          softmax_scale: Optional[float] = None, causal: bool = False, return_lse: bool = False,
                          backend: Optional[str] = None):
    """Self-attention within each packed sequence, q and k rotated by 3D RoPE inside the kernel.

    q (total_tokens, nheads, head_dim); k, v (total_tokens, nheads_kv, head_dim), nheads % nheads_kv
    == 0, head_dim in (32, 64, 96, 128), one float dtype and device for all three. cu_seqlens int32
    (batch + 1,) from 0 to total_tokens; max_seqlen >= the longest sequence. grid_thw (int32
    (batch, 3)) or positions (float32 (total_tokens, 3)) as in `rope3d` (neither: no rotation).
    Returns out (q's shape and dtype), or (out, lse) with lse (nheads, total_tokens) fp32 when
    return_lse. backend: None/"auto", "torch" or "triton".
    """
    _checks.check_tensor(q, "q", dtypes=_DTYPES, ndim=3)
    device = q.device
    for name, t in (("k", k), ("v", v)):
        _checks.check_tensor(t, name, ndim=3, device=device)
        if t.dtype != q.dtype:
            raise TypeError(f"{name}: expected q's dtype {str(q.dtype).removeprefix('torch.')}, "
                            f"got {str(t.dtype).removeprefix('torch.')}")
    total, nheads, head_dim = q.shape
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"q: head_dim (last dim) must be one of {SUPPORTED_HEAD_DIMS}, got {head_dim}")
    if k.shape[0] != total or k.shape[2] != head_dim:
        raise ValueError(f"k: expected shape (total_tokens={total}, nheads_kv, head_dim={head_dim}), "
                         f"got {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v: expected k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    if k.shape[1] == 0 or nheads % k.shape[1] != 0:
        raise ValueError(f"k: nheads_kv ({k.shape[1]}) must divide q's nheads ({nheads})")
    _checks.check_cu_seqlens(cu_seqlens, device)
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, (int, torch.SymInt)):
        raise TypeError(f"max_seqlen: expected an int, got {type(max_seqlen).__name__}")
    if max_seqlen < 0:
        raise ValueError(f"max_seqlen: expected >= 0, got {max_seqlen}")
    batch = cu_seqlens.shape[0] - 1
    if grid_thw is not None and positions is not None:
        raise ValueError("grid_thw, positions: give at most one of them (got both)")
    if grid_thw is not None:
        _checks.check_grid_thw(grid_thw, batch, device)
    if positions is not None:
        _checks.check_positions(positions, total, device)
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not math.isfinite(theta) or theta <= 1.0:
        raise ValueError(f"theta: expected a finite number > 1, got {theta!r}")
    sections = _resolve_sections(sections, head_dim)
    if softmax_scale is None:
        softmax_scale = head_dim ** -0.5
    elif (isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float))
          or not math.isfinite(softmax_scale) or softmax_scale <= 0):
        raise ValueError(f"softmax_scale: expected a finite number > 0 or None, got {softmax_scale!r}")
    for flag_name, flag in (("interleaved", interleaved), ("causal", causal), ("return_lse", return_lse)):
        if not isinstance(flag, bool):
            raise TypeError(f"{flag_name}: expected a bool, got {type(flag).__name__}")
    backend = resolve_request(backend, BACKENDS.names) if backend not in (None, "auto") else "auto"
    out, lse = _attention_op(q, k, v, cu_seqlens, max_seqlen, grid_thw, positions, float(theta), list(sections),
                             interleaved, float(softmax_scale), causal, backend)
    return (out, lse) if return_lse else out
