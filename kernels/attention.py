"""Varlen flash attention with 3D RoPE fused into the Q/K tile loads (Triton, forward + backward).

Layout: q (total_tokens, nheads, head_dim), k/v (total_tokens, nheads_kv, head_dim), last dim
contiguous, token and head strides arbitrary; sequence b owns tokens cu_seqlens[b]:cu_seqlens[b+1].

Work decomposition. Every kernel runs on a grid (blocks over max_seqlen, batch, heads): program
(i, b, h) handles block i of sequence b for head h and exits at once when the block starts past
the sequence's length. The lengths are read from cu_seqlens inside the kernel, so a new length
never recompiles, and one long sequence and many short ones both fill the machine. Token offsets
are int64 (start of the sequence + local index); local indices are int32.

Rotation. A head vector is split into its rotary pairs: ``x1`` holds the first element of every
pair, ``x2`` the second (halves (i, i + D/2) or interleaved (2i, 2i + 1), exactly as rope3d).
Q K^T = Q1 K1^T + Q2 K2^T, so each tile is loaded as two half tiles, rotated in fp32 in
registers (cos/sin from ``rotary_cos_sin`` in kernels/rope.py, angles from the token's position:
the grid (t, h, w) decoded from its index with ``grid_decode``, or the positions tensor) and fed
to two dots of depth D/2. No rotated q or k is ever written; the backward rotates again and applies
the transposed rotation to dQ and dK before storing them.

Forward: FlashAttention-2 online softmax in base 2, saves lse (nheads, total_tokens), natural log.
Backward: (1) delta = rowsum(dO * O) - dlse; (2) a dK/dV kernel per key block (and KV head: the
group's query heads are looped inside, so GQA needs no atomics); (3) a dQ kernel per query block.
dQ uses NO atomics: it is recomputed in its own pass over the key blocks (two extra GEMMs per
tile pair, about 7 instead of 5), which makes the backward deterministic, needs no fp32 dQ
accumulator buffer nor its zeroing, and lets the autotuner rerun kernels freely.

Masking: each loop over the other operand's blocks runs in two parts, the interior blocks with no
mask at all and the boundary blocks (sequence end, causal diagonal) with the mask, so the common
case pays nothing for varlen or causality. Causal query blocks are scheduled last-first (they
carry the most keys).

Tuning: triton.autotune keyed on head_dim, causal, rotation mode and dtype (never lengths); the
candidate tiles are pruned per head_dim class from an sm_90 compile survey (ptxas registers and
stack), not yet from H200 timings. Under TRITON_INTERPRET=1 a fixed small config is used.
"""


import triton
import triton.language as tl

from sigvlp.kernels.rope import grid_decode, log2_theta_parts, pair_columns, rotary_cos_sin

SUPPORTED_HEAD_DIMS = (32, 64, 96, 128)
_LOG2E = 1.4426950408889634
_LN2 = tl.constexpr(0.6931471805599453)


# ----------------------------------------------------------------------------- helpers


@triton.jit
def _pair_index(HALF: tl.constexpr, HALF_PAD: tl.constexpr, INTERLEAVED: tl.constexpr):
    pairs = tl.arange(0, HALF_PAD)
    first, second = pair_columns(pairs, HALF, INTERLEAVED)
    return pairs, first, second, pairs < HALF


@triton.jit
def _tile_cos_sin(idx, valid, seq_start, H, W, pos_ptr, pairs, n_t, n_h, n_w, log2_theta, log2_theta_lo,
                  USE_POSITIONS: tl.constexpr):
    """cos/sin (len(idx), len(pairs)) for local token indices idx of the sequence starting at seq_start."""
    if USE_POSITIONS:
        tok = seq_start + tl.where(valid, idx, 0).to(tl.int64)
        pos_t = tl.load(pos_ptr + tok * 3 + 0, mask=valid, other=0.0)
        pos_h = tl.load(pos_ptr + tok * 3 + 1, mask=valid, other=0.0)
        pos_w = tl.load(pos_ptr + tok * 3 + 2, mask=valid, other=0.0)
    else:
        pos_t, pos_h, pos_w = grid_decode(idx, H, W)
    return rotary_cos_sin(pos_t, pos_h, pos_w, pairs, n_t, n_h, n_w, log2_theta, log2_theta_lo)


@triton.jit
def _load_pairs(rows_ptr, valid, first, second, pmask, seq_start, idx, H, W, pos_ptr, pairs,
                n_t, n_h, n_w, log2_theta, log2_theta_lo,
                ROTATE: tl.constexpr, USE_POSITIONS: tl.constexpr, EVEN: tl.constexpr,
                PAIRS_EXACT: tl.constexpr):
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
        cos, sin = _tile_cos_sin(idx, valid, seq_start, H, W, pos_ptr, pairs, n_t, n_h, n_w, log2_theta, log2_theta_lo,
                                 USE_POSITIONS)
        a = x1.to(tl.float32)
        b = x2.to(tl.float32)
        x1 = (a * cos - b * sin).to(x1.dtype)
        x2 = (b * cos + a * sin).to(x2.dtype)
    return x1, x2


@triton.jit
def _store_pairs_unrotated(rows_ptr, valid, first, second, pmask, g1, g2, seq_start, idx, H, W, pos_ptr, pairs,
                           n_t, n_h, n_w, log2_theta, log2_theta_lo, ROTATE: tl.constexpr, USE_POSITIONS: tl.constexpr):
    """Store a gradient given in rotated coordinates after the transposed (inverse) rotation.

    cos/sin are recomputed here rather than kept from the tile's load: holding them across the
    main loop would cost registers for the whole kernel."""
    if ROTATE:
        cos, sin = _tile_cos_sin(idx, valid, seq_start, H, W, pos_ptr, pairs, n_t, n_h, n_w, log2_theta, log2_theta_lo,
                                 USE_POSITIONS)
        a = g1 * cos + g2 * sin
        b = g2 * cos - g1 * sin
    else:
        a = g1
        b = g2
    mask = valid[:, None] & pmask[None, :]
    tl.store(rows_ptr + first[None, :], a.to(rows_ptr.dtype.element_ty), mask=mask)
    tl.store(rows_ptr + second[None, :], b.to(rows_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _seq_info(cu_ptr, grid_ptr, b, ROTATE: tl.constexpr, USE_POSITIONS: tl.constexpr):
    start = tl.load(cu_ptr + b).to(tl.int64)
    end = tl.load(cu_ptr + b + 1).to(tl.int64)
    L = (end - start).to(tl.int32)
    if ROTATE and not USE_POSITIONS:
        H = tl.load(grid_ptr + b * 3 + 1)
        W = tl.load(grid_ptr + b * 3 + 2)
    else:
        H = 1
        W = 1
    return start, L, H, W


# ----------------------------------------------------------------------------- forward


@triton.jit
def _fwd_inner(acc, l_i, m_i, q1, q2, offs_m, lo, hi, L, seq_start, H, W,
               k_base, v_base, stride_kt, stride_vt, pos_ptr,
               first, second, pmask, pairs, dims, dmask, n_t, n_h, n_w, log2_theta, log2_theta_lo, qk_scale,
               ROTATE: tl.constexpr, USE_POSITIONS: tl.constexpr, CAUSAL: tl.constexpr,
               MASK: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
               PAIRS_EXACT: tl.constexpr, DIMS_EXACT: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_valid = offs_n < L
        rows = seq_start + offs_n.to(tl.int64)
        k1, k2 = _load_pairs(k_base + rows[:, None] * stride_kt, n_valid, first, second, pmask,
                                     seq_start, offs_n, H, W, pos_ptr, pairs, n_t, n_h, n_w, log2_theta, log2_theta_lo,
                                     ROTATE, USE_POSITIONS, not MASK, PAIRS_EXACT)
        qk = tl.dot(q1, tl.trans(k1), input_precision=DOT_PREC)
        qk = tl.dot(q2, tl.trans(k2), qk, input_precision=DOT_PREC)
        qk = qk * qk_scale
        if MASK:
            keep = n_valid[None, :]
            if CAUSAL:
                keep = keep & (offs_n[None, :] <= offs_m[:, None])
            qk = tl.where(keep, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        if MASK:
            m_new = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing seen yet
        p = tl.exp2(qk - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if MASK:
            v = tl.load(v_base + rows[:, None] * stride_vt + dims[None, :],
                        mask=n_valid[:, None] & dmask[None, :], other=0.0)
        elif DIMS_EXACT:
            v = tl.load(v_base + rows[:, None] * stride_vt + dims[None, :])
        else:
            v = tl.load(v_base + rows[:, None] * stride_vt + dims[None, :], mask=dmask[None, :], other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["group", "n_t", "n_h", "n_w"])
def _fwd_kernel(
    Q, K, V, O, LSE, CU, GRID, POS,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_lse_h,
    group, n_t, n_h, n_w, log2_theta, log2_theta_lo, qk_scale,
    HEAD_DIM: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr, D_PAD: tl.constexpr,
    ROTATE: tl.constexpr, USE_POSITIONS: tl.constexpr, INTERLEAVED: tl.constexpr, CAUSAL: tl.constexpr,
    PAIRS_EXACT: tl.constexpr, DIMS_EXACT: tl.constexpr,
    DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    if CAUSAL:  # the last query blocks of a sequence carry the most keys: schedule them first
        pid_m = tl.num_programs(0) - 1 - pid_m
    b = tl.program_id(1)
    h = tl.program_id(2)
    seq_start, L, H, W = _seq_info(CU, GRID, b, ROTATE, USE_POSITIONS)
    start_m = pid_m * BLOCK_M
    if start_m >= L:
        return
    kh = (h // group).to(tl.int64)
    h64 = h.to(tl.int64)
    pairs, first, second, pmask = _pair_index(HALF, HALF_PAD, INTERLEAVED)
    dims = tl.arange(0, D_PAD)
    dmask = dims < HEAD_DIM
    offs_m = start_m + tl.arange(0, BLOCK_M)
    m_valid = offs_m < L
    q_rows = seq_start + offs_m.to(tl.int64)
    q1, q2 = _load_pairs(Q + h64 * stride_qh + q_rows[:, None] * stride_qt, m_valid, first, second, pmask,
                                 seq_start, offs_m, H, W, POS, pairs, n_t, n_h, n_w, log2_theta, log2_theta_lo,
                                 ROTATE, USE_POSITIONS, False, PAIRS_EXACT)
    k_base = K + kh * stride_kh
    v_base = V + kh * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    if CAUSAL:
        full_end = start_m  # keys before the block: visible to every row (BLOCK_M % BLOCK_N == 0)
        end = tl.minimum(start_m + BLOCK_M, L)
    else:
        full_end = (L // BLOCK_N) * BLOCK_N
        end = L
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q1, q2, offs_m, 0, full_end, L, seq_start, H, W,
                               k_base, v_base, stride_kt, stride_vt, POS,
                               first, second, pmask, pairs, dims, dmask, n_t, n_h, n_w, log2_theta, log2_theta_lo, qk_scale,
                               ROTATE, USE_POSITIONS, CAUSAL, False, BLOCK_N, DOT_PREC,
                               PAIRS_EXACT, DIMS_EXACT)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q1, q2, offs_m, full_end, end, L, seq_start, H, W,
                               k_base, v_base, stride_kt, stride_vt, POS,
                               first, second, pmask, pairs, dims, dmask, n_t, n_h, n_w, log2_theta, log2_theta_lo, qk_scale,
                               ROTATE, USE_POSITIONS, CAUSAL, True, BLOCK_N, DOT_PREC,
                               PAIRS_EXACT, DIMS_EXACT)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    o_ptrs = O + h64 * stride_oh + q_rows[:, None] * stride_ot + dims[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=m_valid[:, None] & dmask[None, :])
    lse = (m_i + tl.log2(l_safe)) * _LN2
    tl.store(LSE + h64 * stride_lse_h + q_rows, lse, mask=m_valid)


# ----------------------------------------------------------------------------- backward


@triton.jit(do_not_specialize=["total_tokens", "nheads"])
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
def _dkdv_inner(dk1, dk2, dv, k1, k2, v, offs_n, lo, hi, L, seq_start, H, W,
                q_base, do_base, lse_base, delta_base, stride_qt, stride_dot, pos_ptr,
                first, second, pmask, pairs, dims, dmask, n_t, n_h, n_w, log2_theta, log2_theta_lo, qk_scale,
                ROTATE: tl.constexpr, USE_POSITIONS: tl.constexpr, CAUSAL: tl.constexpr,
                MASK: tl.constexpr, BLOCK_M: tl.constexpr, DOT_PREC: tl.constexpr,
                PAIRS_EXACT: tl.constexpr, DIMS_EXACT: tl.constexpr):
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_valid = offs_m < L
        rows = seq_start + offs_m.to(tl.int64)
        q1, q2 = _load_pairs(q_base + rows[:, None] * stride_qt, m_valid, first, second, pmask,
                                     seq_start, offs_m, H, W, pos_ptr, pairs, n_t, n_h, n_w, log2_theta, log2_theta_lo,
                                     ROTATE, USE_POSITIONS, not MASK, PAIRS_EXACT)
        if MASK:
            do = tl.load(do_base + rows[:, None] * stride_dot + dims[None, :],
                         mask=m_valid[:, None] & dmask[None, :], other=0.0)
            lse = tl.load(lse_base + rows, mask=m_valid, other=0.0)
            delta = tl.load(delta_base + rows, mask=m_valid, other=0.0)
        elif DIMS_EXACT:
            do = tl.load(do_base + rows[:, None] * stride_dot + dims[None, :])
            lse = tl.load(lse_base + rows)
            delta = tl.load(delta_base + rows)
        else:
            do = tl.load(do_base + rows[:, None] * stride_dot + dims[None, :], mask=dmask[None, :], other=0.0)
            lse = tl.load(lse_base + rows)
            delta = tl.load(delta_base + rows)
        qkT = tl.dot(k1, tl.trans(q1), input_precision=DOT_PREC)
        qkT = tl.dot(k2, tl.trans(q2), qkT, input_precision=DOT_PREC)
        pT = tl.exp2(qkT * qk_scale - lse[None, :] * 1.4426950408889634)
        if MASK:
            keep = m_valid[None, :] & (offs_n[:, None] < L)
            if CAUSAL:
                keep = keep & (offs_m[None, :] >= offs_n[:, None])
            pT = tl.where(keep, pT, 0.0)
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PREC)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        dsT = (pT * (dpT - delta[None, :])).to(q1.dtype)
        dk1 = tl.dot(dsT, q1, dk1, input_precision=DOT_PREC)
        dk2 = tl.dot(dsT, q2, dk2, input_precision=DOT_PREC)
    return dk1, dk2, dv


@triton.jit(do_not_specialize=["group", "n_t", "n_h", "n_w"])
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, CU, GRID, POS,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_lse_h,
    group, n_t, n_h, n_w, log2_theta, log2_theta_lo, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr, D_PAD: tl.constexpr,
    ROTATE: tl.constexpr, USE_POSITIONS: tl.constexpr, INTERLEAVED: tl.constexpr, CAUSAL: tl.constexpr,
    PAIRS_EXACT: tl.constexpr, DIMS_EXACT: tl.constexpr,
    DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dK, dV for one key block of one sequence and one KV head (its query heads looped inside)."""
    pid_n = tl.program_id(0)
    b = tl.program_id(1)
    kh = tl.program_id(2).to(tl.int64)
    seq_start, L, H, W = _seq_info(CU, GRID, b, ROTATE, USE_POSITIONS)
    start_n = pid_n * BLOCK_N
    if start_n >= L:
        return
    pairs, first, second, pmask = _pair_index(HALF, HALF_PAD, INTERLEAVED)
    dims = tl.arange(0, D_PAD)
    dmask = dims < HEAD_DIM
    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_valid = offs_n < L
    k_rows = seq_start + offs_n.to(tl.int64)
    k1, k2 = _load_pairs(K + kh * stride_kh + k_rows[:, None] * stride_kt, n_valid, first, second, pmask,
                                   seq_start, offs_n, H, W, POS, pairs, n_t, n_h, n_w, log2_theta, log2_theta_lo,
                                   ROTATE, USE_POSITIONS, False, PAIRS_EXACT)
    v = tl.load(V + kh * stride_vh + k_rows[:, None] * stride_vt + dims[None, :],
                mask=n_valid[:, None] & dmask[None, :], other=0.0)
    dk1 = tl.zeros([BLOCK_N, HALF_PAD], tl.float32)
    dk2 = tl.zeros([BLOCK_N, HALF_PAD], tl.float32)
    dv = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    full_end = (L // BLOCK_M) * BLOCK_M  # query blocks before this are entirely inside the sequence
    if CAUSAL:
        lo = (start_n // BLOCK_M) * BLOCK_M
        diag_end = tl.minimum(tl.cdiv(start_n + BLOCK_N, BLOCK_M) * BLOCK_M, L)
        tail = tl.maximum(diag_end, full_end)
    else:
        lo = 0
        diag_end = 0
        tail = full_end
    for g in range(group):
        h = kh * group + g
        q_base = Q + h * stride_qh
        do_base = DO + h * stride_doh
        lse_base = LSE + h * stride_lse_h
        delta_base = DELTA + h * stride_lse_h
        if CAUSAL:  # query blocks on the diagonal
            dk1, dk2, dv = _dkdv_inner(dk1, dk2, dv, k1, k2, v, offs_n, lo, diag_end, L, seq_start, H, W,
                                       q_base, do_base, lse_base, delta_base, stride_qt, stride_dot, POS,
                                       first, second, pmask, pairs, dims, dmask, n_t, n_h, n_w, log2_theta, log2_theta_lo,
                                       qk_scale, ROTATE, USE_POSITIONS, CAUSAL, True, BLOCK_M, DOT_PREC,
                                   PAIRS_EXACT, DIMS_EXACT)
        dk1, dk2, dv = _dkdv_inner(dk1, dk2, dv, k1, k2, v, offs_n, diag_end, full_end, L, seq_start, H, W,
                                   q_base, do_base, lse_base, delta_base, stride_qt, stride_dot, POS,
                                   first, second, pmask, pairs, dims, dmask, n_t, n_h, n_w, log2_theta, log2_theta_lo,
                                   qk_scale, ROTATE, USE_POSITIONS, CAUSAL, False, BLOCK_M, DOT_PREC,
                                   PAIRS_EXACT, DIMS_EXACT)
        dk1, dk2, dv = _dkdv_inner(dk1, dk2, dv, k1, k2, v, offs_n, tail, L, L, seq_start, H, W,
                                   q_base, do_base, lse_base, delta_base, stride_qt, stride_dot, POS,
                                   first, second, pmask, pairs, dims, dmask, n_t, n_h, n_w, log2_theta, log2_theta_lo,
                                   qk_scale, ROTATE, USE_POSITIONS, CAUSAL, True, BLOCK_M, DOT_PREC,
                                   PAIRS_EXACT, DIMS_EXACT)
    _store_pairs_unrotated(DK + kh * stride_dkh + k_rows[:, None] * stride_dkt, n_valid, first, second, pmask,
                           dk1 * sm_scale, dk2 * sm_scale, seq_start, offs_n, H, W, POS, pairs,
                           n_t, n_h, n_w, log2_theta, log2_theta_lo, ROTATE, USE_POSITIONS)
    tl.store(DV + kh * stride_dvh + k_rows[:, None] * stride_dvt + dims[None, :], dv.to(DV.dtype.element_ty),
             mask=n_valid[:, None] & dmask[None, :])


@triton.jit
def _dq_inner(dq1, dq2, q1, q2, do, lse, delta, offs_m, lo, hi, L, seq_start, H, W,
              k_base, v_base, stride_kt, stride_vt, pos_ptr,
              first, second, pmask, pairs, dims, dmask, n_t, n_h, n_w, log2_theta, log2_theta_lo, qk_scale,
              ROTATE: tl.constexpr, USE_POSITIONS: tl.constexpr, CAUSAL: tl.constexpr,
              MASK: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
              PAIRS_EXACT: tl.constexpr, DIMS_EXACT: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_valid = offs_n < L
        rows = seq_start + offs_n.to(tl.int64)
        k1, k2 = _load_pairs(k_base + rows[:, None] * stride_kt, n_valid, first, second, pmask,
                                     seq_start, offs_n, H, W, pos_ptr, pairs, n_t, n_h, n_w, log2_theta, log2_theta_lo,
                                     ROTATE, USE_POSITIONS, not MASK, PAIRS_EXACT)
        if MASK:
            v = tl.load(v_base + rows[:, None] * stride_vt + dims[None, :],
                        mask=n_valid[:, None] & dmask[None, :], other=0.0)
        elif DIMS_EXACT:
            v = tl.load(v_base + rows[:, None] * stride_vt + dims[None, :])
        else:
            v = tl.load(v_base + rows[:, None] * stride_vt + dims[None, :], mask=dmask[None, :], other=0.0)
        qk = tl.dot(q1, tl.trans(k1), input_precision=DOT_PREC)
        qk = tl.dot(q2, tl.trans(k2), qk, input_precision=DOT_PREC)
        p = tl.exp2(qk * qk_scale - lse[:, None])
        if MASK:
            keep = n_valid[None, :]
            if CAUSAL:
                keep = keep & (offs_n[None, :] <= offs_m[:, None])
            p = tl.where(keep, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = (p * (dp - delta[:, None])).to(k1.dtype)
        dq1 = tl.dot(ds, k1, dq1, input_precision=DOT_PREC)
        dq2 = tl.dot(ds, k2, dq2, input_precision=DOT_PREC)
    return dq1, dq2


@triton.jit(do_not_specialize=["group", "n_t", "n_h", "n_w"])
def _bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, CU, GRID, POS,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dqt, stride_dqh, stride_lse_h,
    group, n_t, n_h, n_w, log2_theta, log2_theta_lo, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr, D_PAD: tl.constexpr,
    ROTATE: tl.constexpr, USE_POSITIONS: tl.constexpr, INTERLEAVED: tl.constexpr, CAUSAL: tl.constexpr,
    PAIRS_EXACT: tl.constexpr, DIMS_EXACT: tl.constexpr,
    DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dQ for one query block of one sequence and head: its own pass over the key blocks, no atomics."""
    pid_m = tl.program_id(0)
    if CAUSAL:  # the last query blocks of a sequence carry the most keys: schedule them first
        pid_m = tl.num_programs(0) - 1 - pid_m
    b = tl.program_id(1)
    h = tl.program_id(2).to(tl.int64)
    seq_start, L, H, W = _seq_info(CU, GRID, b, ROTATE, USE_POSITIONS)
    start_m = pid_m * BLOCK_M
    if start_m >= L:
        return
    kh = h // group
    pairs, first, second, pmask = _pair_index(HALF, HALF_PAD, INTERLEAVED)
    dims = tl.arange(0, D_PAD)
    dmask = dims < HEAD_DIM
    offs_m = start_m + tl.arange(0, BLOCK_M)
    m_valid = offs_m < L
    q_rows = seq_start + offs_m.to(tl.int64)
    q1, q2 = _load_pairs(Q + h * stride_qh + q_rows[:, None] * stride_qt, m_valid, first, second, pmask,
                                   seq_start, offs_m, H, W, POS, pairs, n_t, n_h, n_w, log2_theta, log2_theta_lo,
                                   ROTATE, USE_POSITIONS, False, PAIRS_EXACT)
    do = tl.load(DO + h * stride_doh + q_rows[:, None] * stride_dot + dims[None, :],
                 mask=m_valid[:, None] & dmask[None, :], other=0.0)
    lse = tl.load(LSE + h * stride_lse_h + q_rows, mask=m_valid, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + h * stride_lse_h + q_rows, mask=m_valid, other=0.0)
    dq1 = tl.zeros([BLOCK_M, HALF_PAD], tl.float32)
    dq2 = tl.zeros([BLOCK_M, HALF_PAD], tl.float32)
    if CAUSAL:
        full_end = start_m
        end = tl.minimum(start_m + BLOCK_M, L)
    else:
        full_end = (L // BLOCK_N) * BLOCK_N
        end = L
    k_base = K + kh * stride_kh
    v_base = V + kh * stride_vh
    dq1, dq2 = _dq_inner(dq1, dq2, q1, q2, do, lse, delta, offs_m, 0, full_end, L, seq_start, H, W,
                         k_base, v_base, stride_kt, stride_vt, POS,
                         first, second, pmask, pairs, dims, dmask, n_t, n_h, n_w, log2_theta, log2_theta_lo, qk_scale,
                         ROTATE, USE_POSITIONS, CAUSAL, False, BLOCK_N, DOT_PREC,
                               PAIRS_EXACT, DIMS_EXACT)
    dq1, dq2 = _dq_inner(dq1, dq2, q1, q2, do, lse, delta, offs_m, full_end, end, L, seq_start, H, W,
                         k_base, v_base, stride_kt, stride_vt, POS,
                         first, second, pmask, pairs, dims, dmask, n_t, n_h, n_w, log2_theta, log2_theta_lo, qk_scale,
                         ROTATE, USE_POSITIONS, CAUSAL, True, BLOCK_N, DOT_PREC,
                               PAIRS_EXACT, DIMS_EXACT)
    _store_pairs_unrotated(DQ + h * stride_dqh + q_rows[:, None] * stride_dqt, m_valid, first, second, pmask,
                           dq1 * sm_scale, dq2 * sm_scale, seq_start, offs_m, H, W, POS, pairs,
                           n_t, n_h, n_w, log2_theta, log2_theta_lo, ROTATE, USE_POSITIONS)


# ----------------------------------------------------------------------------- launch


def _config_table(**classes):
    configs, tags = [], []
    for tag, pairs in classes.items():
        for bm, bn, w, st in pairs:
            configs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st))
            tags.append(tag)
    return configs, tags


def _pruner(tags):
    """Keep only the configs of the input's class, so first-call tuning compiles a few configs.

    The classes come from compiling every candidate for sm_90 and reading ptxas's register/stack
    use (no GPU measurement yet): at head_dim 128 only 8-warp or small tiles stay near 255 regs.
    """
    def prune(configs, named_args, **kwargs):
        if kwargs.get("DOT_PREC", "tf32") == "ieee":
            tag = "fp32"
        else:
            tag = "small" if kwargs["HEAD_DIM"] <= 64 else "large"
        return [c for c, t in zip(configs, tags) if t == tag] or configs[-1:]
    return prune


# Keys: head_dim, causal and the rotation mode (and, added by Triton, the dtypes): never lengths.
# BLOCK_M % BLOCK_N == 0 in fwd and dq (the causal split assumes it). In dkdv BLOCK_N is the key
# block a program owns and BLOCK_M the query block it loops over.
_KEY = ["HEAD_DIM", "CAUSAL", "ROTATE", "INTERLEAVED", "DOT_PREC"]
_FWD = _config_table(
    small=[(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3)],
    large=[(128, 64, 8, 3), (128, 128, 8, 3), (64, 32, 4, 3)],
    fp32=[(64, 32, 4, 2), (32, 32, 4, 2)],
)
_DKDV = _config_table(
    small=[(32, 64, 4, 3), (32, 128, 8, 3), (64, 64, 4, 3)],
    large=[(32, 64, 8, 3), (64, 64, 8, 2)],
    fp32=[(32, 64, 4, 2), (32, 32, 4, 2)],
)
_DQ = _config_table(
    small=[(128, 32, 8, 3), (64, 64, 4, 3), (128, 64, 8, 3)],
    large=[(128, 32, 8, 3), (64, 32, 4, 3)],
    fp32=[(64, 32, 4, 2), (32, 32, 4, 2)],
)
_fwd_tuned = triton.autotune(_FWD[0], key=_KEY, prune_configs_by={"early_config_prune": _pruner(_FWD[1])})(
    _fwd_kernel)
_dkdv_tuned = triton.autotune(_DKDV[0], key=_KEY, prune_configs_by={"early_config_prune": _pruner(_DKDV[1])})(
    _bwd_dkdv_kernel)
_dq_tuned = triton.autotune(_DQ[0], key=_KEY, prune_configs_by={"early_config_prune": _pruner(_DQ[1])})(
    _bwd_dq_kernel)

# Under TRITON_INTERPRET=1 (CPU tests) one small fixed config: the interpreter runs every program
# in numpy, and small blocks keep tests fast while still exercising multi-block loops and tails.
INTERPRETER_BLOCKS = {"fwd": (32, 16), "dkdv": (16, 32), "dq": (32, 16)}


def _interpreter() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _common(q, k, grid_thw, positions, sections, theta, interleaved, softmax_scale, causal):
    head_dim = q.shape[-1]
    half = head_dim // 2
    rotate = grid_thw is not None or positions is not None
    meta = dict(
        HEAD_DIM=head_dim, HALF=half, HALF_PAD=max(16, triton.next_power_of_2(half)),
        D_PAD=triton.next_power_of_2(head_dim), ROTATE=rotate, USE_POSITIONS=positions is not None,
        INTERLEAVED=bool(interleaved), CAUSAL=bool(causal),
        DOT_PREC="ieee" if q.dtype == _fp32() else "tf32",
    )
    meta["PAIRS_EXACT"] = meta["HALF_PAD"] == half
    meta["DIMS_EXACT"] = meta["D_PAD"] == head_dim
    scalars = (q.shape[1] // k.shape[1], int(sections[0]), int(sections[1]), int(sections[2]),
               *log2_theta_parts(theta), float(softmax_scale) * _LOG2E)
    return meta, scalars


def _fp32():
    import torch

    return torch.float32


def _launch(tuned, raw, which, grid_fn, args, meta):
    if _interpreter():
        bm, bn = INTERPRETER_BLOCKS[which]
        raw[grid_fn({"BLOCK_M": bm, "BLOCK_N": bn})](*args, **meta, BLOCK_M=bm, BLOCK_N=bn)
    else:
        tuned[grid_fn](*args, **meta)


def forward(q, k, v, out, lse, *, cu_q, cu_k, max_q, max_k, grid_q, pos_q, grid_k, pos_k, sections, theta,
            interleaved, softmax_scale, causal):
    """out (total, nheads, head_dim) and lse (nheads, total) fp32 of the fused attention; inputs validated."""
    cu_seqlens, max_seqlen, grid_thw, positions = cu_q, max_q, grid_q, pos_q
    total, nheads, _ = q.shape
    if total == 0 or max_seqlen == 0:
        return
    batch = cu_seqlens.shape[0] - 1
    meta, (group, n_t, n_h, n_w, log2_theta, log2_theta_lo, qk_scale) = _common(
        q, k, grid_thw, positions, sections, theta, interleaved, softmax_scale, causal)
    args = (q, k, v, out, lse, cu_seqlens, grid_thw if grid_thw is not None else cu_seqlens,
            positions if positions is not None else q,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            out.stride(0), out.stride(1), lse.stride(0),
            group, n_t, n_h, n_w, log2_theta, log2_theta_lo, qk_scale)
    _launch(_fwd_tuned, _fwd_kernel, "fwd",
            lambda m: (triton.cdiv(max_seqlen, m["BLOCK_M"]), batch, nheads), args, meta)


def backward(do, dlse, q, k, v, out, lse, delta, dq, dk, dv, *, cu_q, cu_k, max_q, max_k, grid_q, pos_q, grid_k,
             pos_k, sections, theta, interleaved, softmax_scale, causal):
    """dq, dk, dv of the fused attention (delta: an fp32 (nheads, total) scratch buffer); inputs validated."""
    cu_seqlens, max_seqlen, grid_thw, positions = cu_q, max_q, grid_q, pos_q
    total, nheads, head_dim = q.shape
    if total == 0 or max_seqlen == 0:
        return
    batch = cu_seqlens.shape[0] - 1
    nheads_kv = k.shape[1]
    meta, (group, n_t, n_h, n_w, log2_theta, log2_theta_lo, qk_scale) = _common(
        q, k, grid_thw, positions, sections, theta, interleaved, softmax_scale, causal)
    block = 64 if not _interpreter() else 32
    _bwd_preprocess_kernel[(triton.cdiv(total, block), nheads)](
        out, do, dlse if dlse is not None else lse, delta, total, nheads,
        out.stride(0), out.stride(1), do.stride(0), do.stride(1),
        dlse.stride(0) if dlse is not None else 0, delta.stride(0),
        HEAD_DIM=head_dim, D_PAD=meta["D_PAD"], HAS_DLSE=dlse is not None, BLOCK=block,
    )
    grid_arg = grid_thw if grid_thw is not None else cu_seqlens
    pos_arg = positions if positions is not None else q
    scalars = (group, n_t, n_h, n_w, log2_theta, log2_theta_lo, qk_scale, float(softmax_scale))
    _launch(_dkdv_tuned, _bwd_dkdv_kernel, "dkdv",
            lambda m: (triton.cdiv(max_seqlen, m["BLOCK_N"]), batch, nheads_kv),
            (q, k, v, do, lse, delta, dk, dv, cu_seqlens, grid_arg, pos_arg,
             q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1),
             dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), lse.stride(0), *scalars), meta)
    _launch(_dq_tuned, _bwd_dq_kernel, "dq",
            lambda m: (triton.cdiv(max_seqlen, m["BLOCK_M"]), batch, nheads),
            (q, k, v, do, lse, delta, dq, cu_seqlens, grid_arg, pos_arg,
             q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1),
             dq.stride(0), dq.stride(1), lse.stride(0), *scalars), meta)
