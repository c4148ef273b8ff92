"""Timing shared by the GPU/CPU op benchmarks."""

from __future__ import annotations

import torch


def timed(benchmark, fn, *, rounds: int, iterations: int = 1) -> float:
    """Median seconds of fn() under pytest-benchmark, synchronising CUDA so GPU work is counted.

    One untimed call first absorbs compilation and autotuning."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

    def run():
        fn()
        sync()

    run()
    benchmark.pedantic(run, rounds=rounds, iterations=iterations, warmup_rounds=1)
    return benchmark.stats.stats.median
