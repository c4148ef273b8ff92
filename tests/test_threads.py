"""sigvlp.threads: the CPU thread rule of train, demo and eval."""

from __future__ import annotations

import pytest
import torch

from sigvlp import threads


def test_rule_one_thread_per_free_core_capped():
    assert threads.default_threads(cores=2, busy=0) == 2  # idle 2-core machine
    assert threads.default_threads(cores=2, busy=1) == 1  # one competing busy process
    assert threads.default_threads(cores=2, busy=10) == 1  # never below one
    assert threads.default_threads(cores=16, busy=1) == threads.MAX_THREADS == 8
    assert threads.default_threads(cores=64, busy=60) == 4
    assert 1 <= threads.default_threads() <= threads.MAX_THREADS
    assert threads.cores_available() >= 1 and threads.busy_cores() >= 0


def test_apply_threads(monkeypatch):
    before = torch.get_num_threads()
    try:
        assert threads.apply_threads(3) == 3
        assert threads.apply_threads(0) == 3  # 0: left as it is
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert threads.apply_threads(None) == 3  # the environment pins it: unchanged
        monkeypatch.delenv("OMP_NUM_THREADS")
        monkeypatch.setattr(threads, "default_threads", lambda: 1)
        assert threads.apply_threads(None) == 1
        for bad in (-1, 1.5, True, "2"):
            with pytest.raises(ValueError, match="threads"):
                threads.apply_threads(bad)
    finally:
        torch.set_num_threads(before)


def test_train_runtime_applies_the_rule_on_the_cpu(monkeypatch):
    from sigvlp.train.builders import setup_runtime
    from sigvlp.train.config import TrainConfig

    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "default_threads", lambda: 1)
    try:
        torch.set_num_threads(2)
        if not torch.cuda.is_available():
            setup_runtime(TrainConfig(data="unused"))
            assert torch.get_num_threads() == 1
        setup_runtime(TrainConfig(data="unused", threads=2))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_loader_workers_leave_the_torch_threads_their_cores():
    assert threads.loader_workers(1, threads=2, cores=2, busy=0) == 0  # idle 2 cores, 2 threads: load in-process
    assert threads.loader_workers(1, threads=1, cores=2, busy=1) == 0  # one competitor: no free core
    assert threads.loader_workers(1, threads=1, cores=2, busy=0) == 1  # a free core: the worker runs there
    assert threads.loader_workers(1, threads=8, cores=16, busy=6) == 1
    # two or more workers are as many batch streams: fewer would change the batches, so kept
    assert threads.loader_workers(2, threads=2, cores=2, busy=0) == 2
    assert threads.loader_workers(4, threads=8, cores=16, busy=6) == 4
    assert threads.loader_workers(0, threads=1, cores=64, busy=0) == 0
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="requested"):
            threads.loader_workers(bad)


def test_no_worker_and_one_worker_give_the_same_batches(tmp_path):
    """What makes dropping the single worker a speed change only: the batch stream of one worker
    process equals the in-process one (same chunks, texts, pair ids), epoch after epoch."""
    import numpy as np

    from sigvlp.data.chunks import ChunkConfig
    from sigvlp.data.loader import ChunkSource, LoaderConfig, make_loader

    rng = np.random.default_rng(0)
    sources = []
    for i in range(6):
        from safetensors.numpy import save_file

        f = tmp_path / f"v{i}.safetensors"
        save_file({"image": rng.uniform(-1, 1, (12 + 4 * i, 8, 8)).astype(np.float16)}, str(f))
        sources.append(ChunkSource(name=f"v{i}", file=str(f), shape=(12 + 4 * i, 8, 8), organ_profile=None,
                                   findings={"organs": {}, "general": f"text {i}"}))
    chunks = ChunkConfig(patch=(4, 4, 4), min_slices=4, max_slices=12)
    runs = []
    for workers in (0, 1):
        loader = make_loader(sources, chunks, LoaderConfig(token_budget=32, num_workers=workers, seed=3))
        batches = []
        for epoch in (0, 1):
            loader.dataset.set_epoch(epoch)
            batches += list(loader)
        runs.append(batches)
    assert len(runs[0]) == len(runs[1]) >= 4
    for a, b in zip(*runs):
        assert torch.equal(a["patches"], b["patches"]) and a["z_ranges"] == b["z_ranges"]
        assert a["names"] == b["names"] and torch.equal(a["text_pair_ids"], b["text_pair_ids"])


def test_busy_cores_sees_a_competitor_started_just_before(monkeypatch):
    """The CPU counters over a fraction of a second, not the lagging load average: a busy process
    started a moment ago counts at once."""
    import subprocess
    import sys
    import time

    if threads._cpu_times({0}) is None:
        pytest.skip("no /proc/stat on this system: busy_cores falls back to the load average")
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (0.0, 0.0, 0.0))  # not what the answer rests on
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        assert threads.busy_cores() >= 1
    finally:
        spin.kill()
        spin.wait()


def test_busy_cores_arithmetic(monkeypatch):
    samples = iter([(100, 1000), (100 + 150, 1000 + 200)])  # 75% of 2 CPUs' time busy meanwhile
    monkeypatch.setattr(threads, "_cpu_times", lambda cpus: next(samples))
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert threads.busy_cores(sample_s=0.0) == 2  # round(2 * 0.75) = 2 (banker's: 1.5 -> 2)
    samples = iter([(0, 0), (0, 0)])  # no counters advanced: the load average decides
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (0.6, 0.0, 0.0))
    assert threads.busy_cores(sample_s=0.0) == 1
