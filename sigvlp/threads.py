"""How many torch CPU threads `sigvlp train`, `sigvlp demo` and `sigvlp eval` use on the CPU.

The rule (docs/training.md, "CPU threads", has the measurements behind it): one thread per core that is free
when the command starts, at least 1 and at most MAX_THREADS:

    threads = clamp(cores available to this process - round(1-minute load average), 1, MAX_THREADS)

- Idle 2-core machine: 2 threads (the fastest idle step). One competing busy process: 1 thread.
  A torch thread that shares its core with a busy process stalls every parallel op of the
  others at its barrier: on 2 cores under load, 2 threads measured 19 s a demo step against
  1.0 s with 1 thread; a thread per free core keeps the step near the 1-thread idle time.
- MAX_THREADS = 8: the tiny/demo step is ~2000 ops of 4096-row tensors, most under 1 ms on one
  core, where OpenMP's fork/join costs grow with the thread count; past ~8 threads the step
  stops gaining (an assumption from the op sizes, not measured on 16 or 64 cores here) and a
  shared machine keeps its other cores. Larger models on many cores: pass --threads N.

`threads` given explicitly (TrainConfig.threads, --threads): N > 0 uses N, 0 leaves torch's
default (all cores); None applies the rule, unless OMP_NUM_THREADS is set in the environment
(then torch already uses it: tests pin their subprocesses that way). The load average lags (a minute's average): a
competitor started seconds before is not seen yet.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

__all__ = ["MAX_THREADS", "cores_available", "busy_cores", "default_threads", "apply_threads"]

MAX_THREADS = 8


def cores_available() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def busy_cores() -> int:
    """Cores kept busy by other work: the 1-minute load average, rounded (0 where unknown)."""
    try:
        return int(round(os.getloadavg()[0]))
    except (AttributeError, OSError):
        return 0


def default_threads(cores: Optional[int] = None, busy: Optional[int] = None, cap: int = MAX_THREADS) -> int:
    """The rule: clamp(cores - busy, 1, cap); cores / busy default to this machine's now."""
    cores = cores_available() if cores is None else int(cores)
    busy = busy_cores() if busy is None else int(busy)
    return max(1, min(int(cap), cores - busy))


def apply_threads(threads: Optional[int]) -> int:
    """Set torch's CPU threads: None -> default_threads() (or unchanged when OMP_NUM_THREADS is set),
    0 -> torch's default (unchanged), N -> N. Returns the thread count in use. A negative or
    non-integer value is a ValueError naming it."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 0):
        raise ValueError(f"threads: expected an integer >= 0 or None, got {threads!r}")
    if threads is None and os.environ.get("OMP_NUM_THREADS", "").strip():
        threads = 0
    n = default_threads() if threads is None else threads
    if n > 0:
        torch.set_num_threads(n)
    return torch.get_num_threads()
