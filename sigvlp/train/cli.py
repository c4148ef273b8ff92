"""``sigvlp train``: train SigVLP on a CT-RATE-layout folder (see sigvlp.train.config for the keys).

    sigvlp train --data DIR --out runs/x [--config cfg.yaml] [--set key=value ...] [--steps N ...]
    torchrun --nproc_per_node=N -m sigvlp train ...      (DDP: gloo on CPU, NCCL on GPU)
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing

from sigvlp.train.config import TrainConfig, config_fields, load_config, parse_override


def _flag_type(hint):
    origin = typing.get_origin(hint)
    if origin is typing.Union or type(hint).__name__ == "UnionType":
        hint = [a for a in typing.get_args(hint) if a is not type(None)][0]
    return hint


#: one-line description of every TrainConfig key's flag (tests/test_help.py checks each field has one)
FIELD_HELP = {
    "data": "dataset root in the CT-RATE layout, real or `sigvlp synth` output (default: none, required)",
    "split": "split to train on",
    "layout": "CT-RATE layout: v2 (<split>_fixed, HU files), v1 (<split>, metadata rescale), auto",
    "masks": "organ masks folder (default: DATA/masks when present)",
    "findings": "findings bank (default: DATA/findings/<split>_findings.jsonl when present)",
    "cache": "preprocessing cache root (default: $SIGVLP_CACHE, else DATA/.sigvlp_cache when writable, "
             "else ~/.cache/sigvlp)",
    "min_slices": "shortest chunk, in slices after preprocessing (default: the chunk preset's)",
    "max_slices": "longest chunk, in slices after preprocessing (default: the chunk preset's)",
    "whole_fraction": "share of chunks that are whole volumes, in [0, 1] (default: the chunk preset's)",
    "token_budget": "image tokens per micro-batch per rank",
    "chunks_per_volume": "chunks drawn from each volume per epoch",
    "num_workers": "data loader processes (0: in the training process; on the CPU 1 becomes 0 when no core is left "
                   "free by the torch threads: the same batches, faster)",
    "prompt_weight": "weight of the CT-CLIP statement loss (0: off)",
    "prompt_decorrelation": "weight of the topic-direction decorrelation penalty (needs prompt_weight > 0)",
    "model": "SigVLPConfig preset (not used with --init-siglip)",
    "init_from": "a save_pretrained folder to start from (default: none, random weights)",
    "init_siglip": "a Hugging Face SigLIP folder to start from (default: none, random weights)",
    "steps": "optimizer steps (after accumulation)",
    "grad_accum": "micro-batches per optimizer step",
    "optimizer": "muon: Muon for hidden matrices + AdamW for the rest; adamw: AdamW for all",
    "lr": "peak learning rate of Muon (hidden matrices)",
    "adamw_lr": "peak learning rate of AdamW (embeddings, norms, heads, scalars)",
    "weight_decay": "Muon's weight decay",
    "adamw_weight_decay": "AdamW's weight decay",
    "momentum": "Muon's momentum, in [0, 1)",
    "warmup_steps": "linear warm-up steps",
    "min_lr_ratio": "cosine floor as a fraction of the peak lr, in [0, 1]",
    "clip_grad": "max global gradient norm (0: off)",
    "precision": "auto: bf16 autocast on GPU, fp32 on CPU",
    "compile": "torch.compile the model",
    "backend": "sigvlp.ops backend for every op (default: auto, the fastest that serves the input)",
    "seed": "seed of the weights, the data order and the chunk draws",
    "out": "run folder: config.yaml, log.txt, metrics.jsonl, checkpoints/",
    "ckpt_every": "steps between checkpoints (the last step always saves)",
    "keep_last": "checkpoints kept (older ones are removed)",
    "log_every": "steps between metrics lines",
    "progress": "a progress bar",
    "tensorboard": "TensorBoard logs when the tensorboard package is installed",
    "threads": "torch CPU threads on the CPU (default: one per core free at the start, at most 8; 0: torch's "
               "default); a single data loader worker then runs only on a core left free",
}
#: the values of the enumerated keys (TrainConfig.validate and the model/ops layers check them)
BACKENDS = ("auto", "torch", "cpu", "triton", "cuda")  # as embed.BACKENDS and sigvlp.ops.backends.BACKEND_NAMES


def _choices(name: str):
    from sigvlp.model.config import PRESETS  # no torch: sigvlp.model imports on first use

    return {"optimizer": ("muon", "adamw"), "precision": ("auto", "bf16", "fp32"), "split": ("train", "valid"),
            "layout": ("auto", "v2", "v1"), "model": tuple(PRESETS), "backend": BACKENDS}.get(name)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML or JSON file of config keys (default: none, the built-in defaults)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one key (repeatable); model preset fields as model.FIELD=VALUE")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its latest checkpoint (its saved config, then overrides)")
    group = parser.add_argument_group("config keys (each overrides the config file and --set)")
    hints = typing.get_type_hints(TrainConfig)
    for name, f in config_fields().items():
        hint = _flag_type(hints[name])
        default = f.default if f.default is not dataclasses.MISSING else "{}"
        flag = "--" + name.replace("_", "-")
        text = FIELD_HELP.get(name, "")
        if "default" not in text:
            text += f" (default: {default})"
        if hint is bool:
            group.add_argument(flag, dest=f"cfg_{name}", action=argparse.BooleanOptionalAction, default=None,
                               help=text)
        elif hint in (int, float, str):
            choices = _choices(name)
            group.add_argument(flag, dest=f"cfg_{name}", type=str, default=None, choices=choices, help=text,
                               metavar=None if choices else hint.__name__.upper())


def config_from_args(args) -> TrainConfig:
    overrides = [parse_override(s) for s in args.overrides]
    for name in config_fields():
        v = getattr(args, f"cfg_{name}", None)
        if v is not None:
            overrides.append((name, parse_override(f"{name}={v}")[1] if isinstance(v, str) else v))
    if getattr(args, "resume", False) and args.config is None:
        config = _resume_config(overrides)
    else:
        config = load_config(args.config, overrides)
    _check_warmup(config, given=any(k == "warmup_steps" for k, _ in overrides))
    return config


def _check_warmup(config: TrainConfig, given: bool) -> None:
    """warmup_steps > steps: the lr would never reach its peak. A ValueError (exit 2) when the
    command line set warmup_steps; one warning line when it comes from the defaults or a file."""
    if config.warmup_steps <= config.steps:
        return
    what = (f"warmup_steps {config.warmup_steps} > steps {config.steps}: the learning rate would never reach "
            f"its peak")
    if given:
        raise ValueError(f"{what}; give --warmup-steps <= --steps")
    print(f"sigvlp train: warning: {what} (set --warmup-steps <= {config.steps})", file=sys.stderr)


def _resume_config(overrides) -> TrainConfig:
    """--resume without --config: the run's own resolved config.yaml, then the command line; a
    folder with checkpoints but no config.yaml starts from the latest checkpoint's stored config
    (never the built-in defaults, which would read as changes the user did not ask for)."""
    from pathlib import Path

    out = next((v for k, v in reversed(overrides) if k == "out"), None)
    if out is None:
        return load_config(None, overrides)
    saved = Path(str(out)) / "config.yaml"
    if saved.is_file():
        return load_config(saved, overrides)
    from sigvlp.checkpoint import latest_checkpoint, load_trainer_state

    ckpt = latest_checkpoint(Path(str(out)) / "checkpoints")
    stored = load_trainer_state(ckpt).get("config") if ckpt is not None else None
    return load_config(None, overrides, saved=stored, saved_from=f"checkpoint {ckpt} config")


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _interrupted_early(config, trainer) -> int:
    """A signal before the training loop (building, preprocessing) or a finished trainer's
    teardown: one line naming what there is to resume from; exit status 130."""
    from pathlib import Path

    from sigvlp.checkpoint import latest_checkpoint
    from sigvlp.train.trainer import resume_command

    if config is None:
        print("sigvlp train: interrupted before the configuration was read; nothing was written", file=sys.stderr)
        return 130
    out = Path(config.out)
    last = latest_checkpoint(out / "checkpoints")
    if (out / "config.yaml").is_file():
        msg = (f"interrupted; last good checkpoint: {last or 'none (a resume starts from step 0)'}; "
               f"resume with: {resume_command(out)}")
    else:
        msg = "interrupted before the run folder was written; nothing to resume, run the same command again"
    if trainer is not None:
        trainer.log(msg)
    else:
        print(f"sigvlp train: {msg}", file=sys.stderr)
        if (out / "log.txt").is_file():
            with open(out / "log.txt", "a", encoding="utf-8") as f:
                f.write(msg + "\n")
    return 130


def run(args) -> int:
    """`sigvlp train`: exit 0 when done, 2 on bad configuration or data, 3 when the loss diverged,
    130 when SIGINT/SIGTERM stopped it (one line naming the checkpoint and the resume command)."""
    import signal
    import threading

    restore = None
    if threading.current_thread() is threading.main_thread():  # SIGTERM ends like Ctrl-C, not silently
        restore = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        return _run(args)
    finally:
        if restore is not None:
            signal.signal(signal.SIGTERM, restore)


def _run(args) -> int:
    import torch.distributed as dist

    from sigvlp.train.trainer import Trainer, TrainingDiverged, TrainingInterrupted

    config = trainer = None
    try:  # configuration, model and data errors: one clear line, exit status 2
        config = config_from_args(args)
        trainer = Trainer(config, resume=args.resume)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError) as e:
        print(f"sigvlp train: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return _interrupted_early(config, None)
    try:
        if trainer.step >= config.steps:  # a finished run resumed: nothing to train, nothing to report
            if trainer.is_main:
                print(f"sigvlp train: run already at step {trainer.step} >= steps {config.steps}; nothing to do "
                      f"(raise --steps to train further)")
            return 0
        summary = trainer.run()
    except TrainingDiverged as e:
        print(f"sigvlp train: {e}", file=sys.stderr)
        return 3
    except TrainingInterrupted:  # its one line is already on the console and in log.txt
        return 130
    except KeyboardInterrupt:
        return _interrupted_early(config, trainer)
    finally:
        trainer.close()  # every exit path, "nothing to do" included, leaves the lock file empty
        if trainer.distributed and dist.is_initialized():
            dist.destroy_process_group()
    if trainer.is_main:
        if summary.get("step") is None:  # no step ran (cannot happen when step < steps; kept honest)
            print(f"done: no step trained (step {trainer.step}), checkpoint {summary.get('checkpoint')}")
        else:
            print(f"done: step {summary['step']}, loss {summary.get('loss', float('nan')):.4f}, "
                  f"checkpoint {summary.get('checkpoint')}")
    return 0
