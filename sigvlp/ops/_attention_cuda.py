"""The "cuda" backend of rope_attention_varlen: glue to csrc/attention.cu (sigvlp._cuda, or the
CPU emulation sigvlp._cuda_emu under SIGVLP_CUDA_EMULATE=1).

Per call: the rotary cos/sin tables are filled once by ``attention_rotary_tables`` (rope3d's angle
code: a grid_thw side gets a (max(max_seqlen, max_seqlen_k), D/2) table of axis coordinates, a
positions side one row per token), then the fused kernels run. Nothing is read back to the host.
fp16 and bf16 only (WMMA on 16-bit tensor cores): fp32 inputs are refused (use "triton").
"""

from __future__ import annotations

import math

import torch

from sigvlp.ops import cuda_module
from sigvlp.ops.backends import device_guard, empty_output
from sigvlp.ops.varlen import SUPPORTED_HEAD_DIMS

DTYPES = (torch.float16, torch.bfloat16)


def limits(head_dim: int, **_) -> str | None:
    if not hasattr(cuda_module.module(), "attention_forward"):
        return "the CUDA module was built without csrc/attention.cu (rebuild: pip install -e . --no-build-isolation)"
    if head_dim not in SUPPORTED_HEAD_DIMS:
        return f"head_dim {head_dim} not supported by the CUDA attention kernels (supports {SUPPORTED_HEAD_DIMS})"
    return None


def _tables(q, seq, sections, theta):
    """(cos_q, sin_q, rows_q, cos_k, sin_k, rows_k) fp32 tables, or Nones when nothing rotates."""
    if seq["grid_q"] is None and seq["pos_q"] is None:
        return None, None, 1, None, None, 1
    half = q.shape[-1] // 2
    mod = cuda_module.module()
    grid_table = None

    def fill(rows, positions):
        cos = torch.empty(rows, half, dtype=torch.float32, device=q.device)
        sin = torch.empty(rows, half, dtype=torch.float32, device=q.device)
        mod.attention_rotary_tables(cos=cuda_module.ptr(cos), sin=cuda_module.ptr(sin), rows=rows, head_dim=q.shape[-1],
                                    positions=cuda_module.ptr(positions), log2_theta=math.log2(theta),
                                    n_t=int(sections[0]), n_h=int(sections[1]), n_w=int(sections[2]),
                                    stream=cuda_module.stream_ptr(q.device))
        return cos, sin, rows

    def side(pos):
        nonlocal grid_table
        if pos is not None:
            return fill(max(pos.shape[0], 1), pos.contiguous() if pos.shape[0] else None)
        if grid_table is None:
            grid_table = fill(max(seq["max_q"], seq["max_k"], 1), None)
        return grid_table

    q_side = side(seq["pos_q"])
    k_side = q_side if seq["pos_k"] is seq["pos_q"] else side(seq["pos_k"])
    return (*q_side, *k_side)


def _args(q, k, v, seq, sections, theta, interleaved, scale, causal, tables):
    cos_q, sin_q, rows_q, cos_k, sin_k, rows_k = tables
    p = cuda_module.ptr
    return dict(
        dtype=cuda_module.dtype_code(q.dtype), q=p(q), k=p(k), v=p(v),
        total_q=q.shape[0], total_k=k.shape[0], nheads=q.shape[1], nheads_kv=k.shape[1], head_dim=q.shape[2],
        batch=seq["cu_q"].shape[0] - 1, max_q=int(seq["max_q"]), max_k=int(seq["max_k"]),
        q_stride_token=q.stride(0), q_stride_head=q.stride(1), k_stride_token=k.stride(0),
        k_stride_head=k.stride(1), v_stride_token=v.stride(0), v_stride_head=v.stride(1),
        cu_q=p(seq["cu_q"]), cu_k=p(seq["cu_k"]), grid_q=p(seq["grid_q"]), grid_k=p(seq["grid_k"]),
        cos_q=p(cos_q), sin_q=p(sin_q), cos_k=p(cos_k), sin_k=p(sin_k), rows_q=rows_q, rows_k=rows_k,
        rotate=cos_q is not None, positions_q=seq["pos_q"] is not None, positions_k=seq["pos_k"] is not None,
        interleaved=bool(interleaved), causal=bool(causal), n_t=int(sections[0]), n_h=int(sections[1]),
        softmax_scale=float(scale), stream=cuda_module.stream_ptr(q.device),
    )


def forward(q, k, v, out, lse, seq, theta, sections, interleaved, scale, causal):
    """Writes out (q's shape/dtype) and lse (nheads, total_q) fp32. Arguments validated by the op."""
    if q.shape[0] == 0:
        return
    tables = _tables(q, seq, sections, theta)  # held until the launch returns
    a = _args(q, k, v, seq, sections, theta, interleaved, scale, causal, tables)
    a.update(out=cuda_module.ptr(out), lse=cuda_module.ptr(lse), out_stride_token=out.stride(0), out_stride_head=out.stride(1),
             lse_stride_head=lse.stride(0), dout=0, dlse=0, delta=0, dq=0, dk=0, dv=0, dout_stride_token=0,
             dout_stride_head=0, dq_stride_token=0, dq_stride_head=0, dk_stride_token=0, dk_stride_head=0,
             dv_stride_token=0, dv_stride_head=0, dlse_stride_head=0)
    cuda_module.module().attention_forward(**a)


def backward(dout, dlse, q, k, v, out, lse, dq, dk, dv, seq, theta, sections, interleaved, scale, causal):
    """Writes dq, dk, dv (deterministic: no atomics). dlse (nheads, total_q) fp32 or None.
    Runs under q's device (the op's backward calls it unguarded)."""
    with device_guard(q.device):
        _backward(dout, dlse, q, k, v, out, lse, dq, dk, dv, seq, theta, sections, interleaved, scale, causal)


def _backward(dout, dlse, q, k, v, out, lse, dq, dk, dv, seq, theta, sections, interleaved, scale, causal):
    if q.shape[0] == 0 or seq["max_q"] == 0:  # no query: nothing flows to k and v
        dk.zero_()
        dv.zero_()
        return
    if k.shape[0] and seq["max_k"] == 0:
        dk.zero_()
        dv.zero_()
    lse = lse.contiguous()
    delta = empty_output(lse.shape, torch.float32, lse.device)
    if dlse is not None:
        dlse = dlse.to(torch.float32).contiguous()
    tables = _tables(q, seq, sections, theta)  # held until the launch returns
    a = _args(q, k, v, seq, sections, theta, interleaved, scale, causal, tables)
    a.update(out=cuda_module.ptr(out), lse=cuda_module.ptr(lse), out_stride_token=out.stride(0), out_stride_head=out.stride(1),
             lse_stride_head=lse.stride(0), dout=cuda_module.ptr(dout), dlse=cuda_module.ptr(dlse), delta=cuda_module.ptr(delta),
             dq=cuda_module.ptr(dq), dk=cuda_module.ptr(dk), dv=cuda_module.ptr(dv), dout_stride_token=dout.stride(0),
             dout_stride_head=dout.stride(1), dq_stride_token=dq.stride(0), dq_stride_head=dq.stride(1),
             dk_stride_token=dk.stride(0), dk_stride_head=dk.stride(1), dv_stride_token=dv.stride(0),
             dv_stride_head=dv.stride(1), dlse_stride_head=dlse.stride(0) if dlse is not None else 0)
    cuda_module.module().attention_backward(**a)
