"""A torch DataLoader of packed chunk batches read from the preprocessing cache.

``make_loader(dataset_or_sources, chunk_config, loader_config, cache=None, rank=0, world_size=1)``
takes a CTRateDataset (preprocessing it into the cache first, see CTRateDataset.cached) or a
list of ChunkSource.

Order and sharding: the epoch's volume order is a permutation drawn from (seed, epoch), the same
on every rank; rank r takes every world_size-th volume of it (disjoint across ranks, together
all volumes), and worker w of that rank every num_workers-th of those. Chunk draws use numpy's
default_rng([seed, epoch, rank, worker]), so a run with the same seed, epoch, rank, world size
and number of workers yields the same batches. Each worker draws chunks_per_volume chunks per
volume, reads only those slices from the cache (memory map) and emits a batch whenever the next
chunk would pass the token budget. A worker holds at most one batch under construction plus the
DataLoader's prefetch, so its memory is bounded by token_budget (checked against max_worker_mb).

Empty texts: a chunk whose text is empty (its volume has no findings entry and no report
findings) gets a unique pair id (never a positive of another chunk; ``empty_text="unique"``,
the default) or is dropped (``empty_text="drop"``). Either way it is counted in the batch
(``empty_texts``), in ``stream.stats`` (single-process loading) and logged per worker and epoch
on the "sigvlp.data" logger.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from sigvlp.data.chunks import ChunkConfig, ChunkSampler, chunk_text, organs_in_chunk
from sigvlp.data.collate import collate_chunks
from sigvlp.data.ctrate import CTRateDataset
from sigvlp.data.preprocess import as_cache, default_cache_root  # noqa: F401 - public here too (moved)
from sigvlp.data.tokenizers import ByteTokenizer

log = logging.getLogger("sigvlp.data")


@dataclass(frozen=True)
class LoaderConfig:
    token_budget: int = 8192  # image tokens per batch
    chunks_per_volume: int = 2
    num_workers: int = 2
    seed: int = 0
    max_text_tokens: int = 256
    shuffle: bool = True
    dtype: str = "float32"  # patches dtype: float32, float16 or bfloat16
    prefetch_factor: int = 2
    max_worker_mb: float = 1024.0
    empty_text: str = "unique"  # chunks with empty text: "unique" pair id, or "drop"

    def __post_init__(self):
        if self.empty_text not in ("unique", "drop"):
            raise ValueError(f"empty_text must be 'unique' or 'drop', got {self.empty_text!r}")
        for name in ("token_budget", "chunks_per_volume"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")


@dataclass
class ChunkSource:
    """What a worker needs to draw chunks from one cached volume (picklable)."""

    name: str
    file: str
    shape: tuple[int, int, int]
    organ_profile: Optional[np.ndarray]
    findings: Optional[dict]

    @classmethod
    def from_cache(cls, cached, findings: Optional[dict] = None, name: Optional[str] = None) -> "ChunkSource":
        return cls(name=name or cached.name, file=cached.file, shape=tuple(cached.shape),
                   organ_profile=cached.organ_profile, findings=findings)

    @classmethod
    def from_record(cls, record, cached) -> "ChunkSource":
        """A CTRateRecord and its CachedVolume. Text: the record's findings-bank entry; without
        one, the report's Findings_EN as a volume-level text (every chunk gets it)."""
        findings = record.findings
        if findings is None and record.report:
            text = (record.report.get("Findings_EN") or "").strip()
            findings = {"organs": {}, "general": text} if text else None
        return cls.from_cache(cached, findings, name=record.name)

    def read(self, z0: int, z1: int) -> np.ndarray:
        """Slices [z0, z1) of the cached image, (z1 - z0, Y, X) float16 (CachedVolume.read)."""
        from sigvlp.data.preprocess import CachedVolume

        return CachedVolume(file=self.file, shape=self.shape, spacing=(0.0, 0.0, 0.0), name=self.name).read(z0, z1)


class ChunkStream(torch.utils.data.IterableDataset):
    def __init__(self, sources: Sequence[ChunkSource], chunk_config: ChunkConfig = ChunkConfig(),
                 config: LoaderConfig = LoaderConfig(), tokenizer=None, *, rank: int = 0, world_size: int = 1):
        if not sources:
            raise ValueError("sources is empty: no volumes to read")
        if int(world_size) != world_size or world_size < 1:
            raise ValueError(f"world_size must be a positive integer, got {world_size}")
        if int(rank) != rank or not 0 <= rank < world_size:
            raise ValueError(f"rank must be an integer in [0, world_size={world_size}), got {rank}")
        if world_size > len(sources):
            raise ValueError(f"world_size {world_size} is larger than the number of volumes {len(sources)}: "
                             f"some ranks would get no data")
        self.sources = list(sources)
        self.chunk_config = chunk_config
        self.config = config
        self.tokenizer = tokenizer or ByteTokenizer()
        self.rank, self.world_size = int(rank), int(world_size)
        self.epoch = 0
        self.stats = {"chunks": 0, "empty_text": 0, "dropped": 0}
        self.dtype = getattr(torch, config.dtype, None)
        if not isinstance(self.dtype, torch.dtype):
            raise ValueError(f"dtype must name a torch dtype, got {config.dtype!r}")
        pt, ph, pw = chunk_config.patch
        for s in self.sources:
            if s.shape[1] % ph or s.shape[2] % pw:
                raise ValueError(f"{s.name}: cached in-plane size {s.shape[1]} x {s.shape[2]} is not a multiple "
                                 f"of the patch {ph} x {pw}; use a preprocessing size that is")
        planes = {(s.shape[1] // ph) * (s.shape[2] // pw) for s in self.sources}
        self.sampler = ChunkSampler(chunk_config, config.token_budget, max(planes))
        batch_mb = config.token_budget * pt * ph * pw * self.dtype.itemsize / 2 ** 20
        if batch_mb * (1 + config.prefetch_factor) > config.max_worker_mb:
            raise ValueError(f"token_budget {config.token_budget} needs {batch_mb:.0f} MB per batch, over "
                             f"max_worker_mb {config.max_worker_mb} with prefetch {config.prefetch_factor}")

    def set_epoch(self, epoch: int):
        self.epoch = int(epoch)

    def _order(self) -> list[int]:
        order = np.arange(len(self.sources))
        if self.config.shuffle:
            np.random.default_rng([self.config.seed, self.epoch]).shuffle(order)
        return order.tolist()

    def shard(self) -> list[int]:
        """Indices of the sources this rank reads this epoch (before the split among workers)."""
        return self._order()[self.rank::self.world_size]

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        rng = np.random.default_rng([self.config.seed, self.epoch, self.rank, wid])
        pt, ph, pw = self.chunk_config.patch
        batch, used = [], 0
        counts = {"chunks": 0, "empty_text": 0, "dropped": 0}
        for vi in self.shard()[wid::nw]:
            src = self.sources[vi]
            for _ in range(self.config.chunks_per_volume):
                z0, z1 = self.sampler.sample(src.shape[0], rng)
                organs = organs_in_chunk(src.organ_profile, z0, z1, self.chunk_config)
                text = chunk_text(src.findings, organs, self.chunk_config.general)
                # Unique across (rank, worker) and chunks of this epoch: the pair id of an empty text.
                uid = (counts["chunks"] * self.world_size + self.rank) * nw + wid
                counts["chunks"] += 1
                if not text:
                    counts["empty_text"] += 1
                    if self.config.empty_text == "drop":
                        counts["dropped"] += 1
                        continue
                tokens = -(-(z1 - z0) // pt) * (src.shape[1] // ph) * (src.shape[2] // pw)
                if batch and used + tokens > self.config.token_budget:
                    yield self._collate(batch)
                    batch, used = [], 0
                batch.append({"image": src.read(z0, z1), "name": src.name,  # fp16: the collate converts
                              "organs": organs, "z0": z0, "text": text, "uid": uid})
                used += tokens
        if batch:
            yield self._collate(batch)
        for k, v in counts.items():
            self.stats[k] += v
        if counts["empty_text"]:
            action = "dropped" if self.config.empty_text == "drop" else "given unique pair ids"
            log.warning("epoch %d rank %d worker %d: %d of %d chunks had an empty text (%s)", self.epoch,
                        self.rank, wid, counts["empty_text"], counts["chunks"], action)

    def _collate(self, batch):
        return collate_chunks(batch, self.tokenizer, self.chunk_config.patch, self.config.max_text_tokens, self.dtype)


def _worker_init(_):
    torch.set_num_threads(1)  # workers are processes; one thread each avoids oversubscription


def make_loader(data, chunk_config: ChunkConfig = ChunkConfig(), config: LoaderConfig = LoaderConfig(),
                tokenizer=None, *, cache=None, rank: int = 0, world_size: int = 1,
                workers: int = 0) -> torch.utils.data.DataLoader:
    """A DataLoader yielding collate_chunks batches (batch_size=None: batches are packed by
    token budget in the workers). Call loader.dataset.set_epoch(e) before each epoch.

    data: a CTRateDataset (its usable volumes are preprocessed into `cache` first; `workers`
    processes for that step) or a sequence of ChunkSource.
    cache: PreprocessCache, PreprocessConfig or preset name, or None (see as_cache); only used
    with a dataset. rank / world_size: this process's shard (volumes disjoint across ranks).
    Errors: ValueError for no volumes, a bad rank/world_size or a budget over max_worker_mb;
    TypeError for other `data`.
    """
    if isinstance(data, CTRateDataset):
        entries = data.cached(as_cache(cache, data.root), workers=workers)
        if not entries:
            raise ValueError(f"{data.root}: no usable volumes for split {data.split!r}\n"
                             f"{data.scan.summary()}\n{data.cache_report.summary()}")
        sources = [ChunkSource.from_record(rec, cv) for rec, cv in entries]
    elif isinstance(data, (list, tuple)) and all(isinstance(s, ChunkSource) for s in data):
        sources = list(data)
    else:
        raise TypeError(f"data must be a CTRateDataset or a list of ChunkSource, got {type(data).__name__}"
                        + (" (build_cache entries? pass the dataset itself)" if isinstance(data, (list, tuple)) else ""))
    stream = ChunkStream(sources, chunk_config, config, tokenizer, rank=rank, world_size=world_size)
    kwargs = {}
    if config.num_workers > 0:
        kwargs = {"prefetch_factor": config.prefetch_factor, "worker_init_fn": _worker_init,
                  "persistent_workers": False}
    return torch.utils.data.DataLoader(stream, batch_size=None, num_workers=config.num_workers, **kwargs)
