"""Distributed sigmoid loss (process_group): the text exchange around a ring and the all-gather.

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

import torch
import torch.distributed as dist

from sigvlp.ops._sigmoid_loss_pass import _sigmoid_loss_op, _text_grad_op

__all__ = ["ring_loss", "distributed_inputs"]


class _GatherRows(torch.autograd.Function):
    """All ranks' rows concatenated in rank order (sizes may differ); backward all-reduces the
    gradient and returns this rank's slice (the sum of every rank's contribution to it)."""

    @staticmethod
    def forward(ctx, t, sizes, group):
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
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None, None


def _row_counts(x, y, image_ids, group):
    """Rows per rank, (images, texts), all-gathered (the only collective besides the text exchange)."""
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


def distributed_inputs(x, y, image_ids, text_ids, group):
    """(Y_global, image_ids, text_ids_global, inv_norm) for this rank's share of the global loss."""
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
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.next = dist.get_global_rank(group, (self.rank + 1) % self.world)
        self.prev = dist.get_global_rank(group, (self.rank - 1) % self.world)

    def exchange(self, send, recv, tag):
        """Post (asynchronously) sends of `send` to the next rank and receives into `recv` from the
        previous one, tensor k with tag `tag + k`; returns the works to wait on."""
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


def ring_loss(x, y, scale, bias, image_ids, text_ids, group, backend):
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
