"""sigmoid_loss forward+backward: time and peak extra memory per provider, against the dense
PyTorch formula (N x M logits kept for backward) as the baseline.

Providers: dense (eager), dense_compile (torch.compile of the dense formula, GPU), sigvlp's torch
reference, triton and cuda backends (GPU), open_clip SigLipLoss dense and chunked (when
open_clip_torch is installed: `pip install sigvlp[open_clip]`).
Full mode (GPU): N in {4k, 16k, 65k}, D in {512, 1024}, bf16. Quick CPU mode: N up to 8192,
D 256, fp32, reference vs dense only. Peak memory is measured: torch.cuda.max_memory_allocated on
GPU; on CPU the allocator's timeline recorded by torch.profiler (profile_memory=True), replayed to
find the peak of live bytes allocated during the call. Reported, never asserted.

CPU peak RSS (`test_sigmoid_loss_cpu_peak_rss`): the torch backend's forward + backward at N = M =
8192, D = 256, fp32 against the dense formula's, each in a fresh process (peak RSS, VmHWM reset by /proc/self/clear_refs, after the call
minus before it, after a small warm-up call that loads the libraries). Also a script:
`python benches/bench_sigmoid_loss.py --rss dense|torch N D` prints the extra MiB.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import _bench

from sigvlp.ops import OPS, sigmoid_loss
from sigvlp.ops.sigmoid_loss import sigmoid_loss_dense

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
BASELINE = "dense"


def _sizes(full):
    if full:
        return [(n, d) for d in (512, 1024) for n in (4096, 16384, 65536)]
    return [(512, 128)] if _bench.smoke() else [(2048, 256), (8192, 256)]


def _providers(full):
    if full:
        return ["dense", "dense_compile", "torch", "triton", "cuda", "open_clip_dense", "open_clip_chunked"]
    return ["dense", "torch", "open_clip_dense", "open_clip_chunked"]


def _inputs(n, d, dtype):
    g = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(n, d, generator=g), dim=1).to(DEVICE, dtype).requires_grad_(True)
    y = F.normalize(torch.randn(n, d, generator=g), dim=1).to(DEVICE, dtype).requires_grad_(True)
    t = torch.tensor(10.0, device=DEVICE, requires_grad=True)
    b = torch.tensor(-10.0, device=DEVICE, requires_grad=True)
    return x, y, t, b


def _loss_fn(provider, n):
    if provider == "dense":
        return lambda x, y, t, b: sigmoid_loss_dense(x, y, t, b)
    if provider == "dense_compile":
        return torch.compile(lambda x, y, t, b: sigmoid_loss_dense(x, y, t, b))
    if provider.startswith("open_clip"):
        loss_mod = pytest.importorskip("open_clip.loss", reason="open_clip_torch not installed (optional extra)")
        if provider == "open_clip_dense":
            crit = loss_mod.SigLipLoss(cache_labels=False, rank=0, world_size=1)
        else:
            try:
                crit = loss_mod.SigLipLoss(cache_labels=False, rank=0, world_size=1, chunk_size=max(1, n // 16))
            except TypeError:
                pytest.skip("this open_clip has no chunked SigLipLoss")
        return lambda x, y, t, b: crit(x, y, t, b)
    reason = OPS["sigmoid_loss"].backends[provider].refusal(torch.device(DEVICE), torch.float32)
    if reason:
        pytest.skip(reason)
    return lambda x, y, t, b: sigmoid_loss(x, y, t, b, backend=provider)


def _step(fn, args):
    for a in args:
        a.grad = None
    fn(*args).backward()
    if HAS_CUDA:
        torch.cuda.synchronize()


def _cpu_peak_bytes(run) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def _peak_bytes(run) -> int:
    if not HAS_CUDA:
        return _cpu_peak_bytes(run)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    run()
    return torch.cuda.max_memory_allocated() - base


@pytest.mark.parametrize("provider", _providers(True))
@pytest.mark.parametrize("n, d", _sizes(False) + _sizes(True), ids=lambda v: str(v))
def test_sigmoid_loss_fwd_bwd(bench, benchmark, bench_report, full_mode, provider, n, d):
    if (n, d) not in _sizes(full_mode) or provider not in _providers(full_mode):
        pytest.skip("not in this mode's sizes")
    dtype = torch.bfloat16 if full_mode else torch.float32
    args = _inputs(n, d, dtype)
    fn = _loss_fn(provider, n)
    run = lambda: _step(fn, args)  # noqa: E731
    try:
        peak = _peak_bytes(run)  # also the warm-up (compilation, autotuning)
    except torch.OutOfMemoryError:
        pytest.skip("out of memory")
    benchmark.group = f"sigmoid_loss N={n} D={d}"
    seconds = bench.time(run, rounds=5 if full_mode else 2).median
    key = ("sigmoid_loss", n, d)
    if provider == BASELINE:
        bench_report.baselines[key + ("ms",)] = seconds
        bench_report.baselines[key + ("peak",)] = float(peak)
    base_peak = bench_report.baselines.get(key + ("peak",))
    flops = 6.0 * n * n * d  # useful work of fwd+bwd: S, dX, dY (the fused design does 8 N M D)
    bench.record(op="sigmoid_loss fwd+bwd", provider=provider, shape=f"N={n} D={d}", dtype=dtype, flops=flops,
                 peak_bytes=peak, baseline=None if provider == BASELINE else BASELINE,
                 mem_pct_of_dense=None if not base_peak else 100.0 * peak / base_peak)


# ----------------------------------------------------------------------------- CPU peak RSS


def _rss_extra_mib(provider: str, n: int, d: int) -> float:
    """Extra peak RSS (MiB) of one fp32 forward + backward, measured in a fresh process."""
    result = subprocess.run([sys.executable, str(pathlib.Path(__file__).resolve()), "--rss", provider, str(n), str(d)],
                            capture_output=True, text=True, timeout=900, check=True)
    return float(result.stdout.split()[-1])


def _rss_main(provider: str, n: int, d: int) -> None:
    import resource

    g = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(n, d, generator=g), dim=1).requires_grad_(True)
    y = F.normalize(torch.randn(n, d, generator=g), dim=1).requires_grad_(True)
    t = torch.tensor(10.0, requires_grad=True)
    b = torch.tensor(-10.0, requires_grad=True)
    fn = sigmoid_loss_dense if provider == "dense" else (lambda *a: sigmoid_loss(*a, backend=provider))
    small = [v[:64].detach().clone().requires_grad_(True) for v in (x, y)]
    fn(*small, t, b).backward()  # warm-up: libraries and thread pools loaded before measuring
    t.grad = b.grad = None
    if os.path.exists("/proc/self/clear_refs"):
        # ru_maxrss keeps the parent's (pytest's) high-water mark across exec, so a child forked
        # from a large process reads 0; reset this process's own peak (VmHWM) instead.
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _status_kib("VmRSS")
        fn(x, y, t, b).backward()
        print((_status_kib("VmHWM") - before) / 1024.0)
        return
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn(x, y, t, b).backward()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print((after - before) / 1024.0)  # ru_maxrss is in KiB on Linux


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


@pytest.mark.skipif(HAS_CUDA, reason="the CPU memory measurement (GPU memory is in test_sigmoid_loss_fwd_bwd)")
def test_sigmoid_loss_cpu_peak_rss(bench):
    n, d = (1024, 128) if _bench.smoke() else (8192, 256)
    dense = _rss_extra_mib("dense", n, d)
    ours = _rss_extra_mib("torch", n, d)
    shape = f"N=M={n} D={d} fwd+bwd, fresh process peak RSS (VmHWM)"
    bench.record(op="sigmoid_loss_cpu_rss", provider="dense", shape=shape, dtype=torch.float32,
                 peak_bytes=dense * 2**20)
    bench.record(op="sigmoid_loss_cpu_rss", provider="torch", shape=shape, dtype=torch.float32,
                 peak_bytes=ours * 2**20, baseline="dense", pct_of_dense=100.0 * ours / dense if dense > 0 else None)


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--rss":
        _rss_main(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        sys.exit("usage: python benches/bench_sigmoid_loss.py --rss dense|torch N D")
