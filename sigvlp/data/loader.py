"""A torch DataLoader of packed chunk batches read from the preprocessing cache.

Each worker takes every num_workers-th volume of the epoch's shuffled order, draws
chunks_per_volume chunks per volume, reads only those slices from the cache (memory map) and
emits a batch whenever the next chunk would pass the token budget. The random stream is
numpy's default_rng([seed, epoch, worker]), so a run with the same seed, epoch and number of
workers yields the same batches. A worker holds at most one batch under construction plus the
DataLoader's prefetch, so its memory is bounded by token_budget (checked against
max_worker_mb).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from sigvlp.data.chunks import ChunkConfig, ChunkSampler, chunk_text, organs_in_chunk
from sigvlp.data.collate import ByteTokenizer, collate_chunks


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


class ChunkStream(torch.utils.data.IterableDataset):
    def __init__(self, sources: Sequence[ChunkSource], chunk_config: ChunkConfig = ChunkConfig(),
                 config: LoaderConfig = LoaderConfig(), tokenizer=None):
        if not sources:
            raise ValueError("sources is empty: no volumes to read")
        self.sources = list(sources)
        self.chunk_config = chunk_config
        self.config = config
        self.tokenizer = tokenizer or ByteTokenizer()
        self.epoch = 0
        self.dtype = getattr(torch, config.dtype, None)
        if not isinstance(self.dtype, torch.dtype):
            raise ValueError(f"dtype must name a torch dtype, got {config.dtype!r}")
        pt, ph, pw = chunk_config.patch
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

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        rng = np.random.default_rng([self.config.seed, self.epoch, wid])
        pt, ph, pw = self.chunk_config.patch
        batch, used = [], 0
        for vi in self._order()[wid::nw]:
            src = self.sources[vi]
            from safetensors import safe_open

            with safe_open(src.file, framework="np") as f:
                image = f.get_slice("image")
                for _ in range(self.config.chunks_per_volume):
                    z0, z1 = self.sampler.sample(src.shape[0], rng)
                    tokens = -(-(z1 - z0) // pt) * (src.shape[1] // ph) * (src.shape[2] // pw)
                    if batch and used + tokens > self.config.token_budget:
                        yield self._collate(batch)
                        batch, used = [], 0
                    organs = organs_in_chunk(src.organ_profile, z0, z1, self.chunk_config)
                    batch.append({"image": np.asarray(image[z0:z1], dtype=np.float32), "name": src.name,
                                  "organs": organs, "z0": z0,
                                  "text": chunk_text(src.findings, organs, self.chunk_config.general)})
                    used += tokens
        if batch:
            yield self._collate(batch)

    def _collate(self, batch):
        return collate_chunks(batch, self.tokenizer, self.chunk_config.patch, self.config.max_text_tokens, self.dtype)


def _worker_init(_):
    torch.set_num_threads(1)  # workers are processes; one thread each avoids oversubscription


def make_loader(sources: Sequence[ChunkSource], chunk_config: ChunkConfig = ChunkConfig(),
                config: LoaderConfig = LoaderConfig(), tokenizer=None) -> torch.utils.data.DataLoader:
    """A DataLoader yielding collate_chunks batches (batch_size=None: batches are packed by
    token budget in the workers). Call loader.dataset.set_epoch(e) before each epoch."""
    stream = ChunkStream(sources, chunk_config, config, tokenizer)
    kwargs = {}
    if config.num_workers > 0:
        kwargs = {"prefetch_factor": config.prefetch_factor, "worker_init_fn": _worker_init,
                  "persistent_workers": False}
    return torch.utils.data.DataLoader(stream, batch_size=None, num_workers=config.num_workers, **kwargs)
