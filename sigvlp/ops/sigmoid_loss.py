"""sigvlp.ops.sigmoid_loss: SigLIP's pairwise sigmoid loss, blockwise (never the N x M logits).

Semantics (the spec; `sigmoid_loss_reference` is its readable blockwise form):
- image_emb x (N, D), text_emb y (M, D), same float dtype and device, used as given.
- logits_ij = t * <x_i, y_j> + b with t = logit_scale (already exponentiated, as open_clip's
  SigLipLoss receives it) and b = logit_bias, both scalar tensors.
- z_ij = +1 where image_ids[i] == text_ids[j], else -1; default ids are arange (the diagonal,
  N == M). Equal ids mark every such pair positive (identical texts are not negatives).
- loss = -(1/N) * sum_ij log sigmoid(z_ij * logits_ij) = (1/N) * sum_ij softplus(-z_ij * logits_ij),
  accumulated in fp32; returned as a float32 scalar.
- Gradient: with G = sigmoid(logits) - [z = +1] and S = X Y^T,
  dX = (t/N) G Y, dY = (t/N) G^T X, dt = sum(G * S) / N, db = sum(G) / N.

Design: one "pass" over a row block of A against all rows of B computes the block's share of the
loss, of dt and db, and (optionally) dA = (t/N) G B, with the logits tile recomputed on the fly.
The forward (when a gradient is needed) is the row pass A = X, B = Y (loss and dX); the backward
adds the column pass A = Y, B = X (dY; the logits are symmetric in the roles). 8 N M D FLOPs for
forward + backward, deterministic (no atomics), extra memory O((N + M) D).

Distributed (process_group): each rank passes its local rows; every rank's texts are candidates
for every rank's images. Rank r returns (W / N_global) * sum over its local rows (W ranks), so the
mean of the per-rank losses is the global loss and, after DDP's gradient averaging, gradients equal
the single-process ones on the concatenated global batch. Loss and gradients decompose over text
blocks with no row statistics, so the texts never need to be in one place:
- dist_impl="ring" (default): each rank's text block (embeddings, plus ids when given) travels
  around a ring with isend/irecv (rank r sends to r+1, receives from r-1). At step s rank r holds
  the block of rank r-s, and the transfer of the next block is posted before the current one is
  computed, so communication overlaps compute. Per block it runs the single-process row pass
  (loss, dX, dt, db of its local images against the block; the same backend selection, so the
  Triton/CUDA kernels serve each block) and, when text_emb needs a gradient, the column pass
  (the block's dY from the local images). dY travels with its block as an fp32 accumulator: each
  rank adds its contribution and passes it on, and after W steps the completed dY is back at the
  block's owner. The accumulator is filled in the forward; the backward scales it by the loss
  gradient when that is the same on every rank (checked with one scalar all-reduce; DDP and loss
  scalers give equal ones) and otherwise runs the dY ring again, each rank weighting its
  contribution by its own loss gradient. Memory: the local rows plus at most two remote blocks
  (the one computed on and the one arriving) and two dY accumulators, whatever the world size;
  besides the row counts nothing is all-gathered. Every rank must call it with the same
  requires_grad pattern (the rings are collective).
- dist_impl="gather": texts (and ids) of all ranks are all-gathered with autograd (the backward
  all-reduces the text gradient and keeps the local slice): O(global M * D) text memory.
"""

from __future__ import annotations

from typing import Optional

import torch

from sigvlp.ops import _checks
from sigvlp.ops import _cuda
from sigvlp.ops._backend import FLOAT_DTYPES, Backend, BackendSet, empty_output, resolve_request

__all__ = ["sigmoid_loss", "sigmoid_loss_reference", "sigmoid_loss_dense"]

ID_DTYPES = (torch.int32, torch.int64)
SCALAR_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
DIST_IMPLS = ("ring", "gather")

#: elements of one logits block in the torch reference (rows per block = this // M, at least 1)
REFERENCE_BLOCK_ELEMENTS = 1 << 20


# ----------------------------------------------------------------------------- reference


def sigmoid_loss_dense(image_emb, text_emb, logit_scale, logit_bias, image_ids=None, text_ids=None):
    """The dense formula (materialises N x M logits), differentiable by autograd, in the inputs'
    dtype: the baseline and, in float64, the exact oracle."""
    n, m = image_emb.shape[0], text_emb.shape[0]
    logits = logit_scale * (image_emb @ text_emb.T) + logit_bias
    if image_ids is None:
        pos = torch.eye(n, m, dtype=torch.bool, device=image_emb.device)
    else:
        pos = image_ids[:, None] == text_ids[None, :]
    z = pos.to(logits.dtype) * 2 - 1
    return -torch.nn.functional.logsigmoid(z * logits).sum() / n


def _pass_torch(a, b, scale, bias, a_ids, b_ids, inv_norm, da):
    """One blockwise pass (see the module docstring): returns fp32 (loss, dscale, dbias) and fills
    `da` (if given) with (t * inv_norm) * G B. Blocks of rows keep memory at O(block * M)."""
    na, nb = a.shape[0], b.shape[0]
    bf = b.to(torch.float32)
    t = scale.reshape(()).to(torch.float32)
    bb = bias.reshape(()).to(torch.float32)
    rows = max(1, REFERENCE_BLOCK_ELEMENTS // max(nb, 1))
    loss = torch.zeros((), dtype=torch.float64, device=a.device)
    dt = torch.zeros((), dtype=torch.float64, device=a.device)
    db = torch.zeros((), dtype=torch.float64, device=a.device)
    cols = torch.arange(nb, device=a.device)
    coef = t * inv_norm
    for r0 in range(0, na, rows):
        r1 = min(na, r0 + rows)
        s = a[r0:r1].to(torch.float32) @ bf.T
        logits = torch.addcmul(bb, s, t)  # t * s + b, fp32
        if a_ids is None:
            pos = torch.arange(r0, r1, device=a.device)[:, None] == cols[None, :]
        else:
            pos = a_ids[r0:r1, None] == b_ids[None, :]
        loss += torch.nn.functional.softplus(torch.where(pos, -logits, logits)).sum(dtype=torch.float64)
        g = torch.sigmoid(logits).sub_(pos.to(torch.float32))
        db += g.sum(dtype=torch.float64)
        dt += (g * s).sum(dtype=torch.float64)
        del s, logits, pos
        if da is not None:
            da[r0:r1] = (g @ bf).mul_(coef).to(da.dtype)
    return (loss * inv_norm).float(), (dt * inv_norm).float(), (db * inv_norm).float()


def sigmoid_loss_reference(image_emb, text_emb, logit_scale, logit_bias, image_ids=None, text_ids=None):
    """Readable blockwise loss value (no autograd), fp32 accumulation: the CPU path's forward."""
    with torch.no_grad():
        loss, _, _ = _pass_torch(image_emb, text_emb, logit_scale, logit_bias, image_ids, text_ids,
                                 1.0 / image_emb.shape[0], None)
    return loss


# ----------------------------------------------------------------------------- backends
# A runner does one pass: run(a, b, scale, bias, a_ids, b_ids, inv_norm, da) -> (loss, dscale,
# dbias) float32 0-d tensors, and writes da = d(loss)/da when da is not None. scale and bias are
# float32 1-element tensors; ids are contiguous int64 or None (the diagonal).


def _run_torch(a, b, scale, bias, a_ids, b_ids, inv_norm, da):
    return _pass_torch(a, b, scale, bias, a_ids, b_ids, inv_norm, da)


def _run_triton(a, b, scale, bias, a_ids, b_ids, inv_norm, da):
    from sigvlp.kernels import sigmoid_loss as triton_sl  # noqa: PLC0415 (Triton loads on first use)

    return triton_sl.sigmoid_loss_pass(a, b, scale, bias, a_ids, b_ids, inv_norm, da)


CUDA_BLOCK = 64  # rows of A per CTA and tile width of the CUDA kernel (csrc/sigmoid_loss.cu)


def _run_cuda(a, b, scale, bias, a_ids, b_ids, inv_norm, da):
    na, d = a.shape
    blocks = -(-na // CUDA_BLOCK)
    workspace = None
    if da is not None:
        d_pad = -(-d // CUDA_BLOCK) * CUDA_BLOCK
        workspace = torch.zeros(blocks * CUDA_BLOCK, d_pad, dtype=torch.float32, device=a.device)
    partials = torch.empty(blocks, 3, dtype=torch.float32, device=a.device)
    _cuda.module().sigmoid_loss_pass(
        a=_cuda.ptr(a), b=_cuda.ptr(b), da=_cuda.ptr(da), workspace=_cuda.ptr(workspace),
        workspace_ld=0 if workspace is None else workspace.stride(0), partials=_cuda.ptr(partials),
        a_ids=_cuda.ptr(a_ids), b_ids=_cuda.ptr(b_ids), scale=_cuda.ptr(scale), bias=_cuda.ptr(bias),
        dtype=_cuda.dtype_code(a.dtype), na=na, nb=b.shape[0], d=d, a_stride=a.stride(0),
        b_stride=b.stride(0), da_stride=0 if da is None else da.stride(0), inv_norm=float(inv_norm),
        stream=_cuda.stream_ptr(a.device),
    )
    sums = partials.sum(dim=0) * inv_norm  # fixed-order reduction: deterministic
    return sums[0], sums[1], sums[2]


BACKENDS = BackendSet("sigmoid_loss", [
    Backend("cuda", _run_cuda),
    Backend("triton", _run_triton),
    Backend("torch", _run_torch),
])


def _prepare(x, scale, bias):
    if x.stride(-1) != 1:
        x = x.contiguous()
    return x, scale.detach().reshape(1).to(torch.float32), bias.detach().reshape(1).to(torch.float32)


# ----------------------------------------------------------------------------- torch ops


@torch.library.custom_op("sigvlp::sigmoid_loss", mutates_args=())
def _sigmoid_loss_op(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor,
                     logit_bias: torch.Tensor, image_ids: Optional[torch.Tensor], text_ids: Optional[torch.Tensor],
                     inv_norm: float, with_grad: bool, backend: str
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, dX, dscale, dbias): the row pass. dX is (N, D) when with_grad, else (0, D)."""
    impl = BACKENDS.select(backend, device=image_emb.device, dtype=image_emb.dtype)
    x, scale, bias = _prepare(image_emb, logit_scale, logit_bias)
    y = text_emb if text_emb.stride(-1) == 1 else text_emb.contiguous()
    dx = empty_output((x.shape[0] if with_grad else 0, x.shape[1]), x.dtype, x.device)
    ids = (None, None) if image_ids is None else (image_ids.contiguous(), text_ids.contiguous())
    loss, dscale, dbias = impl.run(x, y, scale, bias, ids[0], ids[1], inv_norm, dx if with_grad else None)
    return loss.clone(), dx, dscale.clone(), dbias.clone()


@_sigmoid_loss_op.register_fake
def _(image_emb, text_emb, logit_scale, logit_bias, image_ids, text_ids, inv_norm, with_grad, backend):
    n, d = image_emb.shape
    f32 = dict(dtype=torch.float32, device=image_emb.device)
    return (torch.empty((), **f32), image_emb.new_empty((n if with_grad else 0, d)),
            torch.empty((), **f32), torch.empty((), **f32))


@torch.library.custom_op("sigvlp::sigmoid_loss_text_grad", mutates_args=())
def _text_grad_op(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor,
                  logit_bias: torch.Tensor, image_ids: Optional[torch.Tensor], text_ids: Optional[torch.Tensor],
                  inv_norm: float, backend: str) -> torch.Tensor:
    """d(loss)/d(text_emb): the column pass (A = Y, B = X, roles of the ids swapped)."""
    impl = BACKENDS.select(backend, device=text_emb.device, dtype=text_emb.dtype)
    y, scale, bias = _prepare(text_emb, logit_scale, logit_bias)
    x = image_emb if image_emb.stride(-1) == 1 else image_emb.contiguous()
    dy = empty_output(y.shape, y.dtype, y.device)
    ids = (None, None) if image_ids is None else (image_ids.contiguous(), text_ids.contiguous())
    impl.run(y, x, scale, bias, ids[1], ids[0], inv_norm, dy)
    return dy


@_text_grad_op.register_fake
def _(image_emb, text_emb, logit_scale, logit_bias, image_ids, text_ids, inv_norm, backend):
    return torch.empty_like(text_emb, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    x, y, scale, bias, image_ids, text_ids, inv_norm, with_grad, backend = inputs
    _, dx, dscale, dbias = output
    ctx.mark_non_differentiable(dx, dscale, dbias)
    ctx.save_for_backward(x, y, scale, bias, image_ids, text_ids, dx, dscale, dbias)
    ctx.args = (inv_norm, backend)


def _backward(ctx, grad_loss, _grad_dx, _grad_dscale, _grad_dbias):
    x, y, scale, bias, image_ids, text_ids, dx, dscale, dbias = ctx.saved_tensors
    inv_norm, backend = ctx.args
    need = ctx.needs_input_grad
    grad_x = grad_y = grad_scale = grad_bias = None
    if need[0]:
        if dx.shape[0] != x.shape[0]:  # forward ran without the gradient pass: run it now
            dx = _sigmoid_loss_op(x, y, scale, bias, image_ids, text_ids, inv_norm, True, backend)[1]
        grad_x = (dx * grad_loss).to(x.dtype)
    if need[1]:
        grad_y = (_text_grad_op(x, y, scale, bias, image_ids, text_ids, inv_norm, backend) * grad_loss).to(y.dtype)
    if need[2]:
        grad_scale = (dscale * grad_loss).reshape(scale.shape).to(scale.dtype)
    if need[3]:
        grad_bias = (dbias * grad_loss).reshape(bias.shape).to(bias.dtype)
    return grad_x, grad_y, grad_scale, grad_bias, None, None, None, None, None


_sigmoid_loss_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- distributed


class _GatherRows(torch.autograd.Function):
    """All ranks' rows concatenated in rank order (sizes may differ); backward all-reduces the
    gradient and returns this rank's slice (the sum of every rank's contribution to it)."""

    @staticmethod
    def forward(ctx, t, sizes, group):
        import torch.distributed as dist  # noqa: PLC0415

        ctx.group = group
        ctx.sizes = sizes
        ctx.rank = dist.get_rank(group)
        longest = max(sizes)
        padded = t.new_zeros((longest,) + tuple(t.shape[1:]))
        padded[: t.shape[0]] = t
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous(), group=group)
        return torch.cat([p[:s] for p, s in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist  # noqa: PLC0415

        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None, None


def _row_counts(x, y, image_ids, group):
    """Rows per rank, (images, texts), all-gathered (the only collective besides the text exchange)."""
    import torch.distributed as dist  # noqa: PLC0415

    world = dist.get_world_size(group)
    local = torch.tensor([x.shape[0], y.shape[0]], dtype=torch.int64, device=x.device)
    gathered = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(gathered, local, group=group)
    n_sizes = [int(g[0]) for g in gathered]
    m_sizes = [int(g[1]) for g in gathered]
    if image_ids is None and n_sizes != m_sizes:
        raise ValueError(f"image_emb, text_emb: without ids every rank needs as many texts as images; "
                         f"got images per rank {n_sizes}, texts per rank {m_sizes}")
    return n_sizes, m_sizes


def _distributed_inputs(x, y, image_ids, text_ids, group):
    """(Y_global, image_ids, text_ids_global, inv_norm) for this rank's share of the global loss."""
    import torch.distributed as dist  # noqa: PLC0415

    rank = dist.get_rank(group)
    n_sizes, m_sizes = _row_counts(x, y, image_ids, group)
    if image_ids is None:
        start = sum(n_sizes[:rank])
        image_ids = torch.arange(start, start + x.shape[0], dtype=torch.int64, device=x.device)
        text_ids_global = torch.arange(sum(m_sizes), dtype=torch.int64, device=x.device)
    else:
        text_ids_global = _GatherRows.apply(text_ids, m_sizes, group)
    y_global = _GatherRows.apply(y, m_sizes, group)
    return y_global, image_ids, text_ids_global, len(n_sizes) / sum(n_sizes)


_RING_TAG = 0x5160  # p2p tags of the ring: _RING_TAG + 4 * step + (0: texts, 1: text ids, 2: dY)


class _Ring:
    """This rank's place in the ring of `group`: sends go to rank + 1, receives come from rank - 1."""

    def __init__(self, group):
        import torch.distributed as dist  # noqa: PLC0415

        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.next = dist.get_global_rank(group, (self.rank + 1) % self.world)
        self.prev = dist.get_global_rank(group, (self.rank - 1) % self.world)

    def exchange(self, send, recv, tag):
        """Post (asynchronously) sends of `send` to the next rank and receives into `recv` from the
        previous one, tensor k with tag `tag + k`; returns the works to wait on."""
        import torch.distributed as dist  # noqa: PLC0415

        ops = [dist.P2POp(dist.isend, t, self.next, self.group, tag + k) for k, t in enumerate(send)]
        ops += [dist.P2POp(dist.irecv, t, self.prev, self.group, tag + k) for k, t in enumerate(recv)]
        return dist.batch_isend_irecv(ops)


def _wait(works):
    for w in works:
        w.wait()
    return []


def _ring_pass(ring, x, y, x_ids, y_ids, scale, bias, inv_norm, backend, m_sizes, m_offsets, *,
               rows, row_grad, cols, weight=None):
    """One trip of this rank's text block around the ring (see the module docstring).

    x_ids (N_r,) and y_ids (M_r,) are global int64 ids, or y_ids is None for the diagonal (a block's
    ids are then arange(m_offsets[q], + m_sizes[q]) and are not sent). rows: run the row pass
    per block, accumulating loss, dt, db and (row_grad) dX; cols: run the column pass, the dY
    accumulator travelling with the block (contributions times `weight` when given).
    Returns (loss, dx, dt, db, dy): float32, None where not computed; dy is this rank's own block's.
    """
    world, rank, dev = ring.world, ring.rank, x.device
    d = x.shape[1]
    send_ids = y_ids is not None

    def ids_of(q):
        return torch.arange(m_offsets[q], m_offsets[q] + m_sizes[q], dtype=torch.int64, device=dev)

    f64 = dict(dtype=torch.float64, device=dev)
    loss, dt, db = torch.zeros((), **f64), torch.zeros((), **f64), torch.zeros((), **f64)
    dx = torch.zeros(x.shape, dtype=torch.float32, device=dev) if rows and row_grad else None
    block = (y, y_ids if send_ids else ids_of(rank))
    acc_works, acc_in = [], None  # the dY accumulator arriving from the previous rank
    send_works, acc_out = [], None  # the accumulator last sent (kept alive until its send is done)
    dy = None
    for step in range(world):
        q = (rank - step) % world  # owner of the block held now
        qn = (q - 1) % world  # owner of the block (and accumulator) arriving from the previous rank
        tag = _RING_TAG + 4 * step
        block_works, incoming = [], None
        if step < world - 1:  # post the next block's transfer before computing on this one
            incoming = (torch.empty((m_sizes[qn], d), dtype=y.dtype, device=dev),
                        torch.empty(m_sizes[qn], dtype=torch.int64, device=dev) if send_ids else ids_of(qn))
            block_works = ring.exchange(list(block[:2 if send_ids else 1]),
                                        list(incoming[:2 if send_ids else 1]), tag)
        yb, idb = block
        if rows:
            l_b, dx_b, dt_b, db_b = _sigmoid_loss_op(x, yb, scale, bias, x_ids, idb, inv_norm, row_grad, backend)
            loss += l_b
            dt += dt_b
            db += db_b
            if row_grad:
                dx += dx_b
            del dx_b
        if cols:
            contrib = _text_grad_op(x, yb, scale, bias, x_ids, idb, inv_norm, backend).to(torch.float32)
            if weight is not None:
                contrib.mul_(weight)
            if acc_in is not None:  # add this rank's images' share to the block's travelling dY
                acc_works = _wait(acc_works)
                contrib += acc_in
                acc_in = None
            if world == 1:
                dy = contrib
            else:
                send_works = _wait(send_works)  # the previous accumulator has left: drop it
                acc_out = contrib
                acc_in = torch.empty((m_sizes[qn], d), dtype=torch.float32, device=dev)
                works = ring.exchange([acc_out], [acc_in], tag + 2)
                send_works, acc_works = works[:1], works[1:]
            del contrib
        block_works = _wait(block_works)
        del yb, idb
        block = incoming  # the block just computed on is released here
    if cols and world > 1:
        _wait(acc_works)  # after W steps the accumulator of this rank's own block is back: complete
        _wait(send_works)
        dy = acc_in
    return (loss.float() if rows else None, dx, dt.float() if rows else None, db.float() if rows else None, dy)


class _RingLoss(torch.autograd.Function):
    """This rank's share of the global loss with texts exchanged around a ring (module docstring)."""

    @staticmethod
    def forward(ctx, x, y, scale, bias, x_ids, y_ids, inv_norm, backend, group, m_sizes, need):
        ring = _Ring(group)
        m_offsets = [sum(m_sizes[:q]) for q in range(len(m_sizes))]
        s, bb = scale.detach().reshape(1).to(torch.float32), bias.detach().reshape(1).to(torch.float32)
        loss, dx, dt, db, dy = _ring_pass(ring, x, y, x_ids, y_ids, s, bb, inv_norm, backend, m_sizes, m_offsets,
                                          rows=True, row_grad=need[0], cols=need[1])
        ctx.save_for_backward(x, y, x_ids, y_ids, s, bb, dx, dy, dt, db)
        ctx.meta = (ring, inv_norm, backend, m_sizes, m_offsets, scale.shape, scale.dtype, bias.shape, bias.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        import torch.distributed as dist  # noqa: PLC0415

        x, y, x_ids, y_ids, s, bb, dx, dy, dt, db = ctx.saved_tensors
        ring, inv_norm, backend, m_sizes, m_offsets, s_shape, s_dtype, b_shape, b_dtype = ctx.meta
        need = ctx.needs_input_grad
        g = grad_loss.reshape(()).to(torch.float32)
        grad_x = grad_y = grad_scale = grad_bias = None
        if need[0] and dx is not None:
            grad_x = (dx * g).to(x.dtype)
        if need[1] and dy is not None:
            # The accumulated dY sums every rank's contribution with loss gradient 1: scale it when
            # every rank's loss gradient is the same, else redo the dY ring with each rank's own.
            bounds = torch.stack([g, -g])
            dist.all_reduce(bounds, op=dist.ReduceOp.MAX, group=ring.group)
            if bool(bounds[0] == -bounds[1]):
                grad_y = (dy * g).to(y.dtype)
            else:
                grad_y = _ring_pass(ring, x, y, x_ids, y_ids, s, bb, inv_norm, backend, m_sizes, m_offsets,
                                    rows=False, row_grad=False, cols=True, weight=g)[4].to(y.dtype)
        if need[2]:
            grad_scale = (dt * g).reshape(s_shape).to(s_dtype)
        if need[3]:
            grad_bias = (db * g).reshape(b_shape).to(b_dtype)
        return grad_x, grad_y, grad_scale, grad_bias, None, None, None, None, None, None, None


def _ring_loss(x, y, scale, bias, image_ids, text_ids, group, backend):
    import torch.distributed as dist  # noqa: PLC0415

    rank = dist.get_rank(group)
    n_sizes, m_sizes = _row_counts(x, y, image_ids, group)
    if image_ids is None:  # the diagonal of the global batch; text ids are generated per block
        start = sum(n_sizes[:rank])
        image_ids = torch.arange(start, start + x.shape[0], dtype=torch.int64, device=x.device)
    else:
        text_ids = text_ids.contiguous()
    grad = torch.is_grad_enabled()
    need = tuple(grad and t.requires_grad for t in (x, y, scale, bias))
    return _RingLoss.apply(x, y.contiguous(), scale, bias, image_ids.contiguous(), text_ids,
                           len(n_sizes) / sum(n_sizes), backend, group, m_sizes, need)


# ----------------------------------------------------------------------------- public API


def _check_scalar(t, name, device):
    _checks.check_tensor(t, name, dtypes=SCALAR_DTYPES, device=device)
    if t.dim() > 1 or t.numel() != 1:
        raise ValueError(f"{name}: expected a scalar tensor (shape () or (1,)), got shape {tuple(t.shape)}")


def sigmoid_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor,
                 logit_bias: torch.Tensor, *, image_ids: Optional[torch.Tensor] = None,
                 text_ids: Optional[torch.Tensor] = None, process_group=None,
                 backend: Optional[str] = None, dist_impl: str = "ring") -> torch.Tensor:
    """SigLIP pairwise sigmoid loss (float32 scalar); see the module docstring for semantics.

    image_emb (N, D), text_emb (M, D): fp32/fp16/bf16, same dtype and device. logit_scale is the
    multiplier t (already exponentiated), logit_bias b: scalar tensors. image_ids (N,) and
    text_ids (M,), int32/int64, both or neither; without them N must equal M (diagonal pairs).
    process_group: torch.distributed group; each rank passes its local rows (see module docstring).
    backend: None/"auto", "torch", "triton" or "cuda".
    dist_impl: with process_group, how texts travel: "ring" (isend/irecv around the ring, memory
    O(local + two remote blocks); default) or "gather" (all_gather with autograd, O(global M * D)).
    """
    _checks.check_tensor(image_emb, "image_emb", dtypes=FLOAT_DTYPES, ndim=2)
    device = image_emb.device
    _checks.check_tensor(text_emb, "text_emb", dtypes=FLOAT_DTYPES, ndim=2, device=device)
    if text_emb.dtype != image_emb.dtype:
        raise TypeError(f"text_emb: expected the dtype of image_emb ({image_emb.dtype}), got {text_emb.dtype}")
    n, d = image_emb.shape
    m = text_emb.shape[0]
    if text_emb.shape[1] != d:
        raise ValueError(f"text_emb: expected embedding dim D = {d} (image_emb's), got shape {tuple(text_emb.shape)}")
    if n == 0 or m == 0 or d == 0:
        raise ValueError(f"image_emb, text_emb: expected non-empty (N, D) and (M, D), got {tuple(image_emb.shape)} "
                         f"and {tuple(text_emb.shape)}")
    _check_scalar(logit_scale, "logit_scale", device)
    _check_scalar(logit_bias, "logit_bias", device)
    if (image_ids is None) != (text_ids is None):
        raise ValueError("image_ids, text_ids: give both or neither "
                         f"(got only {'image_ids' if image_ids is not None else 'text_ids'})")
    if image_ids is not None:
        for ids, name, length in ((image_ids, "image_ids", n), (text_ids, "text_ids", m)):
            _checks.check_tensor(ids, name, dtypes=ID_DTYPES, ndim=1, device=device)
            if ids.shape[0] != length:
                raise ValueError(f"{name}: expected length {length} (rows of its embeddings), got {ids.shape[0]}")
        image_ids = image_ids.to(torch.int64)
        text_ids = text_ids.to(torch.int64)
    elif n != m and process_group is None:
        raise ValueError(f"image_emb, text_emb: N = {n} images but M = {m} texts; give image_ids and text_ids "
                         "when the pairs are not the diagonal")
    if dist_impl not in DIST_IMPLS:
        raise ValueError(f"dist_impl: expected one of {DIST_IMPLS}, got {dist_impl!r}")
    backend = resolve_request(backend, BACKENDS.names) if backend not in (None, "auto") else "auto"
    inv_norm = 1.0 / n
    if process_group is not None and dist_impl == "ring":
        return _ring_loss(image_emb, text_emb, logit_scale, logit_bias, image_ids, text_ids, process_group,
                          backend)
    if process_group is not None:
        text_emb, image_ids, text_ids, inv_norm = _distributed_inputs(image_emb, text_emb, image_ids, text_ids,
                                                                      process_group)
    with_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (image_emb, text_emb, logit_scale, logit_bias))
    return _sigmoid_loss_op(image_emb, text_emb, logit_scale, logit_bias, image_ids, text_ids, inv_norm,
                            with_grad, backend)[0]
