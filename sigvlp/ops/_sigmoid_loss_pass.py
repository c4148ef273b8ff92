"""sigvlp.ops.sigmoid_loss's single-process core: the readable reference, the backends of one
blockwise pass, and the two torch custom ops (row pass with the loss, column pass for the text
gradient) with their autograd. The semantics are in sigvlp.ops.sigmoid_loss's docstring; the
public function (and the distributed forms in sigvlp.ops._sigmoid_loss_dist) build on this module.
"""

from __future__ import annotations

from typing import Optional

import torch

from sigvlp.ops import cuda_module
from sigvlp.ops.backends import Backend, BackendSet, empty_output


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


#: bounds of the torch reference's working memory per block of rows (see _block_rows)
REFERENCE_MIN_BLOCK_BYTES = 1 << 20
REFERENCE_MAX_BLOCK_BYTES = 256 << 20
#: bytes per (row, column) pair that a block keeps alive at once: four fp32 tiles (S, logits,
#: softplus / G, G * S) and the bool mask of positives
_BYTES_PER_PAIR = 4 * 4 + 1


def _block_rows(na: int, nb: int, d: int, budget_bytes: int | None = None) -> int:
    """Rows of A per block of the torch reference: its (rows, Nb) tiles fit a memory budget.

    The default budget is a quarter of the bytes of the fp32 embeddings, (Na + Nb) * D, clamped to
    [REFERENCE_MIN_BLOCK_BYTES, REFERENCE_MAX_BLOCK_BYTES]: extra memory stays O((Na + Nb) * D),
    a small fraction of the dense formula's N x M tiles, with rows large enough for an efficient
    matmul.
    """
    if budget_bytes is None:
        budget_bytes = min(max((na + nb) * d, REFERENCE_MIN_BLOCK_BYTES), REFERENCE_MAX_BLOCK_BYTES)
    return max(1, min(na, budget_bytes // (_BYTES_PER_PAIR * max(nb, 1))))


def _pass_torch(a, b, scale, bias, a_ids, b_ids, inv_norm, da, *, budget_bytes=None):
    """One blockwise pass (see the module docstring): returns fp32 (loss, dscale, dbias) and fills
    `da` (if given) with (t * inv_norm) * G B. Blocks of rows keep memory at O(block * M), the
    block chosen by `_block_rows` from Na, Nb, D and a memory budget. Sums: fp32 within a row,
    fp64 across rows and blocks."""
    na, nb = a.shape[0], b.shape[0]
    bf = b.to(torch.float32)
    t = scale.reshape(()).to(torch.float32)
    bb = bias.reshape(()).to(torch.float32)
    rows = _block_rows(na, nb, a.shape[1], budget_bytes)
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
        work = torch.where(pos, -logits, logits)
        loss += torch.nn.functional.softplus(work).sum(dim=1).sum(dtype=torch.float64)
        g = torch.sigmoid(logits, out=work).sub_(pos.to(torch.float32))  # G, in place
        del pos
        db += g.sum(dim=1).sum(dtype=torch.float64)
        dt += torch.mul(g, s, out=logits).sum(dim=1).sum(dtype=torch.float64)
        del s, logits
        if da is not None:
            da[r0:r1] = (g @ bf).mul_(coef).to(da.dtype)
        del g, work
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
    cuda_module.module().sigmoid_loss_pass(
        a=cuda_module.ptr(a), b=cuda_module.ptr(b), da=cuda_module.ptr(da), workspace=cuda_module.ptr(workspace),
        workspace_ld=0 if workspace is None else workspace.stride(0), partials=cuda_module.ptr(partials),
        a_ids=cuda_module.ptr(a_ids), b_ids=cuda_module.ptr(b_ids), scale=cuda_module.ptr(scale), bias=cuda_module.ptr(bias),
        dtype=cuda_module.dtype_code(a.dtype), na=na, nb=b.shape[0], d=d, a_stride=a.stride(0),
        b_stride=b.stride(0), da_stride=0 if da is None else da.stride(0), inv_norm=float(inv_norm),
        stream=cuda_module.stream_ptr(a.device),
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
        dy = _text_grad_op(x, y, scale, bias, image_ids, text_ids, inv_norm, backend)
        grad_y = dy.mul_(grad_loss)  # a fresh tensor of y's dtype: scaled in place
    if need[2]:
        grad_scale = (dscale * grad_loss).reshape(scale.shape).to(scale.dtype)
    if need[3]:
        grad_bias = (dbias * grad_loss).reshape(bias.shape).to(bias.dtype)
    return grad_x, grad_y, grad_scale, grad_bias, None, None, None, None, None


_sigmoid_loss_op.register_autograd(_backward, setup_context=_setup_context)
