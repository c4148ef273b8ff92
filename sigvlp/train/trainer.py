"""The training loop: SigVLP on chunk / text pairs with the sigmoid loss and Muon + AdamW.

One process, or one per device under ``torchrun`` (DDP: gloo on CPU, NCCL on GPU). Per
optimizer step: ``grad_accum`` micro-batches (each a packed varlen batch of the data loader),
``sigvlp.ops.sigmoid_loss`` with the batch's pair ids (global negatives across ranks through
its ``process_group``), optional prompt supervision (sigvlp.train.prompts), gradient clipping,
``MuonWithAdamW`` (distributed Muon under DDP), warmup + cosine schedule.

Sequence metadata (max_seqlen, token and slice counts) comes from the collate as Python ints;
the step reads one device value back per step (the loss and gradient norm, for the progress bar,
the metrics and the finite check), never one per layer.

Run folder (``config.out``): ``config.yaml`` (the resolved config), ``metrics.jsonl`` (one line
per logged step), ``log.txt``, ``checkpoints/step_XXXXXXXX/`` (see sigvlp.train.checkpoint),
``tensorboard/`` when the tensorboard package is installed.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import random
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist

from sigvlp.train.checkpoint import latest_checkpoint, load_trainer_state, save_checkpoint
from sigvlp.train.config import TrainConfig, save_config

__all__ = ["Trainer", "TrainingDiverged", "lr_factor", "train"]

#: batch keys that go to the device (the rest are host bookkeeping)
DEVICE_KEYS = ("patches", "cu_seqlens", "grid_thw", "text_ids", "text_cu_seqlens", "image_pair_ids", "text_pair_ids")


class TrainingDiverged(FloatingPointError):
    """The loss or the gradient norm became NaN/inf; no optimizer step was taken with it."""


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based): linear warmup over `warmup`
    steps, then cosine from 1 to min_ratio at step total - 1."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(total - warmup - 1, 1)
    progress = min(max(step - warmup, 0) / span, 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _check_model_config(saved, wanted, where: str) -> None:
    """ValueError naming every weight-shaping field where `saved` (a checkpoint's SigVLPConfig) and
    `wanted` (the run's) differ; runtime fields (attn_backend, grad_checkpointing) may differ."""
    from sigvlp.model.modeling import short_repr

    diff = saved.diff(wanted)
    if diff:
        fields = ", ".join(f"{k} (checkpoint {short_repr(a)}, requested {short_repr(b)})"
                           for k, (a, b) in diff.items())
        raise ValueError(f"{where}: model config differs from the requested one in field(s): {fields}; "
                         "set --model / --set model.FIELD=VALUE to match the checkpoint")


def _distributed_env() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return rank, world, local


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


class _Log:
    def __init__(self, path: Optional[Path], enabled: bool):
        self.path = path
        self.enabled = enabled
        self.bar = None

    def __call__(self, msg: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(msg + "\n")


def siglip_model(config: TrainConfig):
    """The SigVLP that config.init_siglip starts from: ``SigVLP.from_siglip(init_siglip,
    **model_overrides)`` (geometry and weights from the SigLIP folder; config.model is not used).
    ValueError when the loader's max_text_tokens exceeds learned text positions."""
    from sigvlp.model import SigVLP  # as in Trainer: the model package is imported when a run starts

    model = SigVLP.from_siglip(config.init_siglip, **config.model_overrides)
    if model.config.text_positions == "learned" and config.max_text_tokens > model.config.max_text_tokens:
        raise ValueError(f"max_text_tokens: {config.max_text_tokens} is more than the model's "
                         f"{model.config.max_text_tokens} learned text positions; set --max-text-tokens")
    return model


class Trainer:
    """Builds the model, data, optimizer and schedule of a TrainConfig and runs it.

    batch_source: for tests and custom data, a callable (rank, world_size) -> iterable of
    collate batches used instead of the dataset loader (its position is the count of batches
    consumed). model: an existing SigVLP to train (default: SigVLP(preset(config.model, ...))).
    resume: continue from the run folder's latest checkpoint when there is one.
    """

    def __init__(self, config: TrainConfig, *, resume: bool = False, model=None,
                 batch_source: Optional[Callable[[int, int], Iterable[dict]]] = None):
        from sigvlp.model import SigVLP, SigVLPConfig

        self.config = config
        self.rank, self.world, local = _distributed_env()
        self.distributed = self.world > 1
        if torch.cuda.is_available():
            self.device = torch.device("cuda", local)
            torch.cuda.set_device(self.device)  # before NCCL initialises
        else:
            self.device = torch.device("cpu")
        if self.distributed and not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if config.threads:
            torch.set_num_threads(config.threads)
        self.group = dist.group.WORLD if self.distributed else None
        self.out = Path(config.out)
        self.ckpt_dir = self.out / "checkpoints"
        self.is_main = self.rank == 0
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        self.log = _Log(self.out / "log.txt" if self.is_main else None, self.is_main)

        # ---- model
        torch.manual_seed(config.seed)
        if model is None and config.init_siglip:
            model = siglip_model(config)
        if model is None:
            try:
                mcfg = SigVLPConfig.preset(config.model, **config.model_overrides)
            except TypeError as e:
                raise ValueError(f"model_overrides: {e}") from None
            if config.init_from and not (Path(config.init_from) / "config.json").is_file():
                raise FileNotFoundError(f"init_from: {config.init_from} is not a save_pretrained folder "
                                        "(no config.json)")
            if mcfg.tokenizer == "word" and mcfg.vocab is None:
                mcfg = mcfg.replace(vocab=self._word_vocab(resume, from_dataset=batch_source is None))
            if config.init_from:  # the checkpoint must be the model the config (and config.yaml) names
                _check_model_config(SigVLP.load_config(config.init_from), mcfg, f"init_from {config.init_from}")
                model = SigVLP.from_pretrained(config.init_from, config=mcfg)
            else:
                model = SigVLP(mcfg)
        self.model = model.to(self.device)
        self.model_config = self.model.config
        self.tokenizer = getattr(self.model, "tokenizer", None)

        # ---- data
        self.prompts = None
        self._batch_source = batch_source
        if batch_source is None:
            self._setup_data()
        elif config.prompt_weight > 0:
            raise ValueError("prompt_weight > 0 needs the dataset loader (labels and organs per chunk)")

        # ---- autocast, DDP, compile
        if config.precision == "bf16" or (config.precision == "auto" and self.device.type == "cuda"):
            self.autocast = lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)
        else:
            self.autocast = contextlib.nullcontext
        self.net = self.model
        if self.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.net = DDP(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                           broadcast_buffers=False)
        if config.compile:
            self.net = torch.compile(self.net, dynamic=True)

        # ---- optimizer, schedule
        from sigvlp.optim import MuonWithAdamW, split_params

        # optimizer "adamw": every parameter in the AdamW group (adamw_lr, adamw_weight_decay)
        groups = split_params(self.model, muon_filter=(lambda *_: False) if config.optimizer == "adamw" else None)
        self.optimizer = MuonWithAdamW(groups, lr=config.lr, weight_decay=config.weight_decay,
                                       momentum=config.momentum, adamw_lr=config.adamw_lr,
                                       adamw_weight_decay=config.adamw_weight_decay, backend=config.backend,
                                       process_group=self.group)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, config.steps, config.warmup_steps, config.min_lr_ratio))

        # ---- state
        self.step = 0
        self.data_pos = {"epoch": 0, "batch": 0}
        self.resumed_from = None
        if resume:
            self._resume()
        elif self.is_main and (self.out / "metrics.jsonl").exists() and latest_checkpoint(self.ckpt_dir):
            raise FileExistsError(f"out: {self.out} already holds a run with checkpoints; pass --resume to continue "
                                  "it or choose another --out")
        if self.is_main and not (resume and self.step >= config.steps):  # a finished run keeps its config
            save_config(config, self.out / "config.yaml")
            if not resume:
                (self.out / "metrics.jsonl").write_text("")
        self._tb = None

    # ------------------------------------------------------------------ data
    def _word_vocab(self, resume: bool, from_dataset: bool) -> tuple[str, ...]:
        """The word list of a "word" tokenizer left open in the config: the init_from checkpoint's,
        the resumed run's, or (from_dataset) built from the training texts and every prompt statement."""
        from sigvlp.model import SigVLP

        cfg = self.config
        for where in ([cfg.init_from] if cfg.init_from else []) + ([latest_checkpoint(self.ckpt_dir)] if resume else []):
            if where and (Path(where) / "config.json").is_file():
                saved = SigVLP.load_config(where)
                if saved.tokenizer == "word" and saved.vocab:
                    return saved.vocab
        if not from_dataset:
            raise ValueError("model tokenizer 'word': give its vocab (model_overrides) when training from a batch "
                             "source; the word list is built from the dataset's reports")
        from sigvlp.data import CTRateDataset, WordTokenizer
        from sigvlp.data.organs import ORGANS
        from sigvlp.train.prompts import LABEL_ORGANS, abnormality_prompts, organ_prompts

        paths = resolve_data_paths(cfg)
        ds = CTRateDataset(paths["root"], cfg.split, masks_dir=paths["masks"], findings=paths["findings"],
                           layout=cfg.layout)

        def strings(x):
            if isinstance(x, str):
                yield x
            elif isinstance(x, dict):
                for v in x.values():
                    yield from strings(v)
            elif isinstance(x, (list, tuple)):
                for v in x:
                    yield from strings(v)

        # what the loader pairs chunks with: the findings bank's sentences, else the report's findings
        texts = [t for rec in ds for t in strings(rec.findings)]
        texts += [rec.report.get("Findings_EN") for rec in ds if rec.findings is None and rec.report]
        labels = list(LABEL_ORGANS) + sorted({k for rec in ds for k in (rec.labels or {})} - set(LABEL_ORGANS))
        texts += [t for lab in labels for t in abnormality_prompts(lab)]
        texts += [t for org in ORGANS for t in organ_prompts(org)]
        vocab = WordTokenizer.build_vocab(texts)
        self.log(f"word tokenizer: {len(vocab)} words from {len(ds)} reports and the prompt statements")
        return vocab

    def _setup_data(self):
        from sigvlp.data import CTRateDataset, ChunkSource, LoaderConfig, PreprocessCache, make_loader, preset
        from sigvlp.data.organs import ORGANS

        cfg = self.config
        paths = resolve_data_paths(cfg)
        pp_name = cfg.preprocess or self.model_config.preprocess
        chunk_over = {k: v for k, v in (("min_slices", cfg.min_slices), ("max_slices", cfg.max_slices),
                                        ("whole_fraction", cfg.whole_fraction)) if v is not None}
        if cfg.chunk is not None:
            from sigvlp.data.chunks import CHUNK_PRESETS

            if cfg.chunk not in CHUNK_PRESETS:
                raise ValueError(f"chunk: unknown chunk preset {cfg.chunk!r}; known: {sorted(CHUNK_PRESETS)}")
            import dataclasses

            self.chunk_config = dataclasses.replace(CHUNK_PRESETS[cfg.chunk], patch=tuple(self.model_config.patch_size),
                                                    **chunk_over)
        else:
            self.chunk_config = self.model_config.chunk_config(**chunk_over)
        ds = CTRateDataset(paths["root"], cfg.split, masks_dir=paths["masks"], findings=paths["findings"],
                           layout=cfg.layout)
        if len(ds) == 0:
            raise ValueError(f"data: no usable {cfg.split!r} volumes under {paths['root']}\n{ds.scan.summary()}")
        if ds.scan.skipped:
            self.log(ds.scan.summary())
        if cfg.cache:
            cache_root = Path(cfg.cache)
        else:
            from sigvlp.data.preprocess import default_cache_root

            cache_root = default_cache_root(paths["root"])
        cache = PreprocessCache(cache_root, preset(pp_name))
        # Rank 0 preprocesses; the others wait and then read the cache.
        if self.distributed and not self.is_main:
            dist.barrier()
        entries = self._cached(ds, cache, cfg.num_workers)
        if self.distributed and self.is_main:
            dist.barrier()
        if not entries:
            raise ValueError(f"data: no volume of {paths['root']} could be preprocessed")
        self.log(f"data: {len(entries)} {cfg.split} volumes from {paths['root']} (preprocess {pp_name!r}, "
                 f"chunks {self.chunk_config.min_slices}..{self.chunk_config.max_slices} slices, "
                 f"patch {tuple(self.chunk_config.patch)})")
        from_record = getattr(ChunkSource, "from_record", None)
        sources = [from_record(rec, cv) if from_record else ChunkSource.from_cache(cv, rec.findings, name=rec.name)
                   for rec, cv in entries]
        empty = sum(1 for s in sources if not s.findings)
        if empty:
            self.log(f"data: {empty} volumes have no findings text; their chunks get unique pair ids")
        if ds.findings_bank is None:
            from sigvlp.data.findings import no_bank_notice  # sigvlp.data is imported on use here, as above

            self.log(no_bank_notice(paths["root"], cfg.split))
        loader_cfg = LoaderConfig(token_budget=cfg.token_budget, chunks_per_volume=cfg.chunks_per_volume,
                                  num_workers=cfg.num_workers, seed=cfg.seed, max_text_tokens=cfg.max_text_tokens)
        kwargs = {}
        if "rank" in inspect.signature(make_loader).parameters:
            kwargs = {"rank": self.rank, "world_size": self.world}
        elif self.distributed:  # older sigvlp.data: shard the volumes here
            sources = sources[self.rank::self.world]
        self.loader = make_loader(sources, self.chunk_config, loader_cfg, tokenizer=self.tokenizer, **kwargs)
        if self.config.prompt_weight > 0:
            from sigvlp.train.prompts import PromptTopics

            present = [ORGANS[i] for i in range(len(ORGANS))
                       if any(cv.organ_profile is not None and cv.organ_profile[i].sum() > 0 for _, cv in entries)]
            self.prompts = PromptTopics.from_records([rec for rec, _ in entries], present)
            self._depths = {rec.name: int(cv.shape[0]) for rec, cv in entries}
            self.log(f"prompt supervision: {len(self.prompts.labels)} abnormalities, {len(self.prompts.organs)} organs "
                     f"(weight {cfg.prompt_weight})")
            self._prompt_batch = None

    @staticmethod
    def _cached(ds, cache, num_workers: int = 0):
        if hasattr(ds, "cached"):
            # num_workers > 1: that many processes preprocess (spawned: a script needs a main guard)
            return ds.cached(cache, workers=num_workers if num_workers > 1 and len(ds) > 8 else 0)
        from sigvlp.data import build_cache

        entries, _ = build_cache(ds, cache)
        return entries

    def _batches(self) -> Iterator[dict]:
        """Endless micro-batches from the stored data position; updates self.data_pos."""
        if self._batch_source is not None:
            skip = self.data_pos["batch"]
            for i, b in enumerate(self._batch_source(self.rank, self.world)):
                if i < skip:
                    continue
                self.data_pos = {"epoch": 0, "batch": i + 1}
                yield b
            raise RuntimeError("batch_source ran out of batches before the last step")
        while True:
            epoch, skip = self.data_pos["epoch"], self.data_pos["batch"]
            self.loader.dataset.set_epoch(epoch)
            n = 0
            for i, b in enumerate(self.loader):
                n += 1
                if i < skip:
                    continue
                self.data_pos = {"epoch": epoch, "batch": i + 1}
                yield b
            if n == 0:
                raise RuntimeError(f"data: epoch {epoch} yielded no batches on rank {self.rank}")
            self.data_pos = {"epoch": epoch + 1, "batch": 0}

    # ------------------------------------------------------------------ step
    def _to_device(self, batch: dict) -> dict:
        out = dict(batch)
        for k in DEVICE_KEYS:
            if k in out:
                out[k] = out[k].to(self.device, non_blocking=True)
        return out

    def _with_prompts(self, batch: dict) -> tuple[dict, int]:
        """The batch with the prompt statements appended to its texts (encoded in the same forward)."""
        if self._prompt_batch is None:
            tok = self.tokenizer
            ids = [tok.encode(t, self.config.max_text_tokens) for t in self.prompts.texts]
            lens = torch.tensor([len(r) for r in ids], dtype=torch.int64)
            self._prompt_batch = (torch.tensor([i for r in ids for i in r], dtype=torch.int64), lens, int(lens.max()))
        ids, lens, mx = self._prompt_batch
        out = dict(batch)
        out["text_ids"] = torch.cat([batch["text_ids"], ids])
        base = batch["text_cu_seqlens"]
        out["text_cu_seqlens"] = torch.cat([base, (base[-1].to(torch.int64) + lens.cumsum(0)).to(torch.int32)])
        out["text_max_seqlen"] = max(int(batch["text_max_seqlen"]), mx)
        return out, len(self.prompts.texts)

    def _micro_step(self, batch: dict, sync: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        from sigvlp.ops import sigmoid_loss
        from sigvlp.train.prompts import direction_decorrelation

        cfg = self.config
        n_img = int(batch["cu_seqlens"].numel()) - 1
        extra = 0
        truth = None
        if self.prompts is not None:
            cover = [(z1 - z0) / self._depths.get(nm, z1 - z0) for nm, (z0, z1) in zip(batch["names"], batch["z_ranges"])]
            truth = self.prompts.truth(batch["names"], batch["organs"], cover)
            batch, extra = self._with_prompts(batch)
        batch = self._to_device(batch)
        ctx = contextlib.nullcontext() if (sync or not self.distributed) else self.net.no_sync()
        with ctx:
            with self.autocast():
                out = self.net(batch)
            img = out.image_emb.float()
            txt = out.text_emb.float()
            scale, bias = out.logit_scale.float(), out.logit_bias.float()
            n_txt = txt.shape[0] - extra
            main = sigmoid_loss(img, txt[:n_txt], scale, bias, image_ids=batch["image_pair_ids"],
                                text_ids=batch["text_pair_ids"], process_group=self.group, backend=cfg.backend)
            loss = main
            prompt = torch.zeros((), device=self.device)
            decor = torch.zeros((), device=self.device)
            if extra:
                prompt = self._prompt_loss(img, txt[n_txt:], scale, bias, truth, n_img)
                loss = main + cfg.prompt_weight * prompt
                if cfg.prompt_decorrelation > 0:
                    decor = direction_decorrelation(txt[n_txt:])
                    loss = loss + cfg.prompt_decorrelation * decor
            (loss / cfg.grad_accum).backward()
        return main.detach(), prompt.detach(), decor.detach()

    def _prompt_loss(self, img, ptxt, scale, bias, truth, n_img):
        from sigvlp.ops import sigmoid_loss

        text_ids = torch.tensor([0, 1], device=self.device)
        # Bias 0, not the model's (about -10, set by the many negatives of the main loss): the
        # false statement is pushed away as hard as the true one is pulled (the two-way softmax
        # of zero-shot scoring does not see the bias).
        zero = torch.zeros_like(bias)
        total = img.new_zeros(())
        # truth is on the host (built from the batch's bookkeeping). Per topic, the chunks where
        # "present" is true and those where "not present" is true are two sigmoid_loss calls
        # weighted equally (balanced: most abnormalities are rare); unknown chunks are left out.
        parts = 0
        for k in range(truth.shape[0]):
            for value in (1, 0):
                rows = truth[k] == value
                n = int(rows.sum())
                if n == 0:
                    continue
                x = img if n == truth.shape[1] else img[rows.nonzero()[:, 0].to(img.device)]
                ids = torch.full((n,), 1 - value, dtype=torch.int64, device=img.device)  # 0: "present" is true
                total = total + 0.5 * sigmoid_loss(x, ptxt[2 * k:2 * k + 2], scale, zero, image_ids=ids,
                                                   text_ids=text_ids, backend=self.config.backend)
            parts += 1
        # Under DDP each rank balances its own chunks and DDP averages the ranks' gradients.
        return total / max(parts, 1)

    def train_step(self, batches: Iterator[dict]) -> dict:
        """One optimizer step over grad_accum micro-batches. Returns host metrics."""
        cfg = self.config
        t0 = time.perf_counter()
        self.net.train()
        tokens = slices = chunks = empty = 0
        main_sum = torch.zeros((), device=self.device)
        prompt_sum = torch.zeros((), device=self.device)
        decor_sum = torch.zeros((), device=self.device)
        for micro in range(cfg.grad_accum):
            batch = next(batches)
            tokens += int(batch["patches"].shape[0])
            slices += sum(z1 - z0 for z0, z1 in batch.get("z_ranges", ()))
            chunks += int(batch["cu_seqlens"].numel()) - 1
            empty += int(batch.get("empty_texts", 0))
            main, prompt, decor = self._micro_step(batch, sync=micro == cfg.grad_accum - 1)
            main_sum += main
            prompt_sum += prompt
            decor_sum += decor
        params = [p for p in self.model.parameters() if p.grad is not None]
        if cfg.clip_grad > 0:
            gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad)
        else:
            gnorm = torch.linalg.vector_norm(torch.stack([p.grad.detach().norm() for p in params]))
        stats = torch.stack([main_sum / cfg.grad_accum, prompt_sum / cfg.grad_accum, decor_sum / cfg.grad_accum,
                             gnorm.detach().float()])
        if self.distributed:
            counts = torch.tensor([tokens, slices, chunks, empty], dtype=torch.float64, device=self.device)
            dist.all_reduce(counts)
            tokens, slices, chunks, empty = (int(v) for v in counts.tolist())
            dist.all_reduce(stats)
            stats /= self.world  # loss: mean of per-rank losses = global loss; gnorm identical on every rank
        main_v, prompt_v, decor_v, gnorm_v = stats.tolist()  # the step's one read-back
        loss_v = main_v + cfg.prompt_weight * prompt_v + cfg.prompt_decorrelation * decor_v
        if not (math.isfinite(loss_v) and math.isfinite(gnorm_v)):
            what = "loss" if not math.isfinite(loss_v) else "gradient norm"
            last = latest_checkpoint(self.ckpt_dir)
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingDiverged(
                f"step {self.step + 1}: the {what} is {loss_v if what == 'loss' else gnorm_v} (not finite); training "
                f"stopped without applying this step. Last good checkpoint: {last or 'none written yet'} "
                "(lower lr / adamw_lr or raise warmup_steps, then --resume)")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        lrs = self.scheduler.get_last_lr()
        self.scheduler.step()
        self.step += 1
        dt = time.perf_counter() - t0
        groups = self.optimizer.param_groups
        muon_lr = next((lr for g, lr in zip(groups, lrs) if g.get("use_muon")), None)
        adamw_lr = next((lr for g, lr in zip(groups, lrs) if not g.get("use_muon")), None)
        m = self.model
        return {"step": self.step, "loss": loss_v, "loss_main": main_v, "loss_prompt": prompt_v,
                "loss_decorrelation": decor_v,
                "grad_norm": gnorm_v, "lr": muon_lr, "adamw_lr": adamw_lr,
                "logit_scale": float(m.log_logit_scale.detach().float().exp()) if hasattr(m, "log_logit_scale") else None,
                "logit_bias": float(m.logit_bias.detach().float()) if hasattr(m, "logit_bias") else None,
                "tokens": tokens, "slices": slices, "chunks": chunks, "empty_texts": empty,
                "tokens_per_s": tokens / dt, "slices_per_s": slices / dt, "step_s": dt,
                "epoch": self.data_pos["epoch"]}

    # ------------------------------------------------------------------ checkpoints
    def _state(self) -> dict:
        positions = [self.data_pos]
        if self.distributed:
            positions = [None] * self.world
            dist.all_gather_object(positions, self.data_pos)
        rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {"step": self.step, "data_positions": positions, "world_size": self.world,
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(), "rng": rng,
                "config": self.config.to_dict()}

    def save(self) -> Optional[Path]:
        state = self._state()  # collective under DDP: every rank calls it
        path = None
        if self.is_main:
            path = save_checkpoint(self.ckpt_dir, self.step, self.model.save_pretrained, state, self.config.keep_last)
        if self.distributed:
            dist.barrier()
        return path

    def _resume(self):
        ckpt = latest_checkpoint(self.ckpt_dir)
        if ckpt is None:
            self.log(f"resume: no checkpoint under {self.ckpt_dir}; starting from step 0")
            return
        from safetensors.torch import load_file

        from sigvlp.model import SigVLP

        _check_model_config(SigVLP.load_config(ckpt), self.model.config, f"resume: checkpoint {ckpt}")
        state = load_trainer_state(ckpt)
        weights = load_file(str(ckpt / "model.safetensors"), device=str(self.device))
        self.model.load_state_dict(weights, strict=True)
        saved_kinds = [bool(g.get("use_muon")) for g in state["optimizer"].get("param_groups", [])]
        if saved_kinds != [bool(g.get("use_muon")) for g in self.optimizer.param_groups]:
            was = "adamw" if saved_kinds == [False] else "muon"  # "adamw" runs hold one AdamW group
            raise ValueError(f"resume: checkpoint {ckpt} was trained with optimizer {was!r}, this run "
                             f"asks for {self.config.optimizer!r}; resume with --optimizer {was}")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        positions = state["data_positions"]
        if state.get("world_size", 1) == self.world:
            self.data_pos = dict(positions[self.rank])
        else:
            epoch = max(p["epoch"] for p in positions) + 1
            self.log(f"resume: world size changed ({state.get('world_size')} -> {self.world}); data restarts at "
                     f"epoch {epoch}")
            self.data_pos = {"epoch": epoch, "batch": 0}
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.resumed_from = ckpt
        if self.is_main:  # metrics past the checkpoint were written by the interrupted run: drop them
            mpath = self.out / "metrics.jsonl"
            if mpath.exists():
                keep = [ln for ln in mpath.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= self.step]
                mpath.write_text("".join(ln + "\n" for ln in keep))
        self.log(f"resumed from {ckpt} (step {self.step}, data epoch {self.data_pos['epoch']} batch "
                 f"{self.data_pos['batch']})")

    # ------------------------------------------------------------------ run
    def _metrics(self, m: dict):
        if not self.is_main:
            return
        with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(m) + "\n")
        if self._tb is None and self.config.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.out / "tensorboard"))
            except Exception:  # tensorboard not installed
                self._tb = False
        if self._tb:
            for k, v in m.items():
                if isinstance(v, (int, float)) and k != "step" and v is not None:
                    self._tb.add_scalar(f"train/{k}", v, m["step"])

    def run(self, max_steps: Optional[int] = None) -> dict:
        """Train up to config.steps (or max_steps more steps). Returns the last step's metrics plus
        the checkpoint folder."""
        cfg = self.config
        end = cfg.steps if max_steps is None else min(cfg.steps, self.step + max_steps)
        bar = None
        if self.is_main and cfg.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.steps, initial=self.step, desc="train", dynamic_ncols=True)
            self.log.bar = bar
        batches = self._batches()
        last = {}
        ckpt = latest_checkpoint(self.ckpt_dir) if self.is_main else None
        self.log(f"training {type(self.model).__name__} ({sum(p.numel() for p in self.model.parameters()) / 1e6:.2f} M "
                 f"params) on {self.device} x {self.world}, steps {self.step} -> {end}")
        try:
            while self.step < end:
                last = self.train_step(batches)
                if self.step % cfg.log_every == 0 or self.step == end:
                    self._metrics(last)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{last['loss']:.4f}", tok_s=f"{last['tokens_per_s']:.0f}",
                                    slices_s=f"{last['slices_per_s']:.1f}", refresh=False)
                if self.step % cfg.ckpt_every == 0 or self.step == end:
                    ckpt = self.save()
        finally:
            if bar is not None:
                bar.close()
                self.log.bar = None
            if self._tb:
                self._tb.flush()
        if ckpt is not None:
            self.log(f"checkpoint: {ckpt}")
        return {**last, "checkpoint": str(ckpt) if ckpt else None}


def train(config: TrainConfig, *, resume: bool = False, **kwargs) -> dict:
    """Build a Trainer and run it (the `sigvlp train` entry point without the argument parsing)."""
    trainer = Trainer(config, resume=resume, **kwargs)
    try:
        return trainer.run()
    finally:
        if trainer.distributed and dist.is_initialized():
            dist.destroy_process_group()
