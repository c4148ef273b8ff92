"""3D rotary position embedding in Triton.

The jit helpers here (token positions from cu_seqlens and a (T, H, W) grid, per-pair angles
and their cos/sin) are shared with the fused attention kernel, so both rotate identically.
rope3d computes the angles in fp32 from the positions at run time, once per token. The attention
kernels never evaluate sin/cos: `rotary_tables` fills per-call cos/sin tables with the same
`rotary_cos_sin` code (bitwise the values rope3d uses) and the kernels look them up.
"""

import triton
import triton.language as tl

# 2*pi split in three fp32 parts (Cody-Waite). HI and MID have 13 significant bits, so k * HI
# and k * MID are exact for |k| < 2048 (|angle| < ~12,800 rad) without relying on a fused
# multiply-add (the Triton interpreter has none), and angle - k * 2*pi keeps fp32 accuracy.
_TWO_PI_HI = tl.constexpr(6.283203125)
_TWO_PI_MID = tl.constexpr(-1.7818063497543335e-05)
_TWO_PI_LO = tl.constexpr(2.430837753308879e-10)
_INV_TWO_PI = tl.constexpr(0.15915494309189535)


@triton.jit
def sequence_index(cu_seqlens_ptr, tokens, batch, search_steps):
    """Per token, the index s < batch of its sequence: the largest s with cu_seqlens[s] <= token.

    A vectorised binary search; ``search_steps`` >= ceil(log2(batch)) + 1 makes it exact, and
    empty sequences are skipped because their start equals the next sequence's start.
    """
    lo = tl.zeros_like(tokens)
    hi = lo + (batch - 1)
    for _ in range(search_steps):
        mid = (lo + hi + 1) // 2
        start = tl.load(cu_seqlens_ptr + mid).to(tokens.dtype)
        take = start <= tokens
        lo = tl.where(take, mid, lo)
        hi = tl.where(take, hi, mid - 1)
    return lo


@triton.jit
def grid_positions(cu_seqlens_ptr, grid_thw_ptr, tokens, batch, search_steps):
    """(t, h, w) float32 positions of packed tokens in t-major order within their own grid."""
    seq = sequence_index(cu_seqlens_ptr, tokens, batch, search_steps)
    n = tokens - tl.load(cu_seqlens_ptr + seq).to(tokens.dtype)
    H = tl.load(grid_thw_ptr + seq * 3 + 1).to(tokens.dtype)
    W = tl.load(grid_thw_ptr + seq * 3 + 2).to(tokens.dtype)
    return grid_decode(n, H, W)


@triton.jit
def grid_index(n, H, W):
    """(t, h, w) integers of token n (index within its sequence) in a t-major grid of H x W planes.

    Shared with the fused attention kernel, which knows each tile's sequence (and its H, W)
    and so skips the search in ``grid_positions``. Safe for any H, W (empty or garbage grids).
    """
    H = tl.maximum(H, 1)
    W = tl.maximum(W, 1)
    HW = tl.maximum(H * W, 1)
    t = n // HW
    h = (n // W) % H
    w = n % W
    return t, h, w


@triton.jit
def grid_decode(n, H, W):
    """(t, h, w) float32 of token n in a t-major grid of H x W planes (see grid_index)."""
    t, h, w = grid_index(n, H, W)
    return t.to(tl.float32), h.to(tl.float32), w.to(tl.float32)


@triton.jit
def rotary_cos_sin(pos_t, pos_h, pos_w, pairs, n_t, n_h, n_w, log2_theta, log2_theta_lo=0.0):
    """cos and sin of the rotation angles, shape (len(pos), len(pairs)), fp32.

    Pair p belongs to t for p < n_t, then to h for the next n_h, then to w for the next n_w;
    pair j of an axis with n pairs turns by pos * theta^(-j / n). Pairs past the three sections
    are not rotated (cos 1, sin 0).

    log2(theta) arrives split in two fp32 numbers (hi + lo; see `log2_theta_parts`): the exponent
    -(j / n) * log2(theta) is formed in fp64, because an fp32 exponent of magnitude ~13 is off by
    ~1e-6, which turns into angle errors ~1e-3 rad at positions ~1000.
    """
    p = pairs[None, :]
    is_t = p < n_t
    is_h = (p >= n_t) & (p < n_t + n_h)
    rotated = p < n_t + n_h + n_w
    j = tl.where(is_t, p, tl.where(is_h, p - n_t, p - n_t - n_h)).to(tl.float32)
    n = tl.where(is_t, n_t, tl.where(is_h, n_h, n_w)).to(tl.float32)
    n = tl.maximum(n, 1.0)
    log2_theta_f64 = tl.full([1, 1], log2_theta, tl.float64) + log2_theta_lo
    exponent = -(j.to(tl.float64) / n.to(tl.float64)) * log2_theta_f64
    exp_hi = exponent.to(tl.float32)
    exp_lo = (exponent - exp_hi.to(tl.float64)).to(tl.float32)
    inv_freq = tl.exp2(exp_hi) * (1.0 + exp_lo * 0.6931471805599453)
    pos = tl.where(is_t, pos_t[:, None], tl.where(is_h, pos_h[:, None], pos_w[:, None]))
    angle = pos * inv_freq
    # Reduce to [-pi, pi] before the trig so large positions keep fp32 accuracy on every
    # lowering of tl.cos / tl.sin (some are only accurate near zero).
    k = tl.floor(angle * _INV_TWO_PI + 0.5)
    r = (angle - k * _TWO_PI_HI) - k * _TWO_PI_MID
    r = r - k * _TWO_PI_LO
    cos = tl.where(rotated, tl.cos(r), 1.0)
    sin = tl.where(rotated, tl.sin(r), 0.0)
    return cos, sin


@triton.jit
def pair_columns(pairs, HALF: tl.constexpr, INTERLEAVED: tl.constexpr):
    """Columns of the two elements of each rotary pair: (2p, 2p+1) interleaved, else (p, p + HALF)."""
    if INTERLEAVED:
        first = 2 * pairs
        second = 2 * pairs + 1
    else:
        first = pairs
        second = pairs + HALF
    return first, second


# Lengths change every batch: never specialise on them (Triton would compile a new variant the
# first time total_tokens or batch is divisible by 16, or equal to 1). Strides, head counts and
# sections are fixed by the model and stay specialised (aligned vector loads).
@triton.jit(do_not_specialize=["total_tokens", "batch", "search_steps"])
def rope3d_kernel(
    x_ptr, out_ptr,
    cu_seqlens_ptr, grid_thw_ptr, positions_ptr,
    total_tokens, nheads, batch, search_steps,
    stride_x_tok, stride_x_head, stride_o_tok, stride_o_head,
    n_t, n_h, n_w, log2_theta, log2_theta_lo, sign,
    HALF: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_P: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    USE_POSITIONS: tl.constexpr,
):
    """Rotate BLOCK_M tokens, all heads. Angles are computed once per token and reused per head."""
    pid = tl.program_id(0)
    tokens = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    tok_mask = tokens < total_tokens
    safe_tokens = tl.where(tok_mask, tokens, 0)
    if USE_POSITIONS:
        pos_t = tl.load(positions_ptr + safe_tokens * 3 + 0)
        pos_h = tl.load(positions_ptr + safe_tokens * 3 + 1)
        pos_w = tl.load(positions_ptr + safe_tokens * 3 + 2)
    else:
        pos_t, pos_h, pos_w = grid_positions(cu_seqlens_ptr, grid_thw_ptr, safe_tokens, batch, search_steps)
    pairs = tl.arange(0, BLOCK_P)
    cos, sin = rotary_cos_sin(pos_t, pos_h, pos_w, pairs, n_t, n_h, n_w, log2_theta, log2_theta_lo)
    sin = sin * sign
    mask = tok_mask[:, None] & (pairs[None, :] < HALF)
    first, second = pair_columns(pairs, HALF, INTERLEAVED)
    x_rows = x_ptr + tokens[:, None] * stride_x_tok
    o_rows = out_ptr + tokens[:, None] * stride_o_tok
    for head in range(nheads):
        xh = x_rows + head * stride_x_head
        oh = o_rows + head * stride_o_head
        a = tl.load(xh + first[None, :], mask=mask, other=0.0).to(tl.float32)
        b = tl.load(xh + second[None, :], mask=mask, other=0.0).to(tl.float32)
        ra = a * cos - b * sin
        rb = b * cos + a * sin
        tl.store(oh + first[None, :], ra.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(oh + second[None, :], rb.to(out_ptr.dtype.element_ty), mask=mask)


# Rows are a length (max_seqlen or total_tokens): never specialised on.
@triton.jit(do_not_specialize=["rows"])
def rotary_table_kernel(
    pos_ptr, cos_ptr, sin_ptr, rows, n_t, n_h, n_w, log2_theta, log2_theta_lo,
    HALF: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr, USE_POSITIONS: tl.constexpr,
):
    """cos/sin tables (rows, HALF) fp32 for the attention kernels, by `rotary_cos_sin`.

    USE_POSITIONS: row r is token r of the positions tensor (rows, 3). Otherwise row r holds
    every pair at axis coordinate r: a token at grid (t, h, w) reads pair p from row t, h or w
    (the axis p belongs to), so one (max_seqlen, HALF) table serves every grid of a batch.
    """
    pid = tl.program_id(0)
    r = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    valid = r < rows
    if USE_POSITIONS:
        safe = tl.where(valid, r, 0)
        pos_t = tl.load(pos_ptr + safe * 3 + 0)
        pos_h = tl.load(pos_ptr + safe * 3 + 1)
        pos_w = tl.load(pos_ptr + safe * 3 + 2)
    else:
        pos_t = r.to(tl.float32)
        pos_h = pos_t
        pos_w = pos_t
    pairs = tl.arange(0, BLOCK_P)
    cos, sin = rotary_cos_sin(pos_t, pos_h, pos_w, pairs, n_t, n_h, n_w, log2_theta, log2_theta_lo)
    mask = valid[:, None] & (pairs[None, :] < HALF)
    offs = r[:, None] * HALF + pairs[None, :]
    tl.store(cos_ptr + offs, cos, mask=mask)
    tl.store(sin_ptr + offs, sin, mask=mask)


def rotary_tables(rows, *, head_dim, sections, theta, positions=None, device=None):
    """(cos, sin), each (max(rows, 1), head_dim / 2) fp32: per-token rows when positions (rows, 3)
    is given, else per-coordinate rows (see rotary_table_kernel). Arguments already validated."""
    import torch

    half = head_dim // 2
    rows = max(int(rows), 1)
    device = positions.device if positions is not None else device
    cos = torch.empty(rows, half, dtype=torch.float32, device=device)
    sin = torch.empty(rows, half, dtype=torch.float32, device=device)
    if positions is not None and positions.shape[0] == 0:
        cos.fill_(1.0)
        sin.zero_()
        return cos, sin
    block_p = triton.next_power_of_2(half)
    block_r = max(1, min(128, 4096 // block_p))
    log2_theta, log2_theta_lo = log2_theta_parts(theta)
    rotary_table_kernel[(triton.cdiv(rows, block_r),)](
        pos_ptr=positions if positions is not None else cos, cos_ptr=cos, sin_ptr=sin, rows=rows,
        n_t=sections[0], n_h=sections[1], n_w=sections[2], log2_theta=log2_theta, log2_theta_lo=log2_theta_lo,
        HALF=half, BLOCK_R=block_r, BLOCK_P=block_p, USE_POSITIONS=positions is not None,
    )
    return cos, sin


def log2_theta_parts(theta: float) -> tuple[float, float]:
    """log2(theta) as (hi, lo) fp32-representable parts whose sum is accurate to ~1e-14."""
    import math

    import numpy as np

    exact = math.log2(theta)
    hi = float(np.float32(exact))
    return hi, float(np.float32(exact - hi))


def rope3d(x, out, *, cu_seqlens, grid_thw, positions, sections, theta, interleaved, inverse):
    """Launch the rotation of x (tokens, heads, head_dim) into out; arguments already validated
    (shapes and dtypes; index values may be anything: the kernel clamps its reads)."""
    import math

    total_tokens, nheads, head_dim = x.shape
    if total_tokens == 0:
        return out
    half = head_dim // 2
    block_p = triton.next_power_of_2(half)
    block_m = max(1, min(128, 4096 // block_p))
    batch = cu_seqlens.shape[0] - 1
    search_steps = max(1, math.ceil(math.log2(max(batch, 1))) + 1)
    use_positions = positions is not None
    grid = (triton.cdiv(total_tokens, block_m),)
    log2_theta, log2_theta_lo = log2_theta_parts(theta)
    # 8 warps: with 4, a thread holds 32 cos/sin pairs and spilled 32 B on sm_80 at head_dim 128
    # (168 registers; 114 with 8 warps and no spill; triton 3.8).
    rope3d_kernel[grid](
        x, out,
        cu_seqlens, grid_thw if grid_thw is not None else cu_seqlens, positions if use_positions else x,
        total_tokens=total_tokens, nheads=nheads, batch=batch, search_steps=search_steps,
        stride_x_tok=x.stride(0), stride_x_head=x.stride(1), stride_o_tok=out.stride(0), stride_o_head=out.stride(1),
        n_t=sections[0], n_h=sections[1], n_w=sections[2], log2_theta=log2_theta, log2_theta_lo=log2_theta_lo,
        sign=-1.0 if inverse else 1.0,
        HALF=half, BLOCK_M=block_m, BLOCK_P=block_p,
        INTERLEAVED=interleaved, USE_POSITIONS=use_positions, num_warps=8,
    )
    return out
