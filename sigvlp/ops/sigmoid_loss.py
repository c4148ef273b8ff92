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
for every rank's images, and the mean of the per-rank losses is the global loss (DDP-averaged
gradients equal the single-process ones). The ring ("ring", default) and all-gather ("gather")
implementations live in sigvlp.ops._sigmoid_loss_dist; the reference, backends and custom ops in
sigvlp.ops._sigmoid_loss_pass (both below this module: no import cycle).
"""

from __future__ import annotations

from typing import Optional

import torch

from sigvlp.ops import _checks
from sigvlp.ops import _sigmoid_loss_dist as dist_impls
from sigvlp.ops._sigmoid_loss_pass import (_BYTES_PER_PAIR, BACKENDS, CUDA_BLOCK, REFERENCE_MAX_BLOCK_BYTES,  # noqa: F401
                                           REFERENCE_MIN_BLOCK_BYTES, _block_rows, _pass_torch, _sigmoid_loss_op,
                                           _text_grad_op, sigmoid_loss_dense, sigmoid_loss_reference)
from sigvlp.ops.backends import FLOAT_DTYPES, resolve_request
from sigvlp.ops.registry import KeyRatio, OpSpec, as64, leaf, rand64, register, weighted_grads

__all__ = ["sigmoid_loss", "sigmoid_loss_reference", "sigmoid_loss_dense"]

ID_DTYPES = (torch.int32, torch.int64)
SCALAR_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
DIST_IMPLS = ("ring", "gather")


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
        return dist_impls.ring_loss(image_emb, text_emb, logit_scale, logit_bias, image_ids, text_ids, process_group,
                          backend)
    if process_group is not None:
        text_emb, image_ids, text_ids, inv_norm = dist_impls.distributed_inputs(image_emb, text_emb, image_ids, text_ids,
                                                                      process_group)
    with_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (image_emb, text_emb, logit_scale, logit_bias))
    return _sigmoid_loss_op(image_emb, text_emb, logit_scale, logit_bias, image_ids, text_ids, inv_norm,
                            with_grad, backend)[0]


# ----------------------------------------------------------------------------- registry


def _selftest_case(dtype, device, gen):
    """24 images against 30 texts of 64 dims, six texts repeating an image's id; t = 10, b = -10."""
    x = leaf(torch.nn.functional.normalize(rand64(gen, 24, 64), dim=1), dtype, device)
    y = leaf(torch.nn.functional.normalize(rand64(gen, 30, 64), dim=1), dtype, device)
    t = torch.tensor(10.0, device=device, requires_grad=True)
    b = torch.tensor(-10.0, device=device, requires_grad=True)
    image_ids = torch.arange(24)
    text_ids = torch.cat([torch.arange(24), torch.tensor([0, 3, 3, 7, 20, 23])])  # repeated texts
    w = [torch.tensor(1.0, dtype=torch.float64)]

    def run(backend):
        loss = sigmoid_loss(x, y, t, b, image_ids=image_ids.to(device), text_ids=text_ids.to(device),
                            backend=backend)
        return [loss], weighted_grads([loss], [x, y, t, b], w)

    def oracle():
        leaves = [as64(v) for v in (x, y, t, b)]
        loss = sigmoid_loss_dense(*leaves, image_ids=image_ids, text_ids=text_ids)
        return [loss], weighted_grads([loss], leaves, w)

    return run, oracle


def _launch_survey(lengths, rows):
    n, m = rows
    for dtype, d in ((torch.float32, 256), (torch.bfloat16, 256), (torch.float32, 1024), (torch.bfloat16, 768)):
        x = torch.randn(n, d, dtype=dtype, requires_grad=True)
        y = torch.randn(m, d, dtype=dtype, requires_grad=True)
        t, b = torch.tensor(10.0), torch.tensor(-10.0)
        ids = torch.arange(n), torch.arange(m) % max(n, 1)
        sigmoid_loss(x, y, t, b, image_ids=ids[0], text_ids=ids[1], backend="triton").backward()


#: The Triton configurations gpu_check's GPU tests and benches launch (OpSpec.launch_configs), kwargs
#: of sigvlp.precompile's sigmoid-loss case: tests/test_sigmoid_loss.py test_gpu_backends_vs_fp64
#: (every dtype at D 32, 64, 256, 1024 and 768, with ids where it has them, gradients), the benches'
#: bf16 D 512 / 1024 without ids (bench_sigmoid_loss) and the model's D 768 with ids (bench_model).
_GPU_LAUNCHES = tuple(dict(dtype=dt, dim=d, ids=ids, grad=True)
                      for dt in (torch.float32, torch.float16, torch.bfloat16)
                      for d, ids in ((32, False), (64, False), (256, True), (1024, True), (768, False))) + tuple(
    dict(dtype=torch.bfloat16, dim=d, ids=ids, grad=True) for d, ids in ((512, False), (768, True)))


SPEC = register(OpSpec(
    name="sigmoid_loss", backends=BACKENDS, selftest=_selftest_case, test_file="tests/test_sigmoid_loss.py",
    launch_survey=_launch_survey, launch_configs=_GPU_LAUNCHES, bench="benches/bench_sigmoid_loss.py", bench_cap_s=15,
    key_ratios=(KeyRatio("sigmoid loss: ours vs dense", "sigmoid_loss", ("triton", "cuda"), "dense"),),
    interpreter_no_bf16_dot=True,
))
