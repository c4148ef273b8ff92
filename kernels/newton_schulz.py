"""Newton-Schulz iteration in Triton: three kernels per step, each batched over matrices.

For a batch of wide matrices X (batch, p, q), p <= q, one step is
    A = X X^T             syrk_kernel (symmetric: only tiles (i, j) with i >= j are computed,
                          each stored at (i, j) and mirrored to (j, i))
    B = b A + c A A       syrk_kernel again: A is symmetric, so (A A)[i, j] = sum_k A[i, k] A[j, k]^T
                          is the same row-by-row product as X X^T, with the b A term fused
                          into its epilogue
    X' = a X + B X        gemm_kernel: one GEMM whose epilogue adds a X
The first step reads the input and multiplies it by its per-matrix 1/||X||_F on load, so the
normalisation costs no pass of its own. Operands are held in the buffers' dtype (bf16, fp16 or
fp32) and every product accumulates in fp32; fp32 operands use IEEE fp32 products (no TF32).
Program ids give (tile, matrix); every offset is int64.

Specialisation: p and q (and the strides derived from them) stay specialised on purpose: they are
the shapes of a model's weight matrices, fixed for a whole training run, so each shape compiles
once, and divisibility by 16 buys aligned vector loads. The batch size is a grid dimension, not
an argument. Tile configurations are chosen per device from its shared-memory limit (_config).
"""

import torch
import triton
import triton.language as tl

from . import device_info, interpreter


@triton.jit
def _triangle_tile(t):
    """(i, j), j <= i, of the t-th tile of a lower triangle in row-major order (t = i (i + 1) / 2 + j)."""
    i = ((tl.sqrt(8.0 * t.to(tl.float32) + 1.0) - 1.0) * 0.5).to(tl.int64)
    # The float square root can be off by one near perfect squares: fix it up exactly.
    i = tl.where((i + 1) * (i + 2) // 2 <= t, i + 1, i)
    i = tl.where(i * (i + 1) // 2 > t, i - 1, i)
    j = t - i * (i + 1) // 2
    return i, j


@triton.jit
def syrk_kernel(
    x_ptr, c_ptr, out_ptr, scale_ptr,
    p, q,
    stride_xb, stride_xr, stride_xc,
    alpha, beta,
    BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_C: tl.constexpr, HAS_SCALE: tl.constexpr, IEEE: tl.constexpr,
):
    """out = alpha * s^2 X X^T (+ beta * C) for the lower-triangle tile of this program, mirrored.

    X is (batch, p, q) with any strides; C and out are contiguous (batch, p, p); s is the
    per-matrix scale (1 unless HAS_SCALE). Operands are rounded to out's dtype before each product.
    """
    t = tl.program_id(0).to(tl.int64)
    bidx = tl.program_id(1).to(tl.int64)
    ti, tj = _triangle_tile(t)
    dtype = out_ptr.dtype.element_ty
    rows_i = ti * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    rows_j = tj * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    ks = tl.arange(0, BLOCK_K).to(tl.int64)
    x_base = x_ptr + bidx * stride_xb
    mask_i = rows_i < p
    mask_j = rows_j < p
    if HAS_SCALE:
        s = tl.load(scale_ptr + bidx)
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for k0 in range(0, q, BLOCK_K):
        kk = k0 + ks
        mk = kk < q
        xi = tl.load(x_base + rows_i[:, None] * stride_xr + kk[None, :] * stride_xc,
                     mask=mask_i[:, None] & mk[None, :], other=0.0)
        xj = tl.load(x_base + rows_j[:, None] * stride_xr + kk[None, :] * stride_xc,
                     mask=mask_j[:, None] & mk[None, :], other=0.0)
        if HAS_SCALE:
            xi = (xi.to(tl.float32) * s).to(dtype)
            xj = (xj.to(tl.float32) * s).to(dtype)
        else:
            xi = xi.to(dtype)
            xj = xj.to(dtype)
        if IEEE:
            acc = tl.dot(xi, tl.trans(xj), acc, input_precision="ieee")
        else:
            acc = tl.dot(xi, tl.trans(xj), acc)
    acc = acc * alpha
    mask = mask_i[:, None] & mask_j[None, :]
    if HAS_C:
        cval = tl.load(c_ptr + bidx * p * p + rows_i[:, None] * p + rows_j[None, :], mask=mask, other=0.0)
        acc = acc + beta * cval.to(tl.float32)
    res = acc.to(dtype)
    o_base = out_ptr + bidx * p * p
    tl.store(o_base + rows_i[:, None] * p + rows_j[None, :], res, mask=mask)
    if ti != tj:
        # The mirror tile (j, i) is the transpose: stored from the same registers.
        tl.store(o_base + rows_j[None, :] * p + rows_i[:, None], res, mask=mask)


@triton.jit
def gemm_kernel(
    b_ptr, x_ptr, out_ptr, scale_ptr,
    p, q,
    stride_xb, stride_xr, stride_xc,
    stride_ob, stride_or, stride_oc,
    a_coef,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_SCALE: tl.constexpr, IEEE: tl.constexpr,
):
    """out = a * sX + B (sX) for one (BLOCK_M, BLOCK_N) tile; B contiguous (batch, p, p), X and out strided."""
    pid = tl.program_id(0).to(tl.int64)
    bidx = tl.program_id(1).to(tl.int64)
    n_tiles_n = (q + BLOCK_N - 1) // BLOCK_N
    tm = pid // n_tiles_n
    tn = pid % n_tiles_n
    dtype = out_ptr.dtype.element_ty
    rows = tm * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    cols = tn * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    ks = tl.arange(0, BLOCK_K).to(tl.int64)
    mask_r = rows < p
    mask_c = cols < q
    b_base = b_ptr + bidx * p * p
    x_base = x_ptr + bidx * stride_xb
    if HAS_SCALE:
        s = tl.load(scale_ptr + bidx)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, p, BLOCK_K):
        kk = k0 + ks
        mk = kk < p
        bt = tl.load(b_base + rows[:, None] * p + kk[None, :], mask=mask_r[:, None] & mk[None, :], other=0.0)
        xt = tl.load(x_base + kk[:, None] * stride_xr + cols[None, :] * stride_xc,
                     mask=mk[:, None] & mask_c[None, :], other=0.0)
        if HAS_SCALE:
            xt = (xt.to(tl.float32) * s).to(dtype)
        else:
            xt = xt.to(dtype)
        if IEEE:
            acc = tl.dot(bt.to(dtype), xt, acc, input_precision="ieee")
        else:
            acc = tl.dot(bt.to(dtype), xt, acc)
    mask = mask_r[:, None] & mask_c[None, :]
    xe = tl.load(x_base + rows[:, None] * stride_xr + cols[None, :] * stride_xc, mask=mask, other=0.0)
    if HAS_SCALE:
        xe = (xe.to(tl.float32) * s).to(dtype)
    acc = acc + a_coef * xe.to(tl.float32)
    tl.store(out_ptr + bidx * stride_ob + rows[:, None] * stride_or + cols[None, :] * stride_oc,
             acc.to(dtype), mask=mask)


@triton.jit
def scale_kernel(x_ptr, out_ptr, scale_ptr, p, q, stride_xb, stride_xr, stride_xc,
                 stride_ob, stride_or, stride_oc, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """out = s X (steps = 0: the normalised input)."""
    pid = tl.program_id(0).to(tl.int64)
    bidx = tl.program_id(1).to(tl.int64)
    n_tiles_n = (q + BLOCK_N - 1) // BLOCK_N
    rows = (pid // n_tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    cols = (pid % n_tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    mask = (rows < p)[:, None] & (cols < q)[None, :]
    s = tl.load(scale_ptr + bidx)
    x = tl.load(x_ptr + bidx * stride_xb + rows[:, None] * stride_xr + cols[None, :] * stride_xc, mask=mask)
    tl.store(out_ptr + bidx * stride_ob + rows[:, None] * stride_or + cols[None, :] * stride_oc,
             (x.to(tl.float32) * s).to(out_ptr.dtype.element_ty), mask=mask)


_MAX_GRID_Y = 65535  # CUDA's limit on grid.y: larger batches go in chunks


#: Candidates per operand size, in order of preference: syrk (BLOCK, BLOCK_K, warps, stages) and
#: gemm (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages).
SYRK_CONFIGS = {
    2: ((128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3), (64, 32, 4, 2)),
    4: ((64, 32, 4, 3), (64, 32, 4, 2), (32, 32, 4, 2)),
}
GEMM_CONFIGS = {
    2: ((128, 128, 64, 8, 3), (128, 128, 64, 8, 2), (64, 64, 64, 4, 3), (64, 64, 32, 4, 2)),
    4: ((64, 64, 32, 4, 3), (64, 64, 32, 4, 2), (32, 32, 32, 4, 2)),
}
_MARGIN = 4096  # bytes of slack on top of the tile formula


def syrk_shared_bytes(block: int, block_k: int, warps: int, stages: int, elem: int) -> int:
    """Upper bound of the syrk kernel's shared memory: `stages` buffers of both row tiles."""
    return elem * stages * 2 * block * block_k + _MARGIN


def gemm_shared_bytes(block_m: int, block_n: int, block_k: int, warps: int, stages: int, elem: int) -> int:
    """Upper bound of the gemm kernel's shared memory: `stages` buffers of the B and X tiles."""
    return elem * stages * (block_m + block_n) * block_k + _MARGIN


def _config(dtype: torch.dtype, limit: int, interpreted: bool) -> dict:
    if interpreted:
        # Small tiles so that the tests' small matrices still span several triangle tiles.
        return dict(syrk=(16, 32, 1, 1), gemm=(16, 32, 32, 1, 1))
    elem = 4 if dtype == torch.float32 else 2
    syrk = device_info.pick_config(SYRK_CONFIGS[elem], lambda c: syrk_shared_bytes(*c, elem), limit)
    gemm = device_info.pick_config(GEMM_CONFIGS[elem], lambda c: gemm_shared_bytes(*c, elem), limit)
    return dict(syrk=syrk, gemm=gemm)


def newton_schulz(X, out, inv_norm, triples):
    """NS of X (batch, p, q), p <= q, into out (same shape, any strides; may alias nothing).

    inv_norm: fp32 (batch,) 1 / max(||X_i||_F, eps). triples: per-step (a, b, c).
    """
    batch, p, q = X.shape
    if batch == 0 or p == 0 or q == 0:
        return out
    cfg = _config(out.dtype, device_info.shared_memory_limit(X.device), interpreter())
    dtype = out.dtype
    dev = X.device
    ieee = dtype == torch.float32
    inv_norm = inv_norm.to(torch.float32).contiguous()

    def chunks():
        for start in range(0, batch, _MAX_GRID_Y):
            yield start, min(batch, start + _MAX_GRID_Y)

    if len(triples) == 0:
        bm, bn = 32, 32
        for s0, s1 in chunks():
            xs, os_ = X[s0:s1], out[s0:s1]
            scale_kernel[(triton.cdiv(p, bm) * triton.cdiv(q, bn), s1 - s0)](
                xs, os_, inv_norm[s0:s1], p=p, q=q,
                stride_xb=xs.stride(0), stride_xr=xs.stride(1), stride_xc=xs.stride(2),
                stride_ob=os_.stride(0), stride_or=os_.stride(1), stride_oc=os_.stride(2),
                BLOCK_M=bm, BLOCK_N=bn)
        return out

    gram = torch.empty((batch, p, p), dtype=dtype, device=dev)
    poly = torch.empty((batch, p, p), dtype=dtype, device=dev)
    scratch_a = torch.empty((batch, p, q), dtype=dtype, device=dev)
    # Steps alternate between two buffers and the last one writes out; out itself is the
    # second buffer when it is contiguous (wide input), otherwise a contiguous scratch is.
    scratch_b = out if out.is_contiguous() else torch.empty((batch, p, q), dtype=dtype, device=dev)
    steps = len(triples)
    sblock, sblock_k, swarps, sstages = cfg["syrk"]
    gm, gn, gk, gwarps, gstages = cfg["gemm"]
    n_tri = triton.cdiv(p, sblock) * (triton.cdiv(p, sblock) + 1) // 2
    n_gemm = triton.cdiv(p, gm) * triton.cdiv(q, gn)
    src = X
    for step, (a, b, c) in enumerate(triples):
        if step == steps - 1:
            dst = out
        else:
            dst = scratch_a if (steps - 1 - step) % 2 == 1 else scratch_b
        first = step == 0
        for s0, s1 in chunks():
            xs, ds = src[s0:s1], dst[s0:s1]
            inv = inv_norm[s0:s1]
            nb = s1 - s0
            g, pl = gram[s0:s1], poly[s0:s1]
            # A = s^2 X X^T
            syrk_kernel[(n_tri, nb)](
                xs, g, g, inv, p=p, q=q,
                stride_xb=xs.stride(0), stride_xr=xs.stride(1), stride_xc=xs.stride(2), alpha=1.0, beta=0.0,
                BLOCK=sblock, BLOCK_K=sblock_k, HAS_C=False, HAS_SCALE=first, IEEE=ieee,
                num_warps=swarps, num_stages=sstages)
            # B = c A A + b A
            syrk_kernel[(n_tri, nb)](
                g, g, pl, inv, p=p, q=p,
                stride_xb=g.stride(0), stride_xr=g.stride(1), stride_xc=g.stride(2), alpha=float(c), beta=float(b),
                BLOCK=sblock, BLOCK_K=sblock_k, HAS_C=True, HAS_SCALE=False, IEEE=ieee,
                num_warps=swarps, num_stages=sstages)
            # X' = a sX + B sX
            gemm_kernel[(n_gemm, nb)](
                pl, xs, ds, inv, p=p, q=q,
                stride_xb=xs.stride(0), stride_xr=xs.stride(1), stride_xc=xs.stride(2),
                stride_ob=ds.stride(0), stride_or=ds.stride(1), stride_oc=ds.stride(2), a_coef=float(a),
                BLOCK_M=gm, BLOCK_N=gn, BLOCK_K=gk, HAS_SCALE=first, IEEE=ieee,
                num_warps=gwarps, num_stages=gstages)
        src = dst
    return out


__all__ = ["newton_schulz", "syrk_kernel", "gemm_kernel", "scale_kernel"]
