"""sigmoid_loss: backends against an fp64 dense oracle (loss and all four gradients), ids and
shapes, large logits, bounded memory, op registration, torch.compile, distributed (gloo), bad input."""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch
import torch.nn.functional as F

import sigvlp.ops as ops
from sigvlp.ops import BackendError, sigmoid_loss
from sigvlp.ops.sigmoid_loss import _pass_torch, sigmoid_loss_dense, sigmoid_loss_reference
from sigvlp.ops.tolerances import assert_at_floor

from _no_sync import HostReadError, forbid_host_reads, no_cuda_sync, two_gpus

HAS_CUDA = torch.cuda.is_available()
CPU_BACKENDS = ["torch", "triton"]  # triton runs in the interpreter without a GPU


def _inputs(n, m, d, *, ids=None, dtype=torch.float32, device="cpu", scale=10.0, bias=-10.0, seed=0,
            normalize=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randn(m, d, generator=g, dtype=torch.float64)
    if normalize:
        x, y = F.normalize(x, dim=1), F.normalize(y, dim=1)
    image_ids = text_ids = None
    if ids is not None:
        image_ids = torch.randint(0, ids, (n,), generator=g).to(device)
        text_ids = torch.randint(0, ids, (m,), generator=g).to(device)
    t = torch.tensor(scale, dtype=torch.float32, device=device)
    b = torch.tensor(bias, dtype=torch.float32, device=device)
    return x.to(device=device, dtype=dtype), y.to(device=device, dtype=dtype), t, b, image_ids, text_ids


def _loss_and_grads(fn, x, y, t, b, image_ids, text_ids, dtype=None):
    leaves = [v.detach().clone() for v in (x, y, t, b)]
    if dtype is not None:
        leaves = [v.to(dtype) for v in leaves]
    for v in leaves:
        v.requires_grad_(True)
    loss = fn(*leaves, image_ids, text_ids)
    loss.backward()
    return [loss.detach()] + [v.grad for v in leaves]


def _dense(x, y, t, b, image_ids, text_ids):
    return sigmoid_loss_dense(x, y, t, b, image_ids, text_ids)


def _op(backend):
    def fn(x, y, t, b, image_ids, text_ids):
        return sigmoid_loss(x, y, t, b, image_ids=image_ids, text_ids=text_ids, backend=backend)
    return fn


def _assert_at_precision_floor(got, x, y, t, b, image_ids, text_ids):
    """Loss and every gradient: error vs fp64 at most ~2x that of the dense formula computed by
    torch in the inputs' dtype (plus one ulp of the value's magnitude)."""
    exact = _loss_and_grads(_dense, x, y, t, b, image_ids, text_ids, dtype=torch.float64)
    low = _loss_and_grads(_dense, x, y, t.to(x.dtype), b.to(x.dtype), image_ids, text_ids)
    eps = torch.finfo(x.dtype).eps
    names = ["loss", "d image_emb", "d text_emb", "d logit_scale", "d logit_bias"]
    for name, g, e, lo in zip(names, got, exact, low):
        assert g.shape == e.shape, f"{name}: shape {tuple(g.shape)} vs {tuple(e.shape)}"
        assert torch.isfinite(g).all(), f"{name}: non-finite (unwritten, NaN-poisoned?) values"
        assert_at_floor(g, e, lo, name=name, slack=eps * max(1.0, e.abs().max().item()))


# ----------------------------------------------------------------------------- the spec


def test_dense_oracle_matches_elementwise_spec():
    x, y, t, b, ii, ti = _inputs(3, 4, 5, ids=2, dtype=torch.float64)
    total = 0.0
    for i in range(3):
        for j in range(4):
            z = 1.0 if ii[i] == ti[j] else -1.0
            logit = float(t) * float(x[i] @ y[j]) + float(b)
            total += -float(F.logsigmoid(torch.tensor(z * logit, dtype=torch.float64)))
    assert abs(sigmoid_loss_dense(x, y, t.double(), b.double(), ii, ti).item() - total / 3) < 1e-12


def test_repeated_text_ids_count_as_positives():
    x, y, t, b, _, _ = _inputs(2, 3, 8)
    ii = torch.tensor([0, 1])
    ti = torch.tensor([0, 0, 1])  # texts 0 and 1 are the same text: both positives of image 0
    got = sigmoid_loss(x, y, t, b, image_ids=ii, text_ids=ti)
    logits = t * (x.double() @ y.double().T) + b
    z = torch.tensor([[1.0, 1.0, -1.0], [-1.0, -1.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(got.double(), -F.logsigmoid(z * logits).sum() / 2, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- backends vs fp64

CASES = [
    # (n, m, d, ids, scale, bias)
    pytest.param(37, 37, 32, None, 10.0, -10.0, id="diagonal"),
    pytest.param(50, 70, 64, 6, 10.0, -10.0, id="multi-positive-M!=N"),
    pytest.param(67, 130, 32, 9, 10.0, -5.0, id="not-multiple-of-blocks"),
    pytest.param(1, 1, 32, None, 10.0, -10.0, id="N=1"),
    pytest.param(1, 5, 64, 2, 10.0, -10.0, id="N=1-M=5"),
    pytest.param(70, 70, 256, None, 10.0, -10.0, id="D=256"),
    pytest.param(40, 33, 1024, 5, 10.0, -10.0, id="D=1024"),
    pytest.param(45, 45, 64, None, 100.0, -10.0, id="scale100"),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("n, m, d, ids, scale, bias", CASES)
def test_backend_fp32_vs_fp64(backend, n, m, d, ids, scale, bias):
    x, y, t, b, ii, ti = _inputs(n, m, d, ids=ids, scale=scale, bias=bias, seed=n + m + d)
    got = _loss_and_grads(_op(backend), x, y, t, b, ii, ti)
    _assert_at_precision_floor(got, x, y, t, b, ii, ti)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("n, m, d, ids", [(37, 37, 32, None), (66, 50, 64, 7), (20, 20, 1024, None)])
def test_backend_fp16_vs_fp64(backend, n, m, d, ids):
    x, y, t, b, ii, ti = _inputs(n, m, d, ids=ids, dtype=torch.float16, seed=3)
    got = _loss_and_grads(_op(backend), x, y, t, b, ii, ti)
    _assert_at_precision_floor(got, x, y, t, b, ii, ti)
    assert got[1].dtype == torch.float16 and got[2].dtype == torch.float16


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_large_logits_do_not_overflow(backend):
    # Unnormalised embeddings with scale 100: |logits| in the thousands; exp would overflow.
    x, y, t, b, ii, ti = _inputs(24, 24, 32, scale=100.0, bias=-10.0, normalize=False, seed=5)
    got = _loss_and_grads(_op(backend), x, y, t, b, ii, ti)
    exact = _loss_and_grads(_dense, x, y, t, b, ii, ti, dtype=torch.float64)
    for g, e in zip(got, exact):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g.double(), e, rtol=1e-4, atol=1e-4 * max(1.0, e.abs().max().item()))


def test_triton_matches_reference_and_is_deterministic():
    x, y, t, b, ii, ti = _inputs(130, 90, 96, ids=11, seed=7)
    runs = [_loss_and_grads(_op("triton"), x, y, t, b, ii, ti) for _ in range(2)]
    for r0, r1 in zip(*runs):
        assert torch.equal(r0, r1)
    ref = _loss_and_grads(_op("torch"), x, y, t, b, ii, ti)
    for r, e in zip(runs[0], ref):
        torch.testing.assert_close(r, e, rtol=1e-5, atol=1e-6)


def test_scalar_shapes_and_dtypes_of_scale_and_bias():
    x, y, _, _, _, _ = _inputs(6, 6, 16)
    t = torch.tensor([10.0], dtype=torch.float64, requires_grad=True)
    b = torch.tensor(-10.0, dtype=torch.bfloat16, requires_grad=True)
    loss = sigmoid_loss(x, y, t, b)
    assert loss.dtype == torch.float32 and loss.shape == ()
    loss.backward()
    assert t.grad.shape == (1,) and t.grad.dtype == torch.float64
    assert b.grad.shape == () and b.grad.dtype == torch.bfloat16


def test_no_grad_forward_and_late_gradient():
    x, y, t, b, ii, ti = _inputs(20, 30, 16, ids=4)
    with torch.no_grad():
        plain = sigmoid_loss(x, y, t, b, image_ids=ii, text_ids=ti)
    torch.testing.assert_close(plain, sigmoid_loss_reference(x, y, t, b, ii, ti))
    # The op run without its gradient pass still differentiates (the backward runs the row pass).
    xr = x.clone().requires_grad_(True)
    loss = torch.ops.sigvlp.sigmoid_loss(xr, y, t, b, ii, ti, 1.0 / 20, False, "torch")[0]
    loss.backward()
    expected = _loss_and_grads(_dense, x, y, t, b, ii, ti, dtype=torch.float64)[1]
    torch.testing.assert_close(xr.grad.double(), expected, rtol=1e-5, atol=1e-7)


def test_reference_memory_is_blockwise():
    """No tensor of the reference pass (forward and gradient) is anywhere near N x M, and the
    block of rows follows the memory budget."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for o in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(o, torch.Tensor):
                    Largest.largest = max(Largest.largest, o.numel())
            return out

    n = m = 512
    d = 16
    budget = 17 * (1 << 13)  # 17 bytes per pair: rows * m <= 8192
    x, y, t, b, _, _ = _inputs(n, m, d)
    with Largest():
        da = torch.empty(n, d)
        _pass_torch(x, y, t.reshape(1), b.reshape(1), None, None, 1.0 / n, da, budget_bytes=budget)  # row pass
        _pass_torch(y, x, t.reshape(1), b.reshape(1), None, None, 1.0 / n, da, budget_bytes=budget)  # column
    assert Largest.largest <= max(1 << 13, n * d), Largest.largest
    assert Largest.largest * 16 <= n * m


@pytest.mark.parametrize("n, m, d", [(8192, 8192, 256), (65536, 65536, 1024), (4, 100_000, 64), (7, 3, 8)])
def test_reference_block_rows_follow_the_budget(n, m, d):
    """Default budget: the working tiles take at most max(1 MiB, (N + M) D) bytes (a quarter of the
    fp32 embeddings, O((N + M) D) as the module promises), and never fewer than one row."""
    sl = sys.modules["sigvlp.ops.sigmoid_loss"]
    rows = sl._block_rows(n, m, d)
    assert 1 <= rows <= n
    budget = min(max((n + m) * d, sl.REFERENCE_MIN_BLOCK_BYTES), sl.REFERENCE_MAX_BLOCK_BYTES)
    assert rows == 1 or rows * m * sl._BYTES_PER_PAIR <= budget
    assert rows == n or (rows + 1) * m * sl._BYTES_PER_PAIR > budget  # as large as the budget allows


# ----------------------------------------------------------------------------- host syncs, devices


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("ids", [None, 5])
def test_fast_path_reads_nothing_back(backend, ids):
    """Forward and backward (single process) call no Tensor.item / tolist / cpu / __bool__ /
    nonzero...: nothing of the loss is read back to the host."""
    x, y, t, b, ii, ti = _inputs(37, 37, 32, ids=ids, seed=3)
    with forbid_host_reads():
        got = _loss_and_grads(_op(backend), x, y, t, b, ii, ti)
    _assert_at_precision_floor(got, x, y, t, b, ii, ti)
    with forbid_host_reads(), pytest.raises(HostReadError):  # control: the guard does catch reads
        sigmoid_loss(x, y, t, b, backend=backend).item()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_no_host_sync(backend):
    x, y, t, b, ii, ti = _inputs(300, 257, 256, ids=13, dtype=torch.bfloat16, device="cuda")
    _loss_and_grads(_op(backend), x, y, t, b, ii, ti)  # warm-up: compilation
    with no_cuda_sync():
        got = _loss_and_grads(_op(backend), x, y, t, b, ii, ti)
    _assert_at_precision_floor(got, x, y, t, b, ii, ti)


@pytest.mark.gpu
@pytest.mark.skipif(not two_gpus(), reason="needs two CUDA devices")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_runs_on_the_tensors_device(backend):
    """Tensors on cuda:1 while cuda:0 is current: the kernels run on cuda:1 (device guard)."""
    x, y, t, b, ii, ti = _inputs(300, 257, 256, ids=13, dtype=torch.bfloat16, device="cuda:0")
    expected = _loss_and_grads(_op(backend), x, y, t, b, ii, ti)
    with torch.cuda.device(0):
        got = _loss_and_grads(_op(backend), *(v.to("cuda:1") for v in (x, y, t, b, ii, ti)))
        assert torch.cuda.current_device() == 0
    for g, e in zip(got, expected):
        assert g.device == torch.device("cuda:1") and torch.equal(g.cpu(), e.cpu())


# ----------------------------------------------------------------------------- registration


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck(backend):
    x, y, t, b, ii, ti = _inputs(9, 13, 16, ids=3)
    xd, yd, td, bd, _, _ = _inputs(7, 7, 32, seed=1)
    op = torch.ops.sigvlp.sigmoid_loss.default
    samples = [
        (x.requires_grad_(True), y.requires_grad_(True), t.requires_grad_(True), b.requires_grad_(True), ii, ti,
         1.0 / 9, True, backend),
        (xd, yd, td, bd, None, None, 1.0 / 7, False, backend),
    ]
    for args in samples:
        torch.library.opcheck(op, args)
    torch.library.opcheck(torch.ops.sigvlp.sigmoid_loss_text_grad.default,
                          (x.detach(), y.detach(), t.detach(), b.detach(), ii, ti, 1.0 / 9, backend))


def test_torch_compile_fullgraph():
    x, y, t, b, ii, ti = _inputs(12, 17, 16, ids=5)

    def f(x, y, t, b):
        return sigmoid_loss(x, y, t, b, image_ids=ii, text_ids=ti) * 2.0

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = _loss_and_grads(lambda x, y, t, b, _i, _t: compiled(x, y, t, b), x, y, t, b, ii, ti)
    ref = _loss_and_grads(lambda x, y, t, b, _i, _t: f(x, y, t, b), x, y, t, b, ii, ti)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r)


def test_backend_selection(monkeypatch):
    x, y, t, b, _, _ = _inputs(4, 4, 8)
    assert ops.OPS["sigmoid_loss"].select(None, device=x.device, dtype=x.dtype).name == "torch"
    with pytest.raises(ValueError, match="backend"):
        sigmoid_loss(x, y, t, b, backend="fastest")
    if not HAS_CUDA:
        with pytest.raises(BackendError, match="cuda"):
            sigmoid_loss(x, y, t, b, backend="cuda")
    monkeypatch.setenv("SIGVLP_BACKEND", "triton")
    assert ops.OPS["sigmoid_loss"].select(None, device=x.device, dtype=x.dtype).name == "triton"


# ----------------------------------------------------------------------------- bad input

_X, _Y, _T, _B, _II, _TI = _inputs(6, 6, 16, ids=3)


@pytest.mark.parametrize(
    "kwargs, error, name",
    [
        (dict(image_emb=_X.double()), TypeError, "image_emb"),
        (dict(image_emb=_X.to(torch.int32)), TypeError, "image_emb"),
        (dict(image_emb=_X[0]), ValueError, "image_emb"),
        (dict(text_emb=_Y.half()), TypeError, "text_emb"),
        (dict(text_emb=_Y[:, :8]), ValueError, "text_emb"),
        (dict(text_emb=_Y.to("meta")), ValueError, "text_emb"),
        (dict(text_emb=_Y[:4]), ValueError, "N = 6 images but M = 4"),
        (dict(image_emb=_X[:0], text_emb=_Y[:0]), ValueError, "non-empty"),
        (dict(logit_scale=torch.ones(2)), ValueError, "logit_scale"),
        (dict(logit_scale=torch.ones(1, 1)), ValueError, "logit_scale"),
        (dict(logit_bias=torch.zeros(3)), ValueError, "logit_bias"),
        (dict(logit_bias=torch.zeros((), dtype=torch.int64)), TypeError, "logit_bias"),
        (dict(logit_scale=10.0), TypeError, "logit_scale"),
        (dict(logit_bias=torch.zeros((), device="meta")), ValueError, "logit_bias"),
        (dict(image_ids=_II), ValueError, "give both"),
        (dict(text_ids=_TI), ValueError, "give both"),
        (dict(image_ids=_II[:5], text_ids=_TI), ValueError, "image_ids"),
        (dict(image_ids=_II, text_ids=_TI[:5]), ValueError, "text_ids"),
        (dict(image_ids=_II.float(), text_ids=_TI), TypeError, "image_ids"),
        (dict(image_ids=_II, text_ids=_TI.to(torch.int16)), TypeError, "text_ids"),
        (dict(image_ids=_II[:, None], text_ids=_TI), ValueError, "image_ids"),
    ],
)
def test_bad_input_is_named(kwargs, error, name):
    args = dict(image_emb=_X, text_emb=_Y, logit_scale=_T, logit_bias=_B)
    args.update(kwargs)
    with pytest.raises(error, match=name):
        sigmoid_loss(args.pop("image_emb"), args.pop("text_emb"), args.pop("logit_scale"), args.pop("logit_bias"),
                     **args)


def test_int32_ids_accepted():
    got = sigmoid_loss(_X, _Y, _T, _B, image_ids=_II.int(), text_ids=_TI.int())
    torch.testing.assert_close(got, sigmoid_loss(_X, _Y, _T, _B, image_ids=_II, text_ids=_TI))


# ----------------------------------------------------------------------------- distributed

# Per scenario: rows per rank for (images, texts); ids drawn in [0, 5) or None (diagonal).
_DIST_SCENARIOS = {
    "diagonal": dict(n=[5, 7, 4, 6], m=[5, 7, 4, 6], ids=None),
    "ids": dict(n=[6, 3, 5, 4], m=[4, 8, 2, 5], ids=5),
}


def _dist_backends(world):
    return CPU_BACKENDS if world <= 3 else ["torch"]  # world 4 (memory, ring steps > 2): torch only


def _dist_global(world, scenario):
    spec = _DIST_SCENARIOS[scenario]
    n, m = spec["n"][:world], spec["m"][:world]
    x, y, t, b, ii, ti = _inputs(sum(n), sum(m), 24, ids=spec["ids"], seed=world)
    return x, y, t, b, ii, ti, n, m


class _ReceivedTracker:
    """Counts, per kind, the tensors a rank has received (via p2p or all_gather) that are still
    alive, and keeps the peak; a received tensor dies when the op drops its last reference. Kinds:
    "texts" (floating blocks of text embeddings), "dy" (travelling dY accumulators), "ids".
    Also logs the order of events: "send texts" (a block's transfer posted) and "rows" (a row pass)."""

    def __init__(self, monkeypatch):
        import weakref

        import torch.distributed as dist

        sl = importlib.import_module("sigvlp.ops._sigmoid_loss_dist")
        _RING_TAG = sl._RING_TAG
        self.events = []
        self.live = {"texts": [], "dy": [], "ids": []}
        self.peak = {k: 0 for k in self.live}
        self.max_rows = 0
        batch, gather, row_pass = dist.batch_isend_irecv, dist.all_gather, sl._sigmoid_loss_op

        def note(kind, t):
            self.live[kind] = [r for r in self.live[kind] if r() is not None] + [weakref.ref(t)]
            self.peak[kind] = max(self.peak[kind], len(self.live[kind]))
            if kind != "ids":
                self.max_rows = max(self.max_rows, t.shape[0])

        def batch_isend_irecv(ops):
            if any("send" in op.op.__name__ and (op.tag - _RING_TAG) % 4 == 0 for op in ops):
                self.events.append("send texts")
            for op in ops:
                if "recv" in op.op.__name__:
                    note(("texts", "ids", "dy", "ids")[(op.tag - _RING_TAG) % 4], op.tensor)
            return batch(ops)

        def all_gather(parts, tensor, *args, **kwargs):
            if tensor.is_floating_point() or tensor.numel() > 2:  # anything but the row counts
                for part in parts:
                    note("texts" if tensor.is_floating_point() else "ids", part)
            return gather(parts, tensor, *args, **kwargs)

        def sigmoid_loss_op(*args):
            self.events.append("rows")
            return row_pass(*args)

        monkeypatch.setattr(dist, "batch_isend_irecv", batch_isend_irecv)
        monkeypatch.setattr(sl, "_sigmoid_loss_op", sigmoid_loss_op)
        monkeypatch.setattr(dist, "all_gather", all_gather)


def _dist_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    singletons = [dist.new_group([r]) for r in range(world)]  # a ring of one, per rank
    try:
        results = {}

        def run(scenario, backend, impl, weight=1.0, group=dist.group.WORLD, track=False):
            x, y, t, b, ii, ti, n, m = _dist_global(world, scenario)
            rs, re_ = sum(n[:rank]), sum(n[: rank + 1])
            cs, ce = sum(m[:rank]), sum(m[: rank + 1])
            xl = x[rs:re_].clone().requires_grad_(True)
            yl = y[cs:ce].clone().requires_grad_(True)
            tl_ = t.clone().requires_grad_(True)
            bl = b.clone().requires_grad_(True)
            kw = {} if ii is None else dict(image_ids=ii[rs:re_], text_ids=ti[cs:ce])
            with pytest.MonkeyPatch.context() as mp_:
                tracker = _ReceivedTracker(mp_) if track else None
                loss = sigmoid_loss(xl, yl, tl_, bl, process_group=group, backend=backend, dist_impl=impl, **kw)
                (loss * weight).backward()
            out = [loss.detach(), xl.grad, yl.grad, tl_.grad, bl.grad]
            if track:
                out.append(dict(tracker.peak, max_rows=tracker.max_rows, events=tracker.events))
            return out

        for scenario in _DIST_SCENARIOS:
            for backend in _dist_backends(world):
                for impl in ("ring", "gather"):
                    results[(scenario, backend, impl)] = run(scenario, backend, impl, track=backend == "torch")
        for impl in ("ring", "gather"):  # a different loss gradient per rank: the ring reruns dY
            results[("weighted", impl)] = run("ids", "torch", impl, weight=float(rank + 1))
        results["singleton"] = run("ids", "torch", "ring", group=singletons[rank])
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module", params=[2, 3, 4], ids=["world2", "world3", "world4"])
def dist_results(request, tmp_path_factory):
    import torch.multiprocessing as mp

    world = request.param
    tmp_path = tmp_path_factory.mktemp(f"dist{world}")
    mp.spawn(_dist_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    return world, [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]


def _assert_matches_global(res, exact, world):
    tol = dict(rtol=1e-5, atol=1e-6)
    # The mean of the per-rank losses is the global loss.
    torch.testing.assert_close(torch.stack([r[0] for r in res]).double().mean(), exact[0], **tol)
    # DDP averages gradients over ranks: (per-rank gradient) / world = single-process gradient.
    torch.testing.assert_close(torch.cat([r[1] for r in res]).double() / world, exact[1], **tol)
    torch.testing.assert_close(torch.cat([r[2] for r in res]).double() / world, exact[2], **tol)
    torch.testing.assert_close(torch.stack([r[3] for r in res]).double().mean(), exact[3], **tol)
    torch.testing.assert_close(torch.stack([r[4] for r in res]).double().mean(), exact[4], **tol)


@pytest.mark.parametrize("impl", ["ring", "gather"])
def test_distributed_matches_single_process(dist_results, impl):
    world, per_rank = dist_results
    for scenario in _DIST_SCENARIOS:
        x, y, t, b, ii, ti, n, m = _dist_global(world, scenario)
        exact = _loss_and_grads(_dense, x, y, t, b, ii, ti, dtype=torch.float64)
        for backend in _dist_backends(world):
            _assert_matches_global([r[(scenario, backend, impl)] for r in per_rank], exact, world)


@pytest.mark.parametrize("impl", ["ring", "gather"])
def test_distributed_per_rank_loss_gradients(dist_results, impl):
    """Rank r backpropagates (r + 1) * its loss: the gradients are those of sum_r (r + 1) * loss_r
    (the ring's forward-accumulated dY does not apply; it redoes the dY ring with the weights)."""
    world, per_rank = dist_results
    x, y, t, b, ii, ti, n, _ = _dist_global(world, "ids")
    leaves = [v.detach().double().requires_grad_(True) for v in (x, y, t, b)]
    logits = leaves[2] * (leaves[0] @ leaves[1].T) + leaves[3]
    z = (ii[:, None] == ti[None, :]).double() * 2 - 1
    row_loss = -F.logsigmoid(z * logits).sum(dim=1) * (world / sum(n))
    weights = torch.cat([torch.full((k,), float(r + 1), dtype=torch.float64) for r, k in enumerate(n)])
    (row_loss * weights).sum().backward()
    res = [r[("weighted", impl)] for r in per_rank]
    tol = dict(rtol=1e-5, atol=1e-6)
    starts = [sum(n[:r]) for r in range(world + 1)]
    for r in range(world):
        torch.testing.assert_close(res[r][0].double(), row_loss[starts[r]:starts[r + 1]].sum().detach(), **tol)
    torch.testing.assert_close(torch.cat([r[1] for r in res]).double(), leaves[0].grad, **tol)
    torch.testing.assert_close(torch.cat([r[2] for r in res]).double(), leaves[1].grad, **tol)
    torch.testing.assert_close(torch.stack([r[3] for r in res]).double().sum(), leaves[2].grad, **tol)
    torch.testing.assert_close(torch.stack([r[4] for r in res]).double().sum(), leaves[3].grad, **tol)


def test_distributed_ring_of_one_is_the_local_loss(dist_results):
    world, per_rank = dist_results
    x, y, t, b, ii, ti, n, m = _dist_global(world, "ids")
    for r in range(world):
        rs, cs = slice(sum(n[:r]), sum(n[: r + 1])), slice(sum(m[:r]), sum(m[: r + 1]))
        exact = _loss_and_grads(_dense, x[rs], y[cs], t, b, ii[rs], ti[cs], dtype=torch.float64)
        for got, e in zip(per_rank[r]["singleton"], exact):
            torch.testing.assert_close(got.double(), e, rtol=1e-5, atol=1e-6)


def test_distributed_ring_memory_is_local_plus_two_blocks(dist_results):
    """Received text data alive at once on any rank: the ring holds at most two remote text blocks
    (the one computed on, the one arriving) and two dY accumulators, each at most one rank's rows,
    whatever the world size; all_gather (the control) holds all W blocks, so the check can fail."""
    world, per_rank = dist_results
    for scenario, spec in _DIST_SCENARIOS.items():
        block_rows = max(spec["m"][:world])
        for rank, res in enumerate(per_rank):
            ring = res[(scenario, "torch", "ring")][5]
            assert ring["events"].count("rows") == world
            assert ring["texts"] <= 2 and ring["dy"] <= 2, (scenario, rank, ring)
            assert 0 < ring["max_rows"] <= block_rows, (scenario, rank, ring)
            gather = res[(scenario, "torch", "gather")][5]
            assert gather["texts"] == world and gather["max_rows"] == block_rows, (scenario, rank, gather)
            if world > 2:
                assert gather["texts"] > 2, "the control must break the ring's bound"


def test_distributed_ring_overlaps_transfer_with_compute(dist_results):
    """Before the row pass on block k, the transfer of block k + 1 is already posted."""
    world, per_rank = dist_results
    for res in per_rank:
        events = res[("ids", "torch", "ring")][5]["events"]
        rows = [i for i, e in enumerate(events) if e == "rows"]
        assert len(rows) == world
        for k, i in enumerate(rows):
            assert events[:i].count("send texts") == min(k + 1, world - 1), events


def test_dist_impl_is_checked():
    with pytest.raises(ValueError, match="dist_impl"):
        sigmoid_loss(_X, _Y, _T, _B, dist_impl="allreduce")


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n, m, d, ids", [(1, 1, 32, None), (300, 300, 64, None), (257, 1000, 256, 13),
                                          (1030, 515, 1024, 40), (129, 129, 768, None)])
def test_gpu_backends_vs_fp64(backend, dtype, n, m, d, ids):
    x, y, t, b, ii, ti = _inputs(n, m, d, ids=ids, dtype=dtype, device="cuda", seed=n + d)
    got = _loss_and_grads(_op(backend), x, y, t, b, ii, ti)
    _assert_at_precision_floor(got, x, y, t, b, ii, ti)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_matches_reference_deterministic_and_large_logits(backend):
    x, y, t, b, ii, ti = _inputs(700, 900, 128, ids=50, device="cuda", scale=100.0, seed=2)
    runs = [_loss_and_grads(_op(backend), x, y, t, b, ii, ti) for _ in range(2)]
    for r0, r1 in zip(*runs):
        assert torch.equal(r0, r1)
    ref = _loss_and_grads(_op("torch"), x, y, t, b, ii, ti)
    for r, e in zip(runs[0], ref):
        torch.testing.assert_close(r, e, rtol=1e-4, atol=1e-5 * max(1.0, e.abs().max().item()))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_memory_is_linear(backend):
    n, d = 16384, 256
    x, y, t, b, _, _ = _inputs(n, n, d, dtype=torch.bfloat16, device="cuda")
    x.requires_grad_(True)
    y.requires_grad_(True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    sigmoid_loss(x, y, t, b, backend=backend).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < 64 * n * d, f"{extra / 2**20:.1f} MiB extra; N x M fp32 logits would be {n * n * 4 / 2**20:.0f} MiB"


@pytest.mark.gpu
def test_gpu_auto_prefers_cuda_and_compiles():
    x, y, t, b, ii, ti = _inputs(100, 80, 64, ids=9, device="cuda", dtype=torch.bfloat16)
    assert ops.OPS["sigmoid_loss"].select(None, device=x.device, dtype=x.dtype).name == "cuda"
    torch.library.opcheck(torch.ops.sigvlp.sigmoid_loss.default,
                          (x.requires_grad_(True), y.requires_grad_(True), t, b, ii, ti, 0.01, True, "cuda"))
    compiled = torch.compile(lambda x, y: sigmoid_loss(x, y, t, b, image_ids=ii, text_ids=ti), fullgraph=True)
    torch.testing.assert_close(compiled(x, y), sigmoid_loss(x, y, t, b, image_ids=ii, text_ids=ti))
