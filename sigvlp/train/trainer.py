"""The training loop: SigVLP on chunk / text pairs with the sigmoid loss and Muon + AdamW.

One process, or one per device under ``torchrun`` (DDP: gloo on CPU, NCCL on GPU). A run is
the builders of sigvlp.train.builders (runtime, model, tokenizer, data, losses, optimizer) and a
step: per optimizer step, ``grad_accum`` micro-batches (each a packed varlen ``Batch`` moved to
the device once), ``sigvlp.train.step.train_step`` (forward, the objective of
sigvlp.train.losses: the sigmoid loss with global negatives across ranks plus the optional
prompt terms, backward), gradient clipping, ``MuonWithAdamW`` (distributed Muon under DDP),
warmup + cosine schedule.

Sequence metadata (max_seqlen, token and slice counts) comes from the collate as Python ints;
the step reads one device value back per step (the losses and gradient norm, for the progress
bar, the metrics and the finite check), never one per layer.

Run folder (``config.out``): ``config.yaml`` (the resolved config), ``metrics.jsonl`` (one line
per logged step), ``log.txt``, ``checkpoints/step_XXXXXXXX/`` (see sigvlp.checkpoint),
``tensorboard/`` when the tensorboard package is installed.

Interrupts: during ``run`` the first SIGINT (Ctrl-C) or SIGTERM only asks the run to stop; the
step in progress finishes, a checkpoint of that consistent state is saved (unless that step was
just saved), one line naming it and the resume command goes to the console and log.txt, and
``TrainingInterrupted`` is raised (``sigvlp train`` exits 130). A second signal aborts at once;
the line then names the last good checkpoint instead. Data loader workers ignore SIGINT, so a
Ctrl-C in the terminal reaches the training process alone.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import shlex
import signal
import threading
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from sigvlp.checkpoint import latest_checkpoint, load_trainer_state, save_checkpoint
from sigvlp.cliargs import check_writable
from sigvlp.model import SigVLP
from sigvlp.train.builders import (build_autocast, build_data, build_model, build_optimizer, build_tokenizer,
                                   check_model_config, lr_factor, setup_runtime, wrap_model)
from sigvlp.train.config import TrainConfig, save_config
from sigvlp.train.losses import TERM_NAMES, build_losses
from sigvlp.train.runfolder import Footprint, RunLock, check_run_folder
from sigvlp.train.step import Batch, train_step

__all__ = ["Trainer", "TrainingDiverged", "TrainingInterrupted", "lr_factor", "resume_command", "train"]


#: optimisation settings a resume applies over the restored optimizer/scheduler state
RESUME_APPLIED = ("lr", "adamw_lr", "weight_decay", "adamw_weight_decay", "momentum", "warmup_steps", "steps",
                  "min_lr_ratio")
#: the param-group keys rebuilt from the config on resume (initial_lr: LambdaLR's peak lr)
OPTIM_GROUP_KEYS = ("lr", "initial_lr", "weight_decay", "momentum")


class TrainingDiverged(FloatingPointError):
    """The loss or the gradient norm became NaN/inf; no optimizer step was taken with it."""


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM stopped the run. checkpoint: the folder to resume from (None: none written
    yet), saved: whether this interrupt wrote it, step: the step it holds."""

    def __init__(self, message: str, checkpoint: Optional[Path], saved: bool, step: int):
        super().__init__(message)
        self.checkpoint, self.saved, self.step = checkpoint, saved, step


def resume_command(out) -> str:
    """The command that continues the run in folder `out` (its config.yaml holds the rest)."""
    return f"sigvlp train --resume --out {shlex.quote(str(out))}"


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
        self.to_file(msg)

    def to_file(self, msg: str) -> None:
        """Append `msg` to log.txt only (a line the caller prints itself, e.g. an error on stderr)."""
        if self.enabled and self.path is not None:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(msg + "\n")


class Trainer:
    """Builds the model, data, losses, optimizer and schedule of a TrainConfig and runs it.

    batch_source: for tests and custom data, a callable (rank, world_size) -> iterable of
    collate batches used instead of the dataset loader (its position is the count of batches
    consumed). model: an existing SigVLP to train (default: build_model, SigVLP(preset(config.model,
    ...))). resume: continue from the run folder's latest checkpoint when there is one.
    """

    def __init__(self, config: TrainConfig, *, resume: bool = False, model=None,
                 batch_source: Optional[Callable[[int, int], Iterable[dict]]] = None):
        self.config = config
        self.runtime = rt = setup_runtime(config)
        self.rank, self.world, self.device, self.group = rt.rank, rt.world, rt.device, rt.group
        self.distributed, self.is_main = rt.distributed, rt.is_main
        self.out = Path(config.out)
        self.ckpt_dir = self.out / "checkpoints"
        self.lock = RunLock(self.out)
        footprint = None
        if self.is_main:  # before anything is written: a folder holding another run is refused
            check_run_folder(self.out, resume)
            try:
                check_writable(self.out)
            except ValueError as e:
                raise ValueError(f"out: {e}") from None
            footprint = Footprint(self.out)
            self.out.mkdir(parents=True, exist_ok=True)
        self.log = _Log(self.out / "log.txt" if self.is_main else None, self.is_main)
        try:
            self._lock()
            self._build(config, resume, model, batch_source)
        except BaseException:  # bad data, init_from, model...: the disk is left as it was
            self.close()
            if footprint is not None:
                footprint.undo()
            raise

    def _lock(self) -> None:
        """Hold the run folder's lock (main rank; a stale one taken over is logged)."""
        if self.is_main and not self.lock.held:
            note = self.lock.acquire()
            if note:
                self.log(note)

    def close(self) -> None:
        """Release the run folder's lock (run() does it when it returns; safe to call twice)."""
        self.lock.release()

    def _build(self, config, resume, model, batch_source) -> None:
        rt = self.runtime
        torch.manual_seed(config.seed)
        if model is None:
            model = build_model(config, resume_dir=self.ckpt_dir if resume else None,
                                from_dataset=batch_source is None, log=self.log)
        self.model = model.to(self.device)
        self.model_config = self.model.config
        if resume:  # weights of another model are refused before the data is read
            self._check_resumable_model()
        self.tokenizer = build_tokenizer(self.model_config)
        self._batch_source = batch_source
        self.data = build_data(config, self.model_config, self.tokenizer, rt, self.log) if batch_source is None else None
        self.losses = build_losses(config, self.data, self.tokenizer, self.model_config.max_text_tokens,
                                   group=self.group, log=self.log)
        self.autocast = build_autocast(config, self.device)
        self.net = wrap_model(self.model, config, rt)
        self.optimizer, self.scheduler = build_optimizer(config, self.model, self.group)
        self.step, self.data_pos, self.resumed_from, self._tb = 0, {"epoch": 0, "batch": 0}, None, None
        self._stop_signal, self._stop_agreed = None, False
        self._open_run_folder(resume)

    def _open_run_folder(self, resume: bool) -> None:
        """Resume from the latest checkpoint (check_run_folder refused other runs' folders); write config.yaml."""
        if resume:
            self._resume()
        if self.is_main and not (resume and self.step >= self.config.steps):  # a finished run keeps its config
            save_config(self.config, self.out / "config.yaml")
            if not resume:
                (self.out / "metrics.jsonl").write_text("")

    # ------------------------------------------------------------------ data
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
        loader = self.data.loader
        while True:
            epoch, skip = self.data_pos["epoch"], self.data_pos["batch"]
            loader.dataset.set_epoch(epoch)
            n = 0
            for i, b in enumerate(loader):
                n += 1
                if i < skip:
                    continue
                self.data_pos = {"epoch": epoch, "batch": i + 1}
                yield b
            if n == 0:
                raise RuntimeError(f"data: epoch {epoch} yielded no batches on rank {self.rank}")
            self.data_pos = {"epoch": epoch + 1, "batch": 0}

    # ------------------------------------------------------------------ step
    def _accumulate(self, batches: Iterator[dict]) -> tuple[dict, list]:
        """grad_accum micro-steps: gradients accumulated, {loss name: summed value} on the device
        and the host counts [tokens, slices, chunks, empty texts]."""
        cfg = self.config
        sums = {name: torch.zeros((), device=self.device) for name in self.losses.names}
        counts = [0, 0, 0, 0]
        for micro in range(cfg.grad_accum):
            batch = Batch.from_collate(next(batches)).to(self.device)
            for i, v in enumerate((batch.num_tokens, batch.num_slices, batch.num_chunks, batch.empty_texts)):
                counts[i] += v
            sync = micro == cfg.grad_accum - 1 or not self.distributed
            with contextlib.nullcontext() if sync else self.net.no_sync():
                parts = train_step(self.net, batch, self.losses, grad_accum=cfg.grad_accum, autocast=self.autocast)
            for name, v in parts.items():
                sums[name] += v
        return sums, counts

    def _check_finite(self, loss_v: float, gnorm_v: float) -> None:
        if math.isfinite(loss_v) and math.isfinite(gnorm_v):
            return
        what = "loss" if not math.isfinite(loss_v) else "gradient norm"
        last = latest_checkpoint(self.ckpt_dir)
        self.optimizer.zero_grad(set_to_none=True)
        raise TrainingDiverged(
            f"step {self.step + 1}: the {what} is {loss_v if what == 'loss' else gnorm_v} (not finite); training "
            f"stopped without applying this step. Last good checkpoint: {last or 'none written yet'} "
            "(lower lr / adamw_lr or raise warmup_steps, then --resume)")

    def train_step(self, batches: Iterator[dict]) -> dict:
        """One optimizer step over grad_accum micro-batches (sigvlp.train.step.train_step each).
        Returns host metrics."""
        cfg = self.config
        t0 = time.perf_counter()
        self.net.train()
        sums, counts = self._accumulate(batches)
        params = [p for p in self.model.parameters() if p.grad is not None]
        if cfg.clip_grad > 0:
            gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad)
        else:
            gnorm = torch.linalg.vector_norm(torch.stack([p.grad.detach().norm() for p in params]))
        stop = torch.tensor(float(self._stop_signal is not None), device=self.device)
        stats = torch.stack([*(v / cfg.grad_accum for v in sums.values()), gnorm.detach().float(), stop])
        if self.distributed:
            counts_t = torch.tensor(counts, dtype=torch.float64, device=self.device)
            dist.all_reduce(counts_t)
            counts = [int(v) for v in counts_t.tolist()]
            dist.all_reduce(stats)
            stats /= self.world  # loss: mean of per-rank losses = global loss; gnorm identical on every rank
        *values, gnorm_v, stop_v = stats.tolist()  # the step's one read-back
        self._stop_agreed = stop_v > 0  # every rank sees the same value: they stop after the same step
        losses = dict(zip(sums, values))
        loss_v = losses["main"]
        for term in self.losses.terms:
            loss_v += term.weight * losses[term.name]
        self._check_finite(loss_v, gnorm_v)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        lrs = self.scheduler.get_last_lr()
        self.scheduler.step()
        self.step += 1
        return self._step_metrics(loss_v, losses, gnorm_v, lrs, counts, time.perf_counter() - t0)

    def _step_metrics(self, loss_v, losses, gnorm_v, lrs, counts, dt) -> dict:
        groups = self.optimizer.param_groups
        muon_lr = next((lr for g, lr in zip(groups, lrs) if g.get("use_muon")), None)
        adamw_lr = next((lr for g, lr in zip(groups, lrs) if not g.get("use_muon")), None)
        m = self.model
        tokens, slices, chunks, empty = counts
        return {"step": self.step, "loss": loss_v, "loss_main": losses["main"],
                **{f"loss_{name}": losses.get(name, 0.0) for name in TERM_NAMES},
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
            self._drop_metrics_after(0)
            return
        state = load_trainer_state(ckpt)
        weights = load_file(str(ckpt / "model.safetensors"), device=str(self.device))
        self.model.load_state_dict(weights, strict=True)
        saved_kinds = [bool(g.get("use_muon")) for g in state["optimizer"].get("param_groups", [])]
        if saved_kinds != [bool(g.get("use_muon")) for g in self.optimizer.param_groups]:
            was = "adamw" if saved_kinds == [False] else "muon"  # "adamw" runs hold one AdamW group
            raise ValueError(f"resume: checkpoint {ckpt} was trained with optimizer {was!r}, this run "
                             f"asks for {self.config.optimizer!r}; resume with --optimizer {was}")
        fresh = [{k: g[k] for k in OPTIM_GROUP_KEYS if k in g} for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        self._apply_settings(fresh, state.get("config") or {}, ckpt)
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
        self._drop_metrics_after(self.step)
        self.log(f"resumed from {ckpt} (step {self.step}, data epoch {self.data_pos['epoch']} batch "
                 f"{self.data_pos['batch']})")

    def _check_resumable_model(self) -> None:
        """ValueError when the latest checkpoint's model differs from this run's in a field that
        changes what the weights mean (geometry, tokenizer, patch size, preprocessing)."""
        ckpt = latest_checkpoint(self.ckpt_dir)
        if ckpt is not None:
            check_model_config(SigVLP.load_config(ckpt), self.model.config,
                               f"resume: checkpoint {ckpt} (settings that change what the weights mean cannot change)")

    def _apply_settings(self, fresh: list[dict], saved: dict, ckpt: Path) -> None:
        """After the optimizer/scheduler state is restored: put back this config's optimisation
        settings (fresh: each group's OPTIM_GROUP_KEYS as built from it; the peak lr is its
        "initial_lr") and the schedule at the resumed step, so that lr, adamw_lr, the weight
        decays, momentum, warmup_steps, steps and min_lr_ratio follow the new config; log every
        setting that differs from `saved` (the checkpoint's config dict), old -> new."""
        sched = self.scheduler
        for i, (g, new) in enumerate(zip(self.optimizer.param_groups, fresh)):
            g.update({k: v for k, v in new.items() if k != "lr"})
            sched.base_lrs[i] = g["initial_lr"] = new["initial_lr"]
            g["lr"] = new["initial_lr"] * sched.lr_lambdas[i](sched.last_epoch)  # LambdaLR's own formula
        sched._last_lr = [g["lr"] for g in self.optimizer.param_groups]
        now = self.config.to_dict()
        changed = [k for k in now if k in saved and saved[k] != now[k]]
        if changed:
            self.log(f"resume: settings changed against checkpoint {ckpt.name}: " + ", ".join(
                f"{k} {saved[k]!r} -> {now[k]!r}" + (" (applied to the optimizer and schedule)"
                                                     if k in RESUME_APPLIED else "") for k in changed))

    def _drop_metrics_after(self, step: int) -> None:
        """metrics.jsonl rows past `step` were written by the interrupted run this one redoes: drop them
        (one row per step after the resume)."""
        mpath = self.out / "metrics.jsonl"
        if self.is_main and mpath.exists():
            keep = [ln for ln in mpath.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
            mpath.write_text("".join(ln + "\n" for ln in keep))

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
        self._lock()
        try:
            return self._run(end)
        finally:
            self.close()

    def _run(self, end: int) -> dict:
        cfg = self.config
        bar = None
        if self.is_main and cfg.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.steps, initial=self.step, desc="train", dynamic_ncols=True)
            self.log.bar = bar
        batches = self._batches()
        last = {}
        ckpt = latest_checkpoint(self.ckpt_dir) if self.is_main else None
        self.log(f"training {type(self.model).__name__} ({sum(p.numel() for p in self.model.parameters()) / 1e6:.2f} M "
                 f"params) on {self.device} x {self.world}, steps {self.step} -> {end}"
                 + (f", {torch.get_num_threads()} torch threads" if self.device.type == "cpu" else ""))
        restore = self._catch_signals()
        try:
            while self.step < end:
                try:
                    last = self.train_step(batches)
                except TrainingDiverged as e:
                    self.log.to_file(f"stopped: {e}")  # log.txt keeps it; the caller reports the error once
                    raise
                except KeyboardInterrupt:  # a second signal: mid-step, nothing consistent to save
                    self._interrupted(latest_checkpoint(self.ckpt_dir), consistent=False)
                if self.step % cfg.log_every == 0 or self.step == end:
                    self._metrics(last)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{last['loss']:.4f}", tok_s=f"{last['tokens_per_s']:.0f}",
                                    slices_s=f"{last['slices_per_s']:.1f}", refresh=False)
                saved = self.step % cfg.ckpt_every == 0 or self.step == end
                if saved:
                    ckpt = self.save()
                stop = self._stop_agreed or (not self.distributed and self._stop_signal is not None)
                if stop and self.step < end:
                    self._interrupted(ckpt if saved else self.save(), consistent=True)
        finally:
            restore()
            if bar is not None:
                bar.close()
                self.log.bar = None
            if self._tb:
                self._tb.flush()
        if ckpt is not None:
            self.log(f"checkpoint: {ckpt}")
        return {**last, "checkpoint": str(ckpt) if ckpt else None}


    # ------------------------------------------------------------------ interrupts
    def _catch_signals(self) -> Callable[[], None]:
        """SIGINT/SIGTERM handlers for the loop (main thread only): the first signal sets
        _stop_signal (the step finishes, then the run saves and stops), a second raises
        KeyboardInterrupt at once. Returns the function restoring the previous handlers."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None

        def handler(signum, frame):
            if self._stop_signal is not None:
                raise KeyboardInterrupt
            self._stop_signal = signal.Signals(signum).name

        old = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}

        def restore():
            for sig, h in old.items():
                signal.signal(sig, h)
        return restore

    def _interrupted(self, ckpt: Optional[Path], consistent: bool) -> None:
        """Log the one interrupt line and raise TrainingInterrupted. consistent: the stop came
        between steps and ckpt holds the current step (None on ranks other than the main);
        otherwise it came mid-step and ckpt is the last good checkpoint (None: none yet)."""
        what = self._stop_signal or "signal"
        if consistent:
            msg = f"interrupted ({what}) after step {self.step}: saved {ckpt}"
        else:
            msg = (f"interrupted ({what}) again during step {self.step + 1}, which was not saved; last good checkpoint: "
                   f"{ckpt or 'none written yet (a resume starts from step 0)'}")
        self.log(f"{msg}; resume with: {resume_command(self.out)}")
        step = self.step if consistent else (int(ckpt.name.split("_")[-1]) if ckpt is not None else 0)
        raise TrainingInterrupted(msg, ckpt, consistent, step)


def train(config: TrainConfig, *, resume: bool = False, **kwargs) -> dict:
    """Build a Trainer and run it (the `sigvlp train` entry point without the argument parsing)."""
    trainer = Trainer(config, resume=resume, **kwargs)
    try:
        return trainer.run()
    finally:
        if trainer.distributed and dist.is_initialized():
            dist.destroy_process_group()
