"""Varlen flash attention with 3D RoPE fused into the Q/K tile loads (Triton, forward + backward).

Layout: q (total_q, nheads, head_dim), k/v (total_k, nheads_kv, head_dim), last dim contiguous,
token and head strides arbitrary. Query sequence b owns q rows cu_q[b]:cu_q[b+1] and attends to
k/v rows cu_k[b]:cu_k[b+1] (self-attention: cu_k is cu_q). Causal masks align bottom-right:
query i sees key j iff j <= i + Lk - Lq (flash-attn >= 2.1); a query that sees no key gets out 0
and lse -inf.

Work decomposition. Every kernel runs on a grid (blocks over max_seqlen, batch, heads): program
(i, b, h) handles block i of sequence b for head h and exits at once when the block starts past
the sequence's length. The lengths are read from cu_seqlens inside the kernel, and every
length-derived integer argument is in do_not_specialize (`LENGTH_ARGS`), so a new length never
recompiles; one long sequence and many short ones both fill the machine. Token offsets are int64
(start of the sequence + local index); local indices are int32. Memory safety for any int32
cu_seqlens / grid values: sequence bounds are clamped into [0, total], table rows into the table.

Rotation. A head vector is split into its rotary pairs: ``x1`` holds the first element of every
pair, ``x2`` the second (halves (i, i + D/2) or interleaved (2i, 2i + 1), exactly as rope3d).
Q K^T = Q1 K1^T + Q2 K2^T, so each tile is loaded as two half tiles, rotated in fp32 in registers
and fed to two dots of depth D/2. No sin/cos is evaluated in these kernels: the launcher fills
per-call cos/sin tables once (`rotary_tables` in kernels/rope.py, the same angle code as rope3d,
so the fused result equals rope3d + unrotated attention): for grid_thw one (max_seqlen, D/2) table
indexed by the token's t, h or w per pair; for positions one row per token. No rotated q or k is
ever written; the backward rotates again and applies the transposed rotation to dQ and dK.

Forward: FlashAttention-2 online softmax in base 2, saves lse (nheads, total_q), natural log.
Backward: (1) delta = rowsum(dO * O) - dlse; (2) a dK/dV kernel per key block (and KV head: the
group's query heads are looped inside, so GQA needs no atomics); (3) a dQ kernel per query block.
dQ uses NO atomics: it is recomputed in its own pass over the key blocks (two extra GEMMs per
tile pair, about 7 instead of 5), which makes the backward deterministic, needs no fp32 dQ
accumulator buffer nor its zeroing, and lets the autotuner rerun kernels freely.

Masking: each loop over the other operand's blocks runs in parts, the interior blocks with no
mask at all and the boundary blocks (sequence end, causal diagonal) with the mask, so the common
case pays nothing for varlen or causality. Causal query blocks are scheduled last-first (they
carry the most keys).

Tuning: triton.autotune keyed on head_dim, causal, rotation mode and dtype (never lengths); the
candidate tiles are pruned per head_dim class from sm_90 and sm_80 compile surveys (ptxas registers and
stack), not yet from H200 timings, and by the device's shared memory (`_smem_estimate`: the
rotation-table tiles are pipelined with k/v, so they count per stage). Under TRITON_INTERPRET=1 a
fixed small config is used.
"""

import torch
import triton
import triton.language as tl

from . import device_info, interpreter
from .rope import grid_index, pair_columns, rotary_tables

SUPPORTED_HEAD_DIMS = (32, 64, 96, 128)
_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)

#: Integer arguments derived from lengths (token totals, table rows, the lse stride = total_q):
#: never specialised, or a total divisible by 16 (or equal to 1) would compile new variants.
#: group and the sections are fixed by the model but kept out too (1 is specialised otherwise).
LENGTH_ARGS = ["stride_lse_h", "total_q", "total_k", "rows_q", "rows_k", "group", "n_t", "n_h"]


# ----------------------------------------------------------------------------- helpers


@triton.jit
def _pair_index(HALF: tl.constexpr, HALF_PAD: tl.constexpr, INTERLEAVED: tl.constexpr):
    pairs = tl.arange(0, HALF_PAD)
    first, second = pair_columns(pairs, HALF, INTERLEAVED)
    return pairs, first, second, pairs < HALF


@triton.jit
def _seq_bounds(cu_ptr, b, total):
    """(start, length) of sequence b, clamped into [0, total]: memory-safe for any cu values."""
    start = tl.load(cu_ptr + b).to(tl.int64)
    end = tl.load(cu_ptr + b + 1).to(tl.int64)
    start = tl.minimum(tl.maximum(start, 0), total)
    end = tl.minimum(tl.maximum(end, start), total)
    return start, (end - start).to(tl.int32)


@triton.jit
def _grid_hw(grid_ptr, b, ROTATE: tl.constexpr, USE_POSITIONS: tl.constexpr):
    if ROTATE and not USE_POSITIONS:
        H = tl.load(grid_ptr + b * 3 + 1)
        W = tl.load(grid_ptr + b * 3 + 2)
    else:
        H = 1
        W = 1
    return H, W


@triton.jit
def _cos_sin(cos_ptr, sin_ptr, idx, seq_start, H, W, pairs, pmask, n_t, n_h, rows,
             HALF: tl.constexpr, USE_POSITIONS: tl.constexpr, PAIRS_EXACT: tl.constexpr):
    """cos/sin (len(idx), len(pairs)) fp32 of local tokens idx, looked up in the per-call tables
    (rows x HALF): by token row for positions, by the pair's axis coordinate for grid_thw."""
    if USE_POSITIONS:
        row = seq_start + idx.to(tl.int64)
        row = tl.minimum(tl.maximum(row, 0), rows - 1)
        offs = row[:, None] * HALF + pairs[None, :]
    else:
        t, h, w = grid_index(idx, H, W)
        p = pairs[None, :]
        row = tl.where(p < n_t, t[:, None], tl.where(p < n_t + n_h, h[:, None], w[:, None]))
        row = tl.minimum(tl.maximum(row, 0), rows - 1)
        offs = row.to(tl.int64) * HALF + p
    if PAIRS_EXACT:
        cos = tl.load(cos_ptr + offs)
        sin = tl.load(sin_ptr + offs)
    else:
        cos = tl.load(cos_ptr + offs, mask=pmask[None, :], other=1.0)
        sin = tl.load(sin_ptr + offs, mask=pmask[None, :], other=0.0)
    return cos, sin


@triton.jit
def _load_pairs(rows_ptr, valid, first, second, pmask, pairs, idx, seq_start, H, W, cos_ptr, sin_ptr,
                n_t, n_h, tab_rows, HALF: tl.constexpr, ROTATE: tl.constexpr, USE_POSITIONS: tl.constexpr,
                EVEN: tl.constexpr, PAIRS_EXACT: tl.constexpr):
    """Load the two halves of a (rows, pairs) tile and rotate them: x1, x2 in the input dtype."""
    if EVEN and PAIRS_EXACT:  # interior tile, no padded pairs: no mask at all
        x1 = tl.load(rows_ptr + first[None, :])
        x2 = tl.load(rows_ptr + second[None, :])
    else:
        if EVEN:
            mask = pmask[None, :]
        else:
            mask = valid[:, None] & pmask[None, :]
        x1 = tl.load(rows_ptr + first[None, :], mask=mask, other=0.0)
        x2 = tl.load(rows_ptr + second[None, :], mask=mask, other=0.0)
    if ROTATE:
        cos, sin = _cos_sin(cos_ptr, sin_ptr, idx, seq_start, H, W, pairs, pmask, n_t, n_h, tab_rows,
                            HALF=HALF, USE_POSITIONS=USE_POSITIONS, PAIRS_EXACT=PAIRS_EXACT)
        a = x1.to(tl.float32)
        b = x2.to(tl.float32)
        x1 = (a * cos - b * sin).to(x1.dtype)
        x2 = (b * cos + a * sin).to(x2.dtype)
    return x1, x2


@triton.jit
def _store_pairs_unrotated(rows_ptr, valid, first, second, pmask, pairs, g1, g2, idx, seq_start, H, W,
                           cos_ptr, sin_ptr, n_t, n_h, tab_rows, HALF: tl.constexpr, ROTATE: tl.constexpr,
                           USE_POSITIONS: tl.constexpr, PAIRS_EXACT: tl.constexpr):
    """Store a gradient given in rotated coordinates after the transposed (inverse) rotation.

    cos/sin are looked up again here rather than kept from the tile's load: holding them across
    the main loop would cost registers for the whole kernel."""
    if ROTATE:
        cos, sin = _cos_sin(cos_ptr, sin_ptr, idx, seq_start, H, W, pairs, pmask, n_t, n_h, tab_rows,
                            HALF=HALF, USE_POSITIONS=USE_POSITIONS, PAIRS_EXACT=PAIRS_EXACT)
        a = g1 * cos + g2 * sin
        b = g2 * cos - g1 * sin
    else:
        a = g1
        b = g2
    mask = valid[:, None] & pmask[None, :]
    tl.store(rows_ptr + first[None, :], a.to(rows_ptr.dtype.element_ty), mask=mask)
    tl.store(rows_ptr + second[None, :], b.to(rows_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _load_rows(ptrs, valid, dmask, MASK: tl.constexpr, DIMS_EXACT: tl.constexpr):
    """A (rows, D_PAD) tile of v or dO: masked on boundary tiles, unmasked inside when D is a power of 2."""
    if MASK:
        x = tl.load(ptrs, mask=valid[:, None] & dmask[None, :], other=0.0)
    elif DIMS_EXACT:
        x = tl.load(ptrs)
    else:
        x = tl.load(ptrs, mask=dmask[None, :], other=0.0)
    return x


@triton.jit
def _causal_key_range(start_m, Lq, Lk, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """Key ranges of query block start_m: [0, full_end) unmasked, [full_end, end) masked, and the
    diagonal offset (query i sees key j <= i + offset when causal)."""
    if CAUSAL:
        offset = Lk - Lq
        seen_by_all = tl.maximum(start_m + offset + 1, 0)  # keys [0, this) are visible to every row
        full_end = tl.minimum((seen_by_all // BLOCK_N) * BLOCK_N, (Lk // BLOCK_N) * BLOCK_N)
        end = tl.minimum(tl.maximum(start_m + BLOCK_M + offset, 0), Lk)
    else:
        offset = 0
        full_end = (Lk // BLOCK_N) * BLOCK_N
        end = Lk
    return full_end, end, offset


# ----------------------------------------------------------------------------- forward


@triton.jit
def _fwd_inner(acc, l_i, m_i, q1, q2, offs_m, lo, hi, Lk, offset, k_start, Hk, Wk,
               k_base, v_base, stride_kt, stride_vt, cos_ptr, sin_ptr, tab_rows,
               first, second, pmask, pairs, dims, dmask, n_t, n_h, qk_scale,
               HALF: tl.constexpr, ROTATE: tl.constexpr, USE_POSITIONS: tl.constexpr, CAUSAL: tl.constexpr,
               MASK: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
               PAIRS_EXACT: tl.constexpr, DIMS_EXACT: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_valid = offs_n < Lk
        rows = k_start + offs_n.to(tl.int64)
        k1, k2 = _load_pairs(k_base + rows[:, None] * stride_kt, n_valid, first, second, pmask, pairs,
                             idx=offs_n, seq_start=k_start, H=Hk, W=Wk, cos_ptr=cos_ptr, sin_ptr=sin_ptr,
                             n_t=n_t, n_h=n_h, tab_rows=tab_rows, HALF=HALF, ROTATE=ROTATE,
                             USE_POSITIONS=USE_POSITIONS, EVEN=not MASK, PAIRS_EXACT=PAIRS_EXACT)
        qk = tl.dot(q1, tl.trans(k1), input_precision=DOT_PREC)
        qk = tl.dot(q2, tl.trans(k2), qk, input_precision=DOT_PREC)
        qk = qk * qk_scale
        if MASK:
            keep = n_valid[None, :]
            if CAUSAL:
                keep = keep & (offs_n[None, :] <= offs_m[:, None] + offset)
            qk = tl.where(keep, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        if MASK:
            m_new = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing seen yet
        p = tl.exp2(qk - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = _load_rows(v_base + rows[:, None] * stride_vt + dims[None, :], n_valid, dmask, MASK, DIMS_EXACT)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=LENGTH_ARGS)
def _fwd_kernel(
    Q, K, V, O, LSE, CU_Q, CU_K, GRID_Q, GRID_K, COS_Q, SIN_Q, COS_K, SIN_K,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_lse_h,
    total_q, total_k, rows_q, rows_k, group, n_t, n_h, qk_scale,
    HEAD_DIM: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr, D_PAD: tl.constexpr,
    ROTATE: tl.constexpr, USE_POSITIONS_Q: tl.constexpr, USE_POSITIONS_K: tl.constexpr,
    INTERLEAVED: tl.constexpr, CAUSAL: tl.constexpr, PAIRS_EXACT: tl.constexpr, DIMS_EXACT: tl.constexpr,
    DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    if CAUSAL:  # the last query blocks of a sequence carry the most keys: schedule them first
        pid_m = tl.num_programs(0) - 1 - pid_m
    b = tl.program_id(1)
    h = tl.program_id(2)
    q_start, Lq = _seq_bounds(CU_Q, b, total_q)
    start_m = pid_m * BLOCK_M
    if start_m >= Lq:
        return
    k_start, Lk = _seq_bounds(CU_K, b, total_k)
    Hq, Wq = _grid_hw(GRID_Q, b, ROTATE, USE_POSITIONS_Q)
    Hk, Wk = _grid_hw(GRID_K, b, ROTATE, USE_POSITIONS_K)
    kh = (h // group).to(tl.int64)
    h64 = h.to(tl.int64)
    pairs, first, second, pmask = _pair_index(HALF, HALF_PAD, INTERLEAVED)
    dims = tl.arange(0, D_PAD)
    dmask = dims < HEAD_DIM
    offs_m = start_m + tl.arange(0, BLOCK_M)
    m_valid = offs_m < Lq
    q_rows = q_start + offs_m.to(tl.int64)
    q1, q2 = _load_pairs(Q + h64 * stride_qh + q_rows[:, None] * stride_qt, m_valid, first, second, pmask, pairs,
                         idx=offs_m, seq_start=q_start, H=Hq, W=Wq, cos_ptr=COS_Q, sin_ptr=SIN_Q, n_t=n_t, n_h=n_h,
                         tab_rows=rows_q, HALF=HALF, ROTATE=ROTATE, USE_POSITIONS=USE_POSITIONS_Q, EVEN=False,
                         PAIRS_EXACT=PAIRS_EXACT)
    k_base = K + kh * stride_kh
    v_base = V + kh * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    full_end, end, offset = _causal_key_range(start_m, Lq, Lk, BLOCK_M, BLOCK_N, CAUSAL)
    for part in tl.static_range(2):  # interior key blocks unmasked, then the boundary ones masked
        acc, l_i, m_i = _fwd_inner(
            acc, l_i, m_i, q1, q2, offs_m, lo=0 if part == 0 else full_end, hi=full_end if part == 0 else end,
            Lk=Lk, offset=offset, k_start=k_start, Hk=Hk, Wk=Wk, k_base=k_base, v_base=v_base,
            stride_kt=stride_kt, stride_vt=stride_vt, cos_ptr=COS_K, sin_ptr=SIN_K, tab_rows=rows_k,
            first=first, second=second, pmask=pmask, pairs=pairs, dims=dims, dmask=dmask, n_t=n_t, n_h=n_h,
            qk_scale=qk_scale, HALF=HALF, ROTATE=ROTATE, USE_POSITIONS=USE_POSITIONS_K, CAUSAL=CAUSAL,
            MASK=part == 1, BLOCK_N=BLOCK_N, DOT_PREC=DOT_PREC, PAIRS_EXACT=PAIRS_EXACT, DIMS_EXACT=DIMS_EXACT)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    o_ptrs = O + h64 * stride_oh + q_rows[:, None] * stride_ot + dims[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=m_valid[:, None] & dmask[None, :])
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.log2(l_safe)) * _LN2)  # no visible key: -inf
    tl.store(LSE + h64 * stride_lse_h + q_rows, lse, mask=m_valid)


# ----------------------------------------------------------------------------- backward


@triton.jit(do_not_specialize=["total_tokens", "nheads", "stride_dlse_h", "stride_delta_h"])
def _bwd_preprocess_kernel(
    O, DO, DLSE, DELTA, total_tokens, nheads,
    stride_ot, stride_oh, stride_dot, stride_doh, stride_dlse_h, stride_delta_h,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, HAS_DLSE: tl.constexpr, BLOCK: tl.constexpr,
):
    """delta[h, t] = sum_d dO * O (fp32), minus dlse[h, t] when the lse output has a gradient."""
    pid = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    rows = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    valid = rows < total_tokens
    dims = tl.arange(0, D_PAD)
    mask = valid[:, None] & (dims[None, :] < HEAD_DIM)
    o = tl.load(O + h * stride_oh + rows[:, None] * stride_ot + dims[None, :], mask=mask, other=0.0)
    do = tl.load(DO + h * stride_doh + rows[:, None] * stride_dot + dims[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_DLSE:
        delta -= tl.load(DLSE + h * stride_dlse_h + rows, mask=valid, other=0.0)
    tl.store(DELTA + h * stride_delta_h + rows, delta, mask=valid)


@triton.jit
def _dkdv_inner(dk1, dk2, dv, k1, k2, v, offs_n, lo, hi, Lq, Lk, offset, q_start, Hq, Wq,
                q_base, do_base, lse_base, delta_base, stride_qt, stride_dot, cos_ptr, sin_ptr, tab_rows,
                first, second, pmask, pairs, dims, dmask, n_t, n_h, qk_scale,
                HALF: tl.constexpr, ROTATE: tl.constexpr, USE_POSITIONS: tl.constexpr, CAUSAL: tl.constexpr,
                MASK: tl.constexpr, BLOCK_M: tl.constexpr, DOT_PREC: tl.constexpr,
                PAIRS_EXACT: tl.constexpr, DIMS_EXACT: tl.constexpr):
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_valid = offs_m < Lq
        rows = q_start + offs_m.to(tl.int64)
        q1, q2 = _load_pairs(q_base + rows[:, None] * stride_qt, m_valid, first, second, pmask, pairs,
                             idx=offs_m, seq_start=q_start, H=Hq, W=Wq, cos_ptr=cos_ptr, sin_ptr=sin_ptr,
                             n_t=n_t, n_h=n_h, tab_rows=tab_rows, HALF=HALF, ROTATE=ROTATE,
                             USE_POSITIONS=USE_POSITIONS, EVEN=not MASK, PAIRS_EXACT=PAIRS_EXACT)
        do = _load_rows(do_base + rows[:, None] * stride_dot + dims[None, :], m_valid, dmask, MASK, DIMS_EXACT)
        if MASK:
            lse = tl.load(lse_base + rows, mask=m_valid, other=0.0)
            lse = tl.where(lse == float("-inf"), float("inf"), lse)  # rows that see no key: P = 0
            delta = tl.load(delta_base + rows, mask=m_valid, other=0.0)
        else:
            lse = tl.load(lse_base + rows)
            delta = tl.load(delta_base + rows)
        qkT = tl.dot(k1, tl.trans(q1), input_precision=DOT_PREC)
        qkT = tl.dot(k2, tl.trans(q2), qkT, input_precision=DOT_PREC)
        pT = tl.exp2(qkT * qk_scale - lse[None, :] * _LOG2E)
        if MASK:
            keep = m_valid[None, :] & (offs_n[:, None] < Lk)
            if CAUSAL:
                keep = keep & (offs_m[None, :] + offset >= offs_n[:, None])
            pT = tl.where(keep, pT, 0.0)
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PREC)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        dsT = (pT * (dpT - delta[None, :])).to(q1.dtype)
        dk1 = tl.dot(dsT, q1, dk1, input_precision=DOT_PREC)
        dk2 = tl.dot(dsT, q2, dk2, input_precision=DOT_PREC)
    return dk1, dk2, dv


@triton.jit(do_not_specialize=LENGTH_ARGS)
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, CU_Q, CU_K, GRID_Q, GRID_K, COS_Q, SIN_Q, COS_K, SIN_K,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_lse_h,
    total_q, total_k, rows_q, rows_k, group, n_t, n_h, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr, D_PAD: tl.constexpr,
    ROTATE: tl.constexpr, USE_POSITIONS_Q: tl.constexpr, USE_POSITIONS_K: tl.constexpr,
    INTERLEAVED: tl.constexpr, CAUSAL: tl.constexpr, PAIRS_EXACT: tl.constexpr, DIMS_EXACT: tl.constexpr,
    DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dK, dV for one key block of one sequence and one KV head (its query heads looped inside)."""
    pid_n = tl.program_id(0)
    b = tl.program_id(1)
    kh = tl.program_id(2).to(tl.int64)
    k_start, Lk = _seq_bounds(CU_K, b, total_k)
    start_n = pid_n * BLOCK_N
    if start_n >= Lk:
        return
    q_start, Lq = _seq_bounds(CU_Q, b, total_q)
    Hq, Wq = _grid_hw(GRID_Q, b, ROTATE, USE_POSITIONS_Q)
    Hk, Wk = _grid_hw(GRID_K, b, ROTATE, USE_POSITIONS_K)
    pairs, first, second, pmask = _pair_index(HALF, HALF_PAD, INTERLEAVED)
    dims = tl.arange(0, D_PAD)
    dmask = dims < HEAD_DIM
    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_valid = offs_n < Lk
    k_rows = k_start + offs_n.to(tl.int64)
    k1, k2 = _load_pairs(K + kh * stride_kh + k_rows[:, None] * stride_kt, n_valid, first, second, pmask, pairs,
                         idx=offs_n, seq_start=k_start, H=Hk, W=Wk, cos_ptr=COS_K, sin_ptr=SIN_K, n_t=n_t, n_h=n_h,
                         tab_rows=rows_k, HALF=HALF, ROTATE=ROTATE, USE_POSITIONS=USE_POSITIONS_K, EVEN=False,
                         PAIRS_EXACT=PAIRS_EXACT)
    v = tl.load(V + kh * stride_vh + k_rows[:, None] * stride_vt + dims[None, :],
                mask=n_valid[:, None] & dmask[None, :], other=0.0)
    dk1 = tl.zeros([BLOCK_N, HALF_PAD], tl.float32)
    dk2 = tl.zeros([BLOCK_N, HALF_PAD], tl.float32)
    dv = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    full_end = (Lq // BLOCK_M) * BLOCK_M  # query blocks before this are entirely inside the sequence
    if CAUSAL:
        offset = Lk - Lq
        first_q = tl.maximum(start_n - offset, 0)  # the first query that sees a key of this block
        lo = tl.minimum((first_q // BLOCK_M) * BLOCK_M, Lq)
        all_q = tl.maximum(start_n + BLOCK_N - 1 - offset, 0)  # queries from here see every key
        diag_end = tl.maximum(tl.minimum(tl.cdiv(all_q, BLOCK_M) * BLOCK_M, Lq), lo)
        tail = tl.maximum(diag_end, full_end)
    else:
        offset = 0
        lo = 0
        diag_end = 0
        tail = full_end
    for g in range(group):
        h = kh * group + g
        for part in tl.static_range(3):  # diagonal query blocks (masked), interior, sequence end (masked)
            if part == 0:
                part_lo = lo
                part_hi = diag_end
            elif part == 1:
                part_lo = diag_end
                part_hi = full_end
            else:
                part_lo = tail
                part_hi = Lq
            if CAUSAL or part > 0:
                dk1, dk2, dv = _dkdv_inner(
                    dk1, dk2, dv, k1, k2, v, offs_n, lo=part_lo, hi=part_hi, Lq=Lq, Lk=Lk, offset=offset,
                    q_start=q_start, Hq=Hq, Wq=Wq, q_base=Q + h * stride_qh, do_base=DO + h * stride_doh,
                    lse_base=LSE + h * stride_lse_h, delta_base=DELTA + h * stride_lse_h, stride_qt=stride_qt,
                    stride_dot=stride_dot, cos_ptr=COS_Q, sin_ptr=SIN_Q, tab_rows=rows_q, first=first,
                    second=second, pmask=pmask, pairs=pairs, dims=dims, dmask=dmask, n_t=n_t, n_h=n_h,
                    qk_scale=qk_scale, HALF=HALF, ROTATE=ROTATE, USE_POSITIONS=USE_POSITIONS_Q, CAUSAL=CAUSAL,
                    MASK=part != 1, BLOCK_M=BLOCK_M, DOT_PREC=DOT_PREC, PAIRS_EXACT=PAIRS_EXACT,
                    DIMS_EXACT=DIMS_EXACT)
    _store_pairs_unrotated(DK + kh * stride_dkh + k_rows[:, None] * stride_dkt, n_valid, first, second, pmask, pairs,
                           dk1 * sm_scale, dk2 * sm_scale, idx=offs_n, seq_start=k_start, H=Hk, W=Wk, cos_ptr=COS_K,
                           sin_ptr=SIN_K, n_t=n_t, n_h=n_h, tab_rows=rows_k, HALF=HALF, ROTATE=ROTATE,
                           USE_POSITIONS=USE_POSITIONS_K, PAIRS_EXACT=PAIRS_EXACT)
    tl.store(DV + kh * stride_dvh + k_rows[:, None] * stride_dvt + dims[None, :], dv.to(DV.dtype.element_ty),
             mask=n_valid[:, None] & dmask[None, :])


@triton.jit
def _dq_inner(dq1, dq2, q1, q2, do, lse, delta, offs_m, lo, hi, Lk, offset, k_start, Hk, Wk,
              k_base, v_base, stride_kt, stride_vt, cos_ptr, sin_ptr, tab_rows,
              first, second, pmask, pairs, dims, dmask, n_t, n_h, qk_scale,
              HALF: tl.constexpr, ROTATE: tl.constexpr, USE_POSITIONS: tl.constexpr, CAUSAL: tl.constexpr,
              MASK: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
              PAIRS_EXACT: tl.constexpr, DIMS_EXACT: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_valid = offs_n < Lk
        rows = k_start + offs_n.to(tl.int64)
        k1, k2 = _load_pairs(k_base + rows[:, None] * stride_kt, n_valid, first, second, pmask, pairs,
                             idx=offs_n, seq_start=k_start, H=Hk, W=Wk, cos_ptr=cos_ptr, sin_ptr=sin_ptr,
                             n_t=n_t, n_h=n_h, tab_rows=tab_rows, HALF=HALF, ROTATE=ROTATE,
                             USE_POSITIONS=USE_POSITIONS, EVEN=not MASK, PAIRS_EXACT=PAIRS_EXACT)
        v = _load_rows(v_base + rows[:, None] * stride_vt + dims[None, :], n_valid, dmask, MASK, DIMS_EXACT)
        qk = tl.dot(q1, tl.trans(k1), input_precision=DOT_PREC)
        qk = tl.dot(q2, tl.trans(k2), qk, input_precision=DOT_PREC)
        p = tl.exp2(qk * qk_scale - lse[:, None])
        if MASK:
            keep = n_valid[None, :]
            if CAUSAL:
                keep = keep & (offs_n[None, :] <= offs_m[:, None] + offset)
            p = tl.where(keep, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = (p * (dp - delta[:, None])).to(k1.dtype)
        dq1 = tl.dot(ds, k1, dq1, input_precision=DOT_PREC)
        dq2 = tl.dot(ds, k2, dq2, input_precision=DOT_PREC)
    return dq1, dq2


@triton.jit(do_not_specialize=LENGTH_ARGS)
def _bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, CU_Q, CU_K, GRID_Q, GRID_K, COS_Q, SIN_Q, COS_K, SIN_K,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dqt, stride_dqh, stride_lse_h,
    total_q, total_k, rows_q, rows_k, group, n_t, n_h, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr, D_PAD: tl.constexpr,
    ROTATE: tl.constexpr, USE_POSITIONS_Q: tl.constexpr, USE_POSITIONS_K: tl.constexpr,
    INTERLEAVED: tl.constexpr, CAUSAL: tl.constexpr, PAIRS_EXACT: tl.constexpr, DIMS_EXACT: tl.constexpr,
    DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dQ for one query block of one sequence and head: its own pass over the key blocks, no atomics."""
    pid_m = tl.program_id(0)
    if CAUSAL:  # the last query blocks of a sequence carry the most keys: schedule them first
        pid_m = tl.num_programs(0) - 1 - pid_m
    b = tl.program_id(1)
    h = tl.program_id(2).to(tl.int64)
    q_start, Lq = _seq_bounds(CU_Q, b, total_q)
    start_m = pid_m * BLOCK_M
    if start_m >= Lq:
        return
    k_start, Lk = _seq_bounds(CU_K, b, total_k)
    Hq, Wq = _grid_hw(GRID_Q, b, ROTATE, USE_POSITIONS_Q)
    Hk, Wk = _grid_hw(GRID_K, b, ROTATE, USE_POSITIONS_K)
    kh = h // group
    pairs, first, second, pmask = _pair_index(HALF, HALF_PAD, INTERLEAVED)
    dims = tl.arange(0, D_PAD)
    dmask = dims < HEAD_DIM
    offs_m = start_m + tl.arange(0, BLOCK_M)
    m_valid = offs_m < Lq
    q_rows = q_start + offs_m.to(tl.int64)
    q1, q2 = _load_pairs(Q + h * stride_qh + q_rows[:, None] * stride_qt, m_valid, first, second, pmask, pairs,
                         idx=offs_m, seq_start=q_start, H=Hq, W=Wq, cos_ptr=COS_Q, sin_ptr=SIN_Q, n_t=n_t, n_h=n_h,
                         tab_rows=rows_q, HALF=HALF, ROTATE=ROTATE, USE_POSITIONS=USE_POSITIONS_Q, EVEN=False,
                         PAIRS_EXACT=PAIRS_EXACT)
    do = tl.load(DO + h * stride_doh + q_rows[:, None] * stride_dot + dims[None, :],
                 mask=m_valid[:, None] & dmask[None, :], other=0.0)
    lse = tl.load(LSE + h * stride_lse_h + q_rows, mask=m_valid, other=0.0)
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * _LOG2E  # rows that see no key: P = 0
    delta = tl.load(DELTA + h * stride_lse_h + q_rows, mask=m_valid, other=0.0)
    dq1 = tl.zeros([BLOCK_M, HALF_PAD], tl.float32)
    dq2 = tl.zeros([BLOCK_M, HALF_PAD], tl.float32)
    full_end, end, offset = _causal_key_range(start_m, Lq, Lk, BLOCK_M, BLOCK_N, CAUSAL)
    for part in tl.static_range(2):  # interior key blocks unmasked, then the boundary ones masked
        dq1, dq2 = _dq_inner(
            dq1, dq2, q1, q2, do, lse, delta, offs_m, lo=0 if part == 0 else full_end,
            hi=full_end if part == 0 else end, Lk=Lk, offset=offset, k_start=k_start, Hk=Hk, Wk=Wk,
            k_base=K + kh * stride_kh, v_base=V + kh * stride_vh, stride_kt=stride_kt, stride_vt=stride_vt,
            cos_ptr=COS_K, sin_ptr=SIN_K, tab_rows=rows_k, first=first, second=second, pmask=pmask, pairs=pairs,
            dims=dims, dmask=dmask, n_t=n_t, n_h=n_h, qk_scale=qk_scale, HALF=HALF, ROTATE=ROTATE,
            USE_POSITIONS=USE_POSITIONS_K, CAUSAL=CAUSAL, MASK=part == 1, BLOCK_N=BLOCK_N, DOT_PREC=DOT_PREC,
            PAIRS_EXACT=PAIRS_EXACT, DIMS_EXACT=DIMS_EXACT)
    _store_pairs_unrotated(DQ + h * stride_dqh + q_rows[:, None] * stride_dqt, m_valid, first, second, pmask, pairs,
                           dq1 * sm_scale, dq2 * sm_scale, idx=offs_m, seq_start=q_start, H=Hq, W=Wq, cos_ptr=COS_Q,
                           sin_ptr=SIN_Q, n_t=n_t, n_h=n_h, tab_rows=rows_q, HALF=HALF, ROTATE=ROTATE,
                           USE_POSITIONS=USE_POSITIONS_Q, PAIRS_EXACT=PAIRS_EXACT)


#: kernels compiled by the static checks (tests/_attention_ttir.py)
STATIC_CHECK_KERNELS = ("_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel")


# ----------------------------------------------------------------------------- launch


def _config_table(**classes):
    configs, tags = [], []
    for tag, pairs in classes.items():
        for bm, bn, w, st in pairs:
            configs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st))
            tags.append(tag)
    return configs, tags


def _smem_estimate(which, cfg, *, head_dim, elt, rotate, arch):
    """Upper bound (bytes) of the shared memory a config compiles to, from the tiles the inner
    loop pipelines (k/q halves, v/dO, and the two fp32 rotation-table tiles of block x head_dim/2)
    and the operand tiles held across it. Calibrated on compiled sizes (tests/test_launch_limits.py
    compiles every surviving config for sm_80/86/89/90): sm_90 keeps num_stages buffers of the
    loop tiles; sm_8x keeps num_stages - 1, plus some scratch."""
    bm, bn = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
    d_pad = triton.next_power_of_2(head_dim)
    half_pad = max(16, triton.next_power_of_2(head_dim // 2))
    loop = bm if which == "dkdv" else bn  # rows of the tiles loaded in the inner loop
    tiles = loop * (2 * half_pad + d_pad) * elt + (2 * loop * half_pad * 4 if rotate else 0)
    if which == "dkdv":
        tiles += loop * 8  # lse, delta
        held = 2 * bn * d_pad * elt  # k, v
    else:
        held = bm * d_pad * elt * (2 if which == "dq" else 1)  # q (and dO)
    if arch >= 90 or arch == 0:
        return cfg.num_stages * tiles + held
    return (cfg.num_stages - 1) * tiles + held + device_info.SCRATCH_BYTES


def _pruner(which, tags):
    """Keep the configs of the input's class that fit the device's shared memory, so first-call
    tuning compiles a few configs and none fails with out-of-resources (the smallest of the class
    when none fits).

    The classes (16-bit or fp32, head_dim <= 64 or larger; 16-bit on sm_8x: their own) come from
    compiling every candidate for sm_90 and sm_80 and reading ptxas's register / local-memory use
    (no GPU timing yet): only candidates that compile without local memory are kept (see the
    tables below).
    """
    def prune(configs, named_args, **kwargs):
        q = named_args["Q"]
        limit = device_info.shared_memory_limit(q.device)
        arch = device_info.arch(q.device)
        tag = "small" if kwargs["HEAD_DIM"] <= 64 else "large"
        if kwargs.get("DOT_PREC", "tf32") == "ieee":
            tag = "fp32" if tag == "small" else "fp32_large"
        if 80 <= arch < 90 and tag + "_sm8x" in tags:  # mma.sync targets: their own tiles
            tag += "_sm8x"
        mine = [c for c, t in zip(configs, tags) if t == tag] or list(configs)
        size = {id(c): _smem_estimate(which, c, head_dim=kwargs["HEAD_DIM"], elt=q.element_size(),
                                      rotate=kwargs["ROTATE"], arch=arch) for c in mine}
        fits = [c for c in mine if size[id(c)] <= limit]
        return fits or [min(mine, key=lambda c: size[id(c)])]
    return prune


# Keys: head_dim, causal and the rotation mode (and, added by Triton, the dtypes): never lengths.
# In dkdv BLOCK_N is the key block a program owns and BLOCK_M the query block it loops over.
# Candidates per class: compiled for sm_90 (triton 3.8, ptxas through `python -m sigvlp.precompile
# --report`, bf16 at head_dim 64 / 128, fp32 at 64 / 128) and kept only when ptxas placed them in
# registers without local memory; tests/test_spills.py holds every launchable variant to that.
# Measured and dropped (bytes of local memory per thread, sm_90): fwd small (128,64,4,3) 120 and
# (128,128,8,3) 24; dkdv small (32,64,4,3) 80, (32,128,8,3) 32, (64,64,4,3) 416, (32,64,4,2) 56,
# (64,64,8,2) 40, (16,64,4,2) 8; dkdv large (32,64,8,3) 120, (64,64,8,2) 424, (32,64,8,2) 72,
# (16,64,4,2) 424, (16,64,8,2) 40, (16,64,8,1) 64, (32,64,8,1) 112, (32,32,4,2) 312, (16,32,4,2) 48;
# dq large (128,32,8,3) 16, (64,32,4,3) 152, (64,32,4,2) 104, (32,32,4,2) 16, (128,32,8,2) 16;
# fp32 (ieee dots, no tensor cores: a correctness path) fwd (64,32,4,2) 40, (32,32,4,2) 64, at
# head_dim 128 (32,16,4,2) 72, (16,16,4,1) 8; dkdv (16,32,4,2) 48, at 128 (16,32,4,1) 624 (the
# rehearsal found tens of KB for the former fp32 candidates at head_dim 96 / 128). The fp32 dkdv
# kept, (16,16,4,1), has 48 B (head_dim 64) and 80 B (128) of local memory at 72 / 128 registers:
# not register pressure (smaller tiles do not remove it); tests/test_spills.py allows fp32
# attention 128 B. The last config of each class is the smallest: the fallback for 99 KiB devices
# (sm_86 / sm_89).
# sm_8x (mma.sync: dot operands and accumulators in registers, and loads pipelined through
# registers where they feed the rotation) has its own 16-bit classes (`*_sm8x`, used for
# 80 <= arch < 90; fp32 shares the classes above, within its budget there: fwd 8 B, dkdv 24 B).
# Every sm_90 candidate spilled on sm_80 (triton 3.8, bf16, bytes): fwd small (128,64,8,3) 40,
# (64,64,4,3) 80, (64,64,4,2) 56; fwd large (64,32,4,3) 48, (64,32,4,2) 16; dkdv small (32,64,8,3)
# 280, (32,64,8,2) 256; dkdv large (32,32,8,2) 32, (16,32,8,2) 40; dq large (64,32,8,2) 768; dq
# small (128,32,8,3) 24. Also measured there and dropped: fwd (128,64,8,2) 24, (64,64,8,2) 8,
# (64,64,4,1) 16 (hd 64) / 160 (hd 128), (128,32,8,2) 32 (hd 128); dkdv (32,64,8,1) 288,
# (32,32,4,1) 272 / 168, (16,64,4,1) 16; dq (64,32,4,2) 40, (64,32,8,2) 8, (32,32,4,2) 16, stage 1
# at hd 64 (64,32,4,1) 96, (32,32,4,1) 88. Kept: the 0-byte ones below (every quick-matrix case).
# Triton 3.6 (the GPU image's) differs: fp32 dq (16,16,4,1) at head_dim 128 kept 344 B on sm_90
# and 360 B on sm_80 (0 under 3.8), and fp32 dq (32,16,4,2) at head_dim 64 120 B on sm_90, so
# both fp32 dq classes are (16,16,4,2) (none under either version on either target, but 8 B at
# head_dim 64 on sm_80 under 3.8); on sm_80 the 3.8-clean dkdv (16,64,8,1) at head_dim 64 kept 56 B and dq (32,32,4,1) at
# 128 8 B, so both classes moved to candidates clean under 3.6 and 3.8: dkdv (16,32,8,2), dq
# (32,16,4,2). Also measured under 3.6 for sm_80 dkdv at head_dim 64: (16,32,8,1) 48, (32,32,8,1)
# 360, (16,64,8,2) 8, (16,32,4,1) 88, (16,64,4,2) 48, (16,128,8,1) 80, (32,64,8,2) 320, and
# (16,16,4,2) 0 (16 under 3.8). On sm_90 under 3.6, dkdv small (32,64,8,3) kept 128 B at
# head_dim 32 with positions, causal, interleaved (0 under 3.8): dropped, (32,64,8,2) has none.
_KEY = ["HEAD_DIM", "CAUSAL", "ROTATE", "INTERLEAVED", "DOT_PREC"]
_FWD = _config_table(
    small=[(128, 64, 8, 3), (64, 64, 4, 3), (64, 64, 4, 2)],
    large=[(128, 64, 8, 3), (64, 32, 4, 3), (64, 32, 4, 2)],
    fp32=[(32, 16, 4, 2)],
    fp32_large=[(16, 16, 8, 1)],
    small_sm8x=[(128, 32, 8, 2), (64, 32, 4, 2)],
    large_sm8x=[(64, 32, 8, 2), (64, 32, 4, 1)],
)
_DKDV = _config_table(
    small=[(32, 64, 8, 2)],
    large=[(32, 32, 8, 2), (16, 32, 8, 2)],
    fp32=[(16, 16, 4, 1)],
    fp32_large=[(16, 16, 4, 1)],
    small_sm8x=[(16, 32, 8, 2)],
    large_sm8x=[(32, 32, 8, 1), (16, 32, 8, 1)],
)
_DQ = _config_table(
    small=[(128, 32, 8, 3), (64, 64, 4, 3), (64, 32, 4, 2)],
    large=[(64, 32, 8, 2)],
    fp32=[(16, 16, 4, 2)],
    fp32_large=[(16, 16, 4, 2)],
    small_sm8x=[(32, 16, 4, 2)],
    large_sm8x=[(32, 16, 4, 2)],
)
_fwd_tuned = triton.autotune(_FWD[0], key=_KEY, prune_configs_by={"early_config_prune": _pruner("fwd", _FWD[1])})(
    _fwd_kernel)
_dkdv_tuned = triton.autotune(_DKDV[0], key=_KEY, prune_configs_by={"early_config_prune": _pruner("dkdv", _DKDV[1])})(
    _bwd_dkdv_kernel)
_dq_tuned = triton.autotune(_DQ[0], key=_KEY, prune_configs_by={"early_config_prune": _pruner("dq", _DQ[1])})(
    _bwd_dq_kernel)

# Under TRITON_INTERPRET=1 (CPU tests) one small fixed config: the interpreter runs every program
# in numpy, and small blocks keep tests fast while still exercising multi-block loops and tails.
INTERPRETER_BLOCKS = {"fwd": (32, 16), "dkdv": (16, 32), "dq": (32, 16)}


def _arg_names(kernel):
    fn = kernel
    while not hasattr(fn, "arg_names"):
        fn = fn.fn
    return fn.arg_names


def _positional(kernel, named: dict) -> list:
    """The launch arguments in the kernel's order, from a dict keyed by parameter name (so a
    swapped argument cannot pass silently); constexprs and autotuned blocks stay keywords."""
    names = [n for n in _arg_names(kernel) if n in named]
    unknown = set(named) - set(names)
    if unknown:
        raise TypeError(f"{getattr(kernel, '__name__', kernel)}: unknown launch arguments {sorted(unknown)}")
    return [named[n] for n in names]


def _launch(tuned, raw, which, grid_fn, named, meta):
    if interpreter():
        bm, bn = INTERPRETER_BLOCKS[which]
        raw[grid_fn({"BLOCK_M": bm, "BLOCK_N": bn})](*_positional(raw, named), **meta, BLOCK_M=bm, BLOCK_N=bn)
    else:
        tuned[grid_fn](*_positional(raw, named), **meta)


def _tables(q, *, max_q, max_k, grid_q, pos_q, grid_k, pos_k, sections, theta):
    """Per-call cos/sin tables of both sides: (cos_q, sin_q, rows_q, cos_k, sin_k, rows_k).

    grid_thw sides share one (max(max_q, max_k), D/2) table of axis coordinates; a positions side
    gets one row per token (shared by q and k when they are the same tensor: self-attention)."""
    if grid_q is None and pos_q is None:
        return q, q, 1, q, q, 1  # no rotation: never read
    kw = dict(head_dim=q.shape[-1], sections=sections, theta=theta, device=q.device)
    grid_rows = max(max_q, max_k, 1)
    grid_table = None

    def side(pos):
        nonlocal grid_table
        if pos is not None:
            return (*rotary_tables(pos.shape[0], positions=pos, **kw), max(pos.shape[0], 1))
        if grid_table is None:
            grid_table = (*rotary_tables(grid_rows, **kw), grid_rows)
        return grid_table

    q_side = side(pos_q)
    k_side = q_side if pos_k is not None and pos_k is pos_q else side(pos_k)
    return (*q_side, *k_side)


def _common(q, k, *, cu_q, cu_k, max_q, max_k, grid_q, pos_q, grid_k, pos_k, sections, theta, interleaved,
            softmax_scale, causal):
    """Constexprs (meta) and the shared launch arguments of the fwd / dkdv / dq kernels."""
    head_dim = q.shape[-1]
    half = head_dim // 2
    rotate = grid_q is not None or pos_q is not None
    meta = dict(
        HEAD_DIM=head_dim, HALF=half, HALF_PAD=max(16, triton.next_power_of_2(half)),
        D_PAD=triton.next_power_of_2(head_dim), ROTATE=rotate, USE_POSITIONS_Q=pos_q is not None,
        USE_POSITIONS_K=pos_k is not None, INTERLEAVED=bool(interleaved), CAUSAL=bool(causal),
        DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
    )
    meta["PAIRS_EXACT"] = meta["HALF_PAD"] == half
    meta["DIMS_EXACT"] = meta["D_PAD"] == head_dim
    cos_q, sin_q, rows_q, cos_k, sin_k, rows_k = _tables(q, max_q=max_q, max_k=max_k, grid_q=grid_q, pos_q=pos_q,
                                                         grid_k=grid_k, pos_k=pos_k, sections=sections, theta=theta)
    named = dict(
        CU_Q=cu_q, CU_K=cu_k, GRID_Q=grid_q if grid_q is not None else cu_q,
        GRID_K=grid_k if grid_k is not None else cu_k, COS_Q=cos_q, SIN_Q=sin_q, COS_K=cos_k, SIN_K=sin_k,
        stride_qt=q.stride(0), stride_qh=q.stride(1), stride_kt=k.stride(0), stride_kh=k.stride(1),
        total_q=q.shape[0], total_k=k.shape[0], rows_q=rows_q, rows_k=rows_k, group=q.shape[1] // k.shape[1],
        n_t=int(sections[0]), n_h=int(sections[1]), qk_scale=float(softmax_scale) * 1.4426950408889634,
    )
    return meta, named


def forward(q, k, v, out, lse, *, cu_q, cu_k, max_q, max_k, grid_q, pos_q, grid_k, pos_k, sections, theta,
            interleaved, softmax_scale, causal):
    """out (total_q, nheads, head_dim) and lse (nheads, total_q) fp32 of the fused attention.

    Shapes/dtypes validated by the caller; index values may be anything (reads are clamped).
    Host-side work: Python ints only (shapes, max_q/max_k), no device-to-host copy."""
    total_q, nheads, _ = q.shape
    if total_q == 0 or max_q == 0:
        return
    batch = cu_q.shape[0] - 1
    meta, named = _common(q, k, cu_q=cu_q, cu_k=cu_k, max_q=max_q, max_k=max_k, grid_q=grid_q, pos_q=pos_q,
                          grid_k=grid_k, pos_k=pos_k, sections=sections, theta=theta, interleaved=interleaved,
                          softmax_scale=softmax_scale, causal=causal)
    named.update(Q=q, K=k, V=v, O=out, LSE=lse, stride_vt=v.stride(0), stride_vh=v.stride(1),
                 stride_ot=out.stride(0), stride_oh=out.stride(1), stride_lse_h=lse.stride(0))
    _launch(_fwd_tuned, _fwd_kernel, "fwd", lambda m: (triton.cdiv(max_q, m["BLOCK_M"]), batch, nheads), named,
            meta)


def backward(do, dlse, q, k, v, out, lse, delta, dq, dk, dv, *, cu_q, cu_k, max_q, max_k, grid_q, pos_q, grid_k,
             pos_k, sections, theta, interleaved, softmax_scale, causal):
    """dq, dk, dv of the fused attention (delta: an fp32 (nheads, total_q) scratch buffer).

    Shapes/dtypes validated by the caller; index values may be anything (reads are clamped)."""
    total_q, nheads, head_dim = q.shape
    total_k, nheads_kv, _ = k.shape
    if total_q == 0 or max_q == 0:  # no query: nothing flows to k and v
        dk.zero_()
        dv.zero_()
        return
    batch = cu_q.shape[0] - 1
    meta, named = _common(q, k, cu_q=cu_q, cu_k=cu_k, max_q=max_q, max_k=max_k, grid_q=grid_q, pos_q=pos_q,
                          grid_k=grid_k, pos_k=pos_k, sections=sections, theta=theta, interleaved=interleaved,
                          softmax_scale=softmax_scale, causal=causal)
    block = 32 if interpreter() else 64
    _bwd_preprocess_kernel[(triton.cdiv(total_q, block), nheads)](
        *_positional(_bwd_preprocess_kernel, dict(
            O=out, DO=do, DLSE=dlse if dlse is not None else lse, DELTA=delta, total_tokens=total_q, nheads=nheads,
            stride_ot=out.stride(0), stride_oh=out.stride(1), stride_dot=do.stride(0), stride_doh=do.stride(1),
            stride_dlse_h=dlse.stride(0) if dlse is not None else 0, stride_delta_h=delta.stride(0))),
        HEAD_DIM=head_dim, D_PAD=meta["D_PAD"], HAS_DLSE=dlse is not None, BLOCK=block,
    )
    named.update(Q=q, K=k, V=v, DO=do, LSE=lse, DELTA=delta, stride_vt=v.stride(0), stride_vh=v.stride(1),
                 stride_dot=do.stride(0), stride_doh=do.stride(1), stride_lse_h=lse.stride(0),
                 sm_scale=float(softmax_scale))
    if total_k > 0 and max_k > 0:
        _launch(_dkdv_tuned, _bwd_dkdv_kernel, "dkdv", lambda m: (triton.cdiv(max_k, m["BLOCK_N"]), batch, nheads_kv),
                dict(named, DK=dk, DV=dv, stride_dkt=dk.stride(0), stride_dkh=dk.stride(1), stride_dvt=dv.stride(0),
                     stride_dvh=dv.stride(1)), meta)
    _launch(_dq_tuned, _bwd_dq_kernel, "dq", lambda m: (triton.cdiv(max_q, m["BLOCK_M"]), batch, nheads),
            dict(named, DQ=dq, stride_dqt=dq.stride(0), stride_dqh=dq.stride(1)), meta)
