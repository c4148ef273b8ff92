"""Blockwise SigLIP sigmoid loss in Triton: one tiled pass, used twice (row pass, column pass).

A pass takes A (Na, D), B (Nb, D). Program p owns rows [p*BM, (p+1)*BM) of A and walks all of B
in BN-row tiles. Per tile it recomputes S = A_blk B_tile^T with tl.dot (fp32 accumulation),
logits = t*S + b, and in registers: softplus(-z*logits) (the loss), G = sigmoid(logits) - [z=+1],
sum(G*S) (dt) and sum(G) (db); with a gradient it also accumulates dA_blk += G B_tile (tl.dot).
Nothing of size Na x Nb is ever stored; each program writes only its rows of dA and three partial
sums, so the result is deterministic (no atomics).

- Row pass (A = X, B = Y): loss, dt, db and dX. Column pass (A = Y, B = X, ids swapped): dY.
  The logits matrix is symmetric in the roles, so one kernel serves both.
- FLOPs: a pass is 2*Na*Nb*D (S) + 2*Na*Nb*D (G B) = 4*Na*Nb*D; forward with gradient (row pass)
  + backward (column pass) = 8*N*M*D, forward alone (no gradient) 2*N*M*D. Element-wise work is
  O(N*M) (one exp and one log per pair). Compare a dense autograd loss: 6*N*M*D and O(N*M) memory.
- Memory: O((Na + Nb) * D); for D > MAX_FULL_D an fp32 workspace of Na x D holds dA while it
  accumulates (read and written only by the program that owns the rows).
- D <= MAX_FULL_D: the A block (BM x D) stays in registers and each B tile is loaded once for
  both dots. Larger D: S accumulates over BK-wide chunks of D, and dA is updated chunk by chunk
  in the workspace. fp32 inputs use IEEE fp32 dots (no TF32); G is cast to the input dtype
  before G B (fp16/bf16 tensor cores), accumulation in fp32.
"""

import triton
import triton.language as tl

from . import device_info

MAX_FULL_D = 256


@triton.jit
def _tile_terms(s, rows, cols, row_ok, col_ok, a_id, b_ids_ptr, scale, bias, HAS_IDS: tl.constexpr):
    """Per pair of a (BM, BN) tile of S: masked softplus(-z*logits) and G (0 outside the matrix)."""
    logits = scale * s + bias
    if HAS_IDS:
        b_id = tl.load(b_ids_ptr + cols, mask=col_ok, other=-1)
        pos = a_id[:, None] == b_id[None, :]
    else:
        pos = rows[:, None] == cols[None, :]
    valid = row_ok[:, None] & col_ok[None, :]
    u = tl.where(pos, -logits, logits)
    # One exp per pair, never of a positive number: e = exp(-|logits|) = exp(-|u|);
    # softplus(u) = max(u, 0) + log(1 + e), sigmoid(logits) = (logits >= 0 ? 1 : e) / (1 + e).
    e = tl.exp(-tl.abs(logits))
    sp = tl.maximum(u, 0.0) + tl.log(1.0 + e)
    g = tl.where(logits >= 0, 1.0, e) / (1.0 + e) - tl.where(pos, 1.0, 0.0)
    sp = tl.where(valid, sp, 0.0)
    g = tl.where(valid, g, 0.0)
    return sp, g


# NA and NB change with every batch: never specialised (Triton would compile a new variant the
# first time a batch size is divisible by 16, or is 1). D and the strides are fixed by the model.
@triton.jit(do_not_specialize=["NA", "NB"])
def sigmoid_loss_pass_kernel(
    a_ptr, b_ptr, a_ids_ptr, b_ids_ptr, scale_ptr, bias_ptr,
    da_ptr, ws_ptr, part_ptr,
    NA, NB, D,
    stride_a, stride_b, stride_da, stride_ws,
    inv_norm,
    HAS_IDS: tl.constexpr, WITH_GRAD: tl.constexpr, FULL_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_ok = rows < NA
    offs_n = tl.arange(0, BLOCK_N).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    scale = tl.load(scale_ptr).to(tl.float32)
    bias = tl.load(bias_ptr).to(tl.float32)
    if HAS_IDS:
        a_id = tl.load(a_ids_ptr + rows, mask=row_ok, other=-2)
    else:
        a_id = rows
    # Per-row partial sums (not BM x BN tiles: three fp32 tiles held across the loop spilled).
    loss_t = tl.zeros((BLOCK_M,), dtype=tl.float32)
    dt_t = tl.zeros((BLOCK_M,), dtype=tl.float32)
    db_t = tl.zeros((BLOCK_M,), dtype=tl.float32)

    if FULL_D:
        k_ok = offs_k < D
        a = tl.load(a_ptr + rows[:, None] * stride_a + offs_k[None, :], mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0)
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for j0 in range(0, NB, BLOCK_N):
            cols = j0 + offs_n
            col_ok = cols < NB
            b = tl.load(b_ptr + cols[:, None] * stride_b + offs_k[None, :], mask=col_ok[:, None] & k_ok[None, :],
                        other=0.0)
            s = tl.dot(a, tl.trans(b), input_precision=DOT_PRECISION)
            sp, g = _tile_terms(s, rows, cols, row_ok, col_ok, a_id, b_ids_ptr, scale, bias, HAS_IDS)
            loss_t += tl.sum(sp, axis=1)
            dt_t += tl.sum(g * s, axis=1)
            db_t += tl.sum(g, axis=1)
            if WITH_GRAD:
                acc += tl.dot(g.to(b.dtype), b, input_precision=DOT_PRECISION)
        if WITH_GRAD:
            coef = scale * inv_norm
            tl.store(da_ptr + rows[:, None] * stride_da + offs_k[None, :],
                     (acc * coef).to(da_ptr.dtype.element_ty), mask=row_ok[:, None] & k_ok[None, :])
    else:
        for j0 in range(0, NB, BLOCK_N):
            cols = j0 + offs_n
            col_ok = cols < NB
            s = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, D, BLOCK_K):
                kk = k0 + offs_k
                k_ok = kk < D
                a = tl.load(a_ptr + rows[:, None] * stride_a + kk[None, :], mask=row_ok[:, None] & k_ok[None, :],
                            other=0.0)
                b = tl.load(b_ptr + cols[:, None] * stride_b + kk[None, :], mask=col_ok[:, None] & k_ok[None, :],
                            other=0.0)
                s += tl.dot(a, tl.trans(b), input_precision=DOT_PRECISION)
            sp, g = _tile_terms(s, rows, cols, row_ok, col_ok, a_id, b_ids_ptr, scale, bias, HAS_IDS)
            loss_t += tl.sum(sp, axis=1)
            dt_t += tl.sum(g * s, axis=1)
            db_t += tl.sum(g, axis=1)
            if WITH_GRAD:
                gc = g.to(b_ptr.dtype.element_ty)
                for k0 in range(0, D, BLOCK_K):
                    kk = k0 + offs_k
                    k_ok = kk < D
                    mask = row_ok[:, None] & k_ok[None, :]
                    b = tl.load(b_ptr + cols[:, None] * stride_b + kk[None, :],
                                mask=col_ok[:, None] & k_ok[None, :], other=0.0)
                    w_ptrs = ws_ptr + rows[:, None] * stride_ws + kk[None, :]
                    w = tl.load(w_ptrs, mask=mask, other=0.0)
                    w += tl.dot(gc, b, input_precision=DOT_PRECISION)
                    tl.store(w_ptrs, w, mask=mask)
                # The next tile reads these rows back, possibly in other threads of the program.
                tl.debug_barrier()
        if WITH_GRAD:
            coef = scale * inv_norm
            for k0 in range(0, D, BLOCK_K):
                kk = k0 + offs_k
                mask = row_ok[:, None] & (kk < D)[None, :]
                w = tl.load(ws_ptr + rows[:, None] * stride_ws + kk[None, :], mask=mask, other=0.0)
                tl.store(da_ptr + rows[:, None] * stride_da + kk[None, :], (w * coef).to(da_ptr.dtype.element_ty),
                         mask=mask)

    tl.store(part_ptr + pid * 3 + 0, tl.sum(loss_t, axis=0))
    tl.store(part_ptr + pid * 3 + 1, tl.sum(dt_t, axis=0))
    tl.store(part_ptr + pid * 3 + 2, tl.sum(db_t, axis=0))


#: Resident-A (D <= MAX_FULL_D) tilings in order of preference: (BLOCK_M, BLOCK_N, num_stages).
FULL_D_CONFIGS = ((64, 64, 3), (64, 64, 2), (64, 32, 2), (32, 32, 2))
#: The same for BLOCK_K = 256 (8 warps): a 64-row A block with its dA spilled on sm_90 (240 B per
#: thread with 64 x 64 tiles, 16 B with 64 x 32); 32 x 64 compiles without local memory.
WIDE_FULL_D_CONFIGS = ((32, 64, 2), (32, 32, 2))
#: fp32 inputs (IEEE dots on CUDA cores: the operands of a dot live in registers, not shared memory):
#: small tiles, or the A block (BM x D) and dA (BM x D fp32) do not fit in registers. 64 x 64 tiles
#: compiled for sm_90 into 32-register code with tens of KB of local memory per thread (and
#: 4-22 s compiles); fp32 is the correctness path, not the fast one.
FP32_FULL_D_CONFIGS = ((16, 16, 2),)
#: Chunked-D tiling (larger D, or when no resident tiling fits): (BLOCK_M, BLOCK_N, BLOCK_K, num_stages).
CHUNKED_CONFIGS = ((64, 64, 64, 3), (64, 64, 32, 2), (32, 32, 32, 2))
_MARGIN = 4096  # bytes of slack on top of the measured tile formula


def _buffers(stages: int, elem: int, sm: int) -> int:
    """Pipelined copies of each streamed tile: `stages` for 16-bit dots on sm_90 (wgmma
    operands), `stages - 1` otherwise (measured, tests/test_launch_limits.py)."""
    return stages if (sm >= 90 and elem == 2) else max(stages - 1, 1)


def full_d_shared_bytes(block_m: int, block_n: int, block_k: int, stages: int, elem: int, sm: int) -> int:
    """Upper bound of the resident-A kernel's shared memory: the A block, the pipelined B tiles and
    the G tile's layout conversion, plus slack."""
    buffers = _buffers(stages, elem, sm)
    return elem * (block_m * block_k + buffers * block_n * block_k + block_m * block_n) + _MARGIN


def chunked_shared_bytes(block_m: int, block_n: int, block_k: int, stages: int, elem: int, sm: int) -> int:
    """Upper bound of the chunked-D kernel's shared memory: pipelined A and B chunks, the G tile."""
    buffers = _buffers(stages, elem, sm)
    return elem * (buffers * (block_m + block_n) * block_k + block_m * block_n) + _MARGIN


def choose_config(d: int, elem: int, limit: int, sm: int = 80) -> dict:
    """The launch configuration for embedding dim d, element size elem (bytes), within `limit`
    bytes of shared memory per program on compute capability `sm` (90 for sm_90): resident A
    when D <= MAX_FULL_D and a tiling fits, else D in chunks."""
    if d <= MAX_FULL_D:
        block_k = max(16, triton.next_power_of_2(d))
        configs = FULL_D_CONFIGS if block_k < 256 else WIDE_FULL_D_CONFIGS
        for bm, bn, stages in configs if elem == 2 else FP32_FULL_D_CONFIGS:
            if full_d_shared_bytes(bm, bn, block_k, stages, elem, sm) <= limit:
                return dict(FULL_D=True, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=block_k, num_stages=stages,
                            num_warps=8 if block_k >= 256 and elem == 2 else 4)
    cfg = device_info.pick_config(CHUNKED_CONFIGS, lambda c: chunked_shared_bytes(*c, elem, sm), limit)
    bm, bn, bk, stages = cfg
    return dict(FULL_D=False, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_stages=stages, num_warps=4)


def sigmoid_loss_pass(a, b, scale, bias, a_ids, b_ids, inv_norm, da):
    """One pass (see the module docstring); arguments validated by sigvlp.ops.sigmoid_loss.

    a (Na, D), b (Nb, D) row-contiguous, same dtype; scale, bias float32 1-element tensors;
    a_ids/b_ids int64 or None (diagonal); da (Na, D) output or None.
    Returns float32 0-d tensors (loss, dscale, dbias), each already multiplied by inv_norm.
    The tiling is chosen for the device's shared-memory limit (choose_config).
    """
    import torch  # noqa: PLC0415

    na, d = a.shape
    nb = b.shape[0]
    cfg = choose_config(d, a.element_size(), device_info.shared_memory_limit(a.device), device_info.arch(a.device))
    full_d = cfg.pop("FULL_D")
    grid = (triton.cdiv(na, cfg["BLOCK_M"]),)
    partials = torch.empty(grid[0], 3, dtype=torch.float32, device=a.device)
    with_grad = da is not None
    ws = None
    if with_grad and not full_d:
        ws = torch.zeros(na, d, dtype=torch.float32, device=a.device)
    has_ids = a_ids is not None
    sigmoid_loss_pass_kernel[grid](
        a, b, a_ids if has_ids else a, b_ids if has_ids else b, scale, bias,
        da if with_grad else a, ws if ws is not None else partials, partials,
        NA=na, NB=nb, D=d,
        stride_a=a.stride(0), stride_b=b.stride(0), stride_da=da.stride(0) if with_grad else 0,
        stride_ws=ws.stride(0) if ws is not None else 0,
        inv_norm=float(inv_norm),
        HAS_IDS=has_ids, WITH_GRAD=with_grad, FULL_D=full_d,
        DOT_PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
        **cfg,
    )
    sums = partials.sum(dim=0) * inv_norm  # fixed-order: deterministic
    return sums[0], sums[1], sums[2]
