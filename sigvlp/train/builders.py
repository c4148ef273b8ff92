"""The builders of a training run, each a function of the TrainConfig (and what it needs):
the distributed runtime, the model (and the word list of a "word" tokenizer), the tokenizer,
the data, the optimizer with its schedule, autocast and the DDP / compiled wrapper.

``Trainer.__init__`` (sigvlp.train.trainer) is the list of these calls. The model config owns
the settings the weights depend on (sigvlp.train.config); the tokenizer is built from it and
handed to the data, never taken back from a model.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from sigvlp.checkpoint import latest_checkpoint
from sigvlp.data import CTRateDataset, ChunkSource, LoaderConfig, PreprocessCache, WordTokenizer, load_tokenizer
from sigvlp.data import make_loader, preset
from sigvlp.data.findings import no_bank_notice
from sigvlp.data.organs import ORGANS
from sigvlp.data.preprocess import default_cache_root
from sigvlp.model import SigVLP, SigVLPConfig
from sigvlp.model.modeling import short_repr
from sigvlp.optim import MuonWithAdamW, split_params
from sigvlp.prompts import LABEL_ORGANS, abnormality_prompts, organ_prompts
from sigvlp.threads import apply_threads, loader_workers
from sigvlp.train.config import TrainConfig

__all__ = ["Runtime", "TrainData", "build_autocast", "build_data", "build_model", "build_optimizer",
           "build_tokenizer", "build_word_vocab", "check_model_config", "lr_factor", "resolve_data_paths",
           "setup_runtime", "wrap_model"]


# ----------------------------------------------------------------------------- runtime
@dataclass(frozen=True)
class Runtime:
    """This process's place in the run: rank, world size, device and process group (None alone)."""

    rank: int
    world: int
    device: torch.device
    group: Optional[object] = None

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_runtime(config: TrainConfig) -> Runtime:
    """Rank and world size from torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK; one process
    without them), the device (cuda:LOCAL_RANK when CUDA is available, else the CPU), the process
    group (NCCL on GPU, gloo on CPU; initialised here when needed) and config.threads (on the CPU,
    None applies sigvlp.threads' rule)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)  # before NCCL initialises
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if device.type == "cpu":
        apply_threads(config.threads)  # None: one thread per free core (sigvlp.threads)
    elif config.threads:
        torch.set_num_threads(config.threads)
    return Runtime(rank, world, device, dist.group.WORLD if world > 1 else None)


# ----------------------------------------------------------------------------- model
def check_model_config(saved: SigVLPConfig, wanted: SigVLPConfig, where: str) -> None:
    """ValueError naming every weight-shaping field where `saved` (a checkpoint's SigVLPConfig) and
    `wanted` (the run's) differ; runtime fields (attn_backend, grad_checkpointing) may differ."""
    diff = saved.diff(wanted)
    if diff:
        fields = ", ".join(f"{k} (checkpoint {short_repr(a)}, requested {short_repr(b)})"
                           for k, (a, b) in diff.items())
        raise ValueError(f"{where}: model config differs from the requested one in field(s): {fields}; "
                         "set --model / --set model.FIELD=VALUE to match the checkpoint")


def build_model(config: TrainConfig, *, resume_dir=None, from_dataset: bool = True,
                log: Callable[[str], None] = print) -> SigVLP:
    """SigVLP(preset(config.model, **config.model_overrides)), or the init_from checkpoint (its
    config must be that one), or ``SigVLP.from_siglip(config.init_siglip, **config.model_overrides)``
    (geometry and weights from the SigLIP folder; config.model is not used). A "word" tokenizer without a word list gets build_word_vocab's
    (from init_from, the run's latest checkpoint under resume_dir, or the dataset when
    from_dataset). ValueError for bad model_overrides; FileNotFoundError for a bad init_from."""
    if config.init_siglip:
        return SigVLP.from_siglip(config.init_siglip, **config.model_overrides)
    try:
        mcfg = SigVLPConfig.preset(config.model, **config.model_overrides)
    except TypeError as e:
        raise ValueError(f"model_overrides: {e}") from None
    if config.init_from and not (Path(config.init_from) / "config.json").is_file():
        raise FileNotFoundError(f"init_from: {config.init_from} is not a save_pretrained folder (no config.json)")
    if mcfg.tokenizer == "word" and mcfg.vocab is None:
        saved = [config.init_from] if config.init_from else []
        saved += [latest_checkpoint(resume_dir)] if resume_dir is not None else []
        mcfg = mcfg.replace(vocab=build_word_vocab(config, saved, from_dataset=from_dataset, log=log))
    if not config.init_from:
        return SigVLP(mcfg)
    # the checkpoint must be the model the config (and config.yaml) names
    check_model_config(SigVLP.load_config(config.init_from), mcfg, f"init_from {config.init_from}")
    return SigVLP.from_pretrained(config.init_from, config=mcfg)


def _strings(x):
    if isinstance(x, str):
        yield x
    elif isinstance(x, dict):
        for v in x.values():
            yield from _strings(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _strings(v)


def build_word_vocab(config: TrainConfig, saved: Sequence = (), *, from_dataset: bool = True,
                     log: Callable[[str], None] = print) -> tuple[str, ...]:
    """The word list of a "word" tokenizer left open in the config: the first of the `saved`
    checkpoint folders (None entries skipped) with a word list, else (from_dataset) built from
    the training texts (what the loader pairs chunks with: the findings bank's sentences, else the
    report's findings) and every prompt statement (sigvlp.prompts). ValueError when neither."""
    for where in saved:
        if where and (Path(where) / "config.json").is_file():
            cfg = SigVLP.load_config(where)
            if cfg.tokenizer == "word" and cfg.vocab:
                return cfg.vocab
    if not from_dataset:
        raise ValueError("model tokenizer 'word': give its vocab (model_overrides) when training from a batch "
                         "source; the word list is built from the dataset's reports")
    paths = resolve_data_paths(config)
    ds = CTRateDataset(paths["root"], config.split, masks_dir=paths["masks"], findings=paths["findings"],
                       layout=config.layout)
    texts = [t for rec in ds for t in _strings(rec.findings)]
    texts += [rec.report.get("Findings_EN") for rec in ds if rec.findings is None and rec.report]
    labels = list(LABEL_ORGANS) + sorted({k for rec in ds for k in (rec.labels or {})} - set(LABEL_ORGANS))
    texts += [t for lab in labels for t in abnormality_prompts(lab)]
    texts += [t for org in ORGANS for t in organ_prompts(org)]
    vocab = WordTokenizer.build_vocab(texts)
    log(f"word tokenizer: {len(vocab)} words from {len(ds)} reports and the prompt statements")
    return vocab


def build_tokenizer(model_config: SigVLPConfig):
    """The tokenizer a model config names (sigvlp.data.load_tokenizer of tokenizer, vocab)."""
    return load_tokenizer(model_config.tokenizer, vocab=model_config.vocab)


# ----------------------------------------------------------------------------- data
def resolve_data_paths(config: TrainConfig) -> dict:
    """The dataset folder of a config, checked, with its masks and findings options (explicit
    paths, else "auto": sigvlp.data finds them under the dataset root)."""
    if config.data is None:
        raise ValueError("data: no dataset folder given (--data DIR, or `data:` in the config file); "
                         "`sigvlp synth --out DIR` writes a phantom dataset in the CT-RATE layout")
    root = Path(config.data).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data: no such dataset folder {root} (expected the CT-RATE layout: "
                                f"dataset/{config.split}/..., radiology_text_reports/, ...; "
                                "`sigvlp synth --out DIR` writes one)")
    masks, findings = "auto", "auto"
    if config.masks:
        masks = Path(config.masks).expanduser()
        if not masks.is_dir():
            raise FileNotFoundError(f"masks: no such folder {masks}")
    if config.findings:
        findings = Path(config.findings).expanduser()
        if not findings.is_file():
            raise FileNotFoundError(f"findings: no such findings bank {findings}")
    return {"root": root, "masks": masks, "findings": findings}


@dataclass
class TrainData:
    """The run's data: loader (DataLoader of collate batches; call loader.dataset.set_epoch),
    chunk_config (the model's chunk preset with the training sampling overrides), and for the
    prompt topics: records (CTRateRecord per volume), depths (volume name -> slices after
    preprocessing) and present_organs (the organs some volume's masks hold)."""

    loader: torch.utils.data.DataLoader
    chunk_config: object
    records: list
    depths: dict
    present_organs: list


def _preprocessed(ds, cache, config: TrainConfig, runtime: Runtime, log: Callable[[str], None] = print) -> list:
    """[(record, CachedVolume)]. Under DDP every rank preprocesses its share of the missing entries,
    then waits on the cache folder, with no collective timeout (sigvlp.data.shards.ddp_preprocess).
    num_workers > 1: that many processes preprocess (spawned: a script needs a main guard)."""
    if runtime.distributed:
        from sigvlp.data.shards import ddp_preprocess

        return ddp_preprocess(ds, cache, workers=config.num_workers, say=log)
    workers = config.num_workers if config.num_workers > 1 and len(ds) > 8 else 0
    return ds.cached(cache, workers=workers, progress=config.progress)


class IgnoreSigint:
    """A DataLoader worker_init_fn that makes the worker ignore SIGINT, then calls `inner`: a
    Ctrl-C in the terminal reaches the whole process group, and the trainer (which stops after the
    step in progress) needs its workers alive for that step."""

    def __init__(self, inner: Optional[Callable] = None):
        self.inner = inner

    def __call__(self, worker_id: int) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if self.inner is not None:
            self.inner(worker_id)


def build_data(config: TrainConfig, model_config: SigVLPConfig, tokenizer, runtime: Runtime,
               log: Callable[[str], None] = print) -> TrainData:
    """The dataset of config.data preprocessed with the model's preset, drawn in the model's chunk
    preset (with config's min_slices / max_slices / whole_fraction), texts cut to the model's
    max_text_tokens, this rank's shard. ValueError / FileNotFoundError for unusable data."""
    paths = resolve_data_paths(config)
    over = {k: v for k, v in (("min_slices", config.min_slices), ("max_slices", config.max_slices),
                              ("whole_fraction", config.whole_fraction)) if v is not None}
    chunk_config = model_config.chunk_config(**over)
    ds = CTRateDataset(paths["root"], config.split, masks_dir=paths["masks"], findings=paths["findings"],
                       layout=config.layout)
    if len(ds) == 0:
        raise ValueError(f"data: no usable {config.split!r} volumes under {paths['root']}\n{ds.scan.summary()}")
    if ds.scan.skipped:
        log(ds.scan.summary())
    cache_root = Path(config.cache) if config.cache else default_cache_root(paths["root"])
    entries = _preprocessed(ds, PreprocessCache(cache_root, preset(model_config.preprocess)), config, runtime, log)
    if not entries:
        raise ValueError(f"data: no volume of {paths['root']} could be preprocessed")
    log(f"data: {len(entries)} {config.split} volumes from {paths['root']} (preprocess {model_config.preprocess!r}, "
        f"chunks {chunk_config.min_slices}..{chunk_config.max_slices} slices, patch {tuple(chunk_config.patch)})")
    sources = [ChunkSource.from_record(rec, cv) for rec, cv in entries]
    empty = sum(1 for s in sources if not s.findings)
    if empty:
        log(f"data: {empty} volumes have no findings text; their chunks get unique pair ids")
    if ds.findings_bank is None:
        log(no_bank_notice(paths["root"], config.split))
    workers = config.num_workers if runtime.device.type != "cpu" else loader_workers(config.num_workers)
    if workers != config.num_workers:
        log(f"data: batches load in this process between steps (num_workers {config.num_workers} -> {workers}: no core "
            f"left free by the torch threads ({torch.get_num_threads()}) and the load; the same batches)")
    loader_cfg = LoaderConfig(token_budget=config.token_budget, chunks_per_volume=config.chunks_per_volume,
                              num_workers=workers, seed=config.seed,
                              max_text_tokens=model_config.max_text_tokens)
    loader = make_loader(sources, chunk_config, loader_cfg, tokenizer=tokenizer, rank=runtime.rank,
                         world_size=runtime.world)
    loader.worker_init_fn = IgnoreSigint(loader.worker_init_fn)  # Ctrl-C is the trainer's to handle
    present = [ORGANS[i] for i in range(len(ORGANS))
               if any(cv.organ_profile is not None and cv.organ_profile[i].sum() > 0 for _, cv in entries)]
    return TrainData(loader, chunk_config, [rec for rec, _ in entries],
                     {rec.name: int(cv.shape[0]) for rec, cv in entries}, present)


# ----------------------------------------------------------------------------- optimisation
def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based): linear warmup over `warmup`
    steps, then cosine from 1 to min_ratio at step total - 1."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(total - warmup - 1, 1)
    progress = min(max(step - warmup, 0) / span, 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(config: TrainConfig, model: torch.nn.Module, group=None):
    """(MuonWithAdamW, LambdaLR): Muon for the hidden matrices and AdamW for the rest (optimizer
    "adamw": every parameter in the AdamW group), warmup + cosine (lr_factor); group: the
    process group of distributed Muon."""
    groups = split_params(model, muon_filter=(lambda *_: False) if config.optimizer == "adamw" else None)
    optimizer = MuonWithAdamW(groups, lr=config.lr, weight_decay=config.weight_decay, momentum=config.momentum,
                              adamw_lr=config.adamw_lr, adamw_weight_decay=config.adamw_weight_decay,
                              backend=config.backend, process_group=group)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, config.steps, config.warmup_steps, config.min_lr_ratio))
    return optimizer, scheduler


def build_autocast(config: TrainConfig, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """The forward's context factory: bf16 autocast (precision "bf16", or "auto" on GPU), else none."""
    if config.precision == "bf16" or (config.precision == "auto" and device.type == "cuda"):
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def wrap_model(model: torch.nn.Module, config: TrainConfig, runtime: Runtime) -> torch.nn.Module:
    """The module the step runs: DDP under torchrun, then torch.compile when config.compile."""
    net = model
    if runtime.distributed:
        device = runtime.device
        net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
    if config.compile:
        net = torch.compile(net, dynamic=True)
    return net
