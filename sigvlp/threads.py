"""How many torch CPU threads and data-loader worker processes `sigvlp train`, `sigvlp demo` and
`sigvlp eval` use on the CPU.

The rule (docs/training.md, "CPU threads", has the measurements behind it): one thread per core that is free
when the command starts, at least 1 and at most MAX_THREADS, and a single loader worker only on a core left over:

    busy    = round(busy share of this process's CPUs over SAMPLE_S seconds of /proc/stat x their number)
    threads = clamp(cores available to this process - busy, 1, MAX_THREADS)
    workers = 0 if num_workers == 1 and cores - busy - threads < 1 else num_workers
              (0: batches load in the process between steps; the same batches as one worker)

- Idle 2-core machine: 2 threads, batches loaded in the process. One competing busy process:
  1 thread. A torch thread that shares its core with a busy process (or with a data worker)
  stalls every parallel op of the others at its barrier: on 2 cores under load, 2 threads
  measured 19 s a demo step against 1.0 s with 1 thread; a thread per free core keeps the step
  near the 1-thread idle time.
- MAX_THREADS = 8: the tiny/demo step is ~2000 ops of 4096-row tensors, most under 1 ms on one
  core, where OpenMP's fork/join costs grow with the thread count; past ~8 threads the step
  stops gaining (an assumption from the op sizes, not measured on 16 or 64 cores here) and a
  shared machine keeps its other cores. Larger models on many cores: pass --threads N.
- busy is measured now, not read from the 1-minute load average (which still counts a job that
  ended a minute ago and misses one started seconds ago); the load average is the fallback
  where /proc/stat is missing.

`threads` given explicitly (TrainConfig.threads, --threads): N > 0 uses N, 0 leaves torch's
default (all cores); None applies the rule, unless OMP_NUM_THREADS is set in the environment
(then torch already uses it: tests pin their subprocesses that way).
"""

from __future__ import annotations

import os
import time
from typing import Optional

import torch

__all__ = ["MAX_THREADS", "cores_available", "busy_cores", "default_threads", "apply_threads", "loader_workers"]

MAX_THREADS = 8


def _cpus() -> set:
    """The CPUs this process may run on: its affinity mask where the OS has one, else all."""
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return set(range(os.cpu_count() or 1))


def cores_available() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    return len(_cpus())


#: seconds busy_cores() samples the CPUs' time counters for (/proc/stat)
SAMPLE_S = 0.2


def _cpu_times(cpus: set) -> Optional[tuple[int, int]]:
    """(busy, total) jiffies summed over `cpus` from /proc/stat (Linux), None elsewhere."""
    try:
        with open("/proc/stat") as f:
            lines = [ln.split() for ln in f if ln.startswith("cpu") and ln[3:4].isdigit()]
    except OSError:
        return None
    busy = total = 0
    for fields in lines:
        if int(fields[0][3:]) in cpus:
            ticks = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
            total += sum(ticks)
            busy += sum(ticks) - ticks[3] - ticks[4]
    return (busy, total) if total else None


def busy_cores(sample_s: float = SAMPLE_S) -> int:
    """Cores kept busy by other work now: on Linux, the busy share of this process's CPUs over
    `sample_s` seconds of /proc/stat's counters (this process sleeps meanwhile) times their
    number, rounded; elsewhere the 1-minute load average, rounded; 0 where neither is known.
    (The load average lags by about a minute: after a job ends it still counts it.)"""
    cpus = _cpus()
    first = _cpu_times(cpus)
    if first is not None:
        time.sleep(sample_s)
        second = _cpu_times(cpus)
        if second is not None and second[1] > first[1]:
            return int(round(len(cpus) * (second[0] - first[0]) / (second[1] - first[1])))
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


def loader_workers(requested: int, threads: Optional[int] = None, cores: Optional[int] = None,
                   busy: Optional[int] = None) -> int:
    """Data-loader worker processes for training on the CPU, the same batches either way: 0 when one
    worker is requested and no core is left free by the torch threads and other work
    (cores - busy - threads < 1), else `requested`. 0 loads the batches in the training process
    between steps.

    One worker and none draw the same single stream of batches (sigvlp.data.loader: the in-process
    loader is worker 0 of 1), so dropping it changes speed only. Two or more workers split the
    volumes into that many streams whose batches the DataLoader interleaves; fewer would change
    the batches (and a resumed run's position in them), so such a request is kept as it is.

    Why: a worker process on a core that torch's threads use preempts one of them at every
    parallel op (their barrier waits for it): the demo's step on 2 idle cores measured 373 ms with
    2 threads and one worker against 276 ms with 2 threads and the batches loaded in the process
    (about 32 ms of that), and 315 ms with 1 thread and one worker (docs/training.md, "CPU
    threads"). threads / cores / busy default to torch's thread count and this machine's now.
    ValueError for a negative or non-integer `requested`."""
    if isinstance(requested, bool) or not isinstance(requested, int) or requested < 0:
        raise ValueError(f"requested: expected an integer >= 0, got {requested!r}")
    if requested != 1:
        return requested
    threads = torch.get_num_threads() if threads is None else int(threads)
    cores = cores_available() if cores is None else int(cores)
    busy = busy_cores() if busy is None else int(busy)
    return 1 if cores - busy - threads >= 1 else 0
