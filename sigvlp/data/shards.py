"""Preprocessing a dataset in shares: processes, machines (``sigvlp preprocess --shard I/N``) and
DDP ranks (``ddp_preprocess``), all writing one cache folder (``PreprocessCache``: atomic entries,
a manifest file per process).

Shares: the records sorted by VolumeName, record j going to share j mod N: disjoint, deterministic,
the same on every machine, and balanced when volumes of every size are spread over the names.
Under DDP every rank builds its share of the entries still missing, then waits (polling the
manifest, no collective and so no collective timeout) until every record of the dataset has an
entry or a recorded failure; when the ranks do not share the cache folder (each machine its own
disk), the shares are per machine (LOCAL_RANK of LOCAL_WORLD_SIZE) and each machine builds all.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Callable, Optional, Sequence

__all__ = ["parse_shard", "shard_records", "preprocess_records", "wait_for_entries", "ddp_preprocess"]

log = logging.getLogger("sigvlp.data")


def parse_shard(text: str) -> tuple[int, int]:
    """"I/N" -> (I, N), 0 <= I < N. ValueError naming the expected form."""
    try:
        i, n = (int(v) for v in str(text).split("/"))
    except ValueError:
        raise ValueError(f"--shard: expected I/N with integers, I counting from 0 (e.g. 0/4), got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"--shard: expected 0 <= I < N, got {text!r}")
    return i, n


def shard_records(records: Sequence, index: int, count: int) -> list:
    """Share ``index`` of ``count``: the records sorted by name, every count-th from index."""
    return sorted(records, key=lambda r: r.name)[index::count]


def _key(cache, dataset, rec) -> str:
    return cache.manifest_key(rec.path, rec.mask_path, rec.metadata, dataset.already_hu)


def preprocess_records(dataset, cache, records: Sequence, *, workers: int = 1, progress: bool = False,
                       desc: str = "preprocess") -> tuple[int, list[tuple[str, str]]]:
    """Build the cache entries of ``records`` (of ``dataset``) with ``workers`` processes; entries
    already in the cache are skipped (resumable). A tqdm bar (volumes/s, ETA) when progress.
    Returns (entries done, [(path, reason)] skipped); each failure is recorded in the manifest."""
    from tqdm import tqdm

    from sigvlp.data.ctrate import _cache_one, _run_pool

    todo = [r for r in records if not (cache.lookup(_key(cache, dataset, r)) or {}).get("entry")]
    jobs = [(cache, r.path, r.mask_path, r.metadata, r.name, str(dataset.root), dataset.already_hu) for r in todo]
    skipped: list[tuple[str, str]] = []
    bar = tqdm(total=len(records), initial=len(records) - len(todo), desc=desc, unit="vol", disable=not progress,
               smoothing=0.1, dynamic_ncols=True)

    def done(i, result):
        ok, value = result
        if not ok:
            skipped.append((str(todo[i].path), value))
            cache.record(_key(cache, dataset, todo[i]), error=value)
        bar.update(1)

    if workers > 1 and len(jobs) > 1:
        _run_pool(jobs, workers, on_result=done)
    else:
        for i, job in enumerate(jobs):
            done(i, _cache_one(job))
    bar.close()
    return len(records) - len(skipped), skipped


def wait_for_entries(dataset, cache, records: Sequence, *, poll: float = 5.0,
                     say: Optional[Callable[[str], None]] = None) -> None:
    """Block until every record has a manifest entry or failure in ``cache`` (other processes
    building them); says how many are left every minute. No timeout: the run's launcher ends a
    job whose peers died."""
    say = say or log.info
    last = 0.0
    while True:
        left = [r for r in records if cache.lookup(_key(cache, dataset, r)) is None]
        if not left:
            return
        if time.monotonic() - last >= 60:
            say(f"data: waiting for {len(left)} of {len(records)} cache entries built by the other ranks "
                f"(polling every {poll:g} s; no collective timeout applies)")
            last = time.monotonic()
        time.sleep(poll)
        cache.manifest(reload=True)


def _shared_folder(cache, rank: int) -> bool:
    """Whether every rank sees the same cache folder: rank 0 writes a token, every rank looks."""
    import uuid

    import torch
    import torch.distributed as dist

    token = [uuid.uuid4().hex if rank == 0 else None]
    dist.broadcast_object_list(token, src=0)
    probe = cache.dir / "manifest" / f".probe-{token[0]}"
    if rank == 0:
        probe.parent.mkdir(parents=True, exist_ok=True)
        probe.touch()
    dist.barrier()  # quick: nothing is built before it
    seen = torch.tensor([1 if probe.exists() else 0])
    dist.all_reduce(seen, op=dist.ReduceOp.MIN)
    dist.barrier()
    if rank == 0:
        probe.unlink(missing_ok=True)
    return bool(seen.item())


def ddp_preprocess(dataset, cache, *, workers: int = 0, say: Optional[Callable[[str], None]] = None,
                   poll: float = 5.0) -> list:
    """Under torch.distributed: every rank builds its share of the missing entries, waits for the
    others through the cache folder, then returns [(record, CachedVolume)] of the usable volumes
    (failures skipped, counted and logged, never retried here). Every rank must call it."""
    import torch.distributed as dist

    from sigvlp.data.preprocess import CachedVolume

    say = say or log.info
    rank, world = dist.get_rank(), dist.get_world_size()
    if not _shared_folder(cache, rank):
        rank = int(os.environ.get("LOCAL_RANK", rank % max(1, int(os.environ.get("LOCAL_WORLD_SIZE", world)))))
        world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        say(f"data: the cache folder {cache.dir} is not shared by all ranks: each machine builds all entries, "
            f"shared by its {world} local ranks")
    records = list(dataset.records)
    mine = shard_records(records, rank, world)
    t0 = time.monotonic()
    built, skipped = preprocess_records(dataset, cache, mine, workers=max(1, workers))
    say(f"data: rank {dist.get_rank()} settled its share of {len(mine)} of {len(records)} volumes "
        f"({len(skipped)} skipped) in {time.monotonic() - t0:.1f} s; waiting for the others without a timeout")
    wait_for_entries(dataset, cache, records, poll=poll, say=say)
    entries, failed = [], []
    for rec in records:
        got = cache.lookup(_key(cache, dataset, rec))
        if got and "entry" in got:
            cv = CachedVolume.open(cache.dir / got["entry"])
            cv.source = str(rec.path)
            entries.append((rec, cv))
        else:
            failed.append((str(rec.path), (got or {}).get("error", "no entry")))
    if failed:
        say(f"data: {len(failed)} volume(s) skipped by preprocessing: " + "; ".join(m for _, m in failed[:5])
            + (" ..." if len(failed) > 5 else ""))
    return entries
