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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML or JSON file of config keys (see `sigvlp train --help`)")
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
        if hint is bool:
            group.add_argument(flag, dest=f"cfg_{name}", action=argparse.BooleanOptionalAction, default=None,
                               help=f"(default {default})")
        elif hint in (int, float, str):
            group.add_argument(flag, dest=f"cfg_{name}", type=str, default=None, metavar=hint.__name__.upper(),
                               help=f"(default {default})")


def config_from_args(args) -> TrainConfig:
    overrides = [parse_override(s) for s in args.overrides]
    for name in config_fields():
        v = getattr(args, f"cfg_{name}", None)
        if v is not None:
            overrides.append((name, parse_override(f"{name}={v}")[1] if isinstance(v, str) else v))
    base = args.config
    if getattr(args, "resume", False) and base is None:
        # the run's own resolved config, then the command line
        from pathlib import Path

        out = next((v for k, v in reversed(overrides) if k == "out"), None)
        saved = Path(str(out)) / "config.yaml" if out is not None else None
        if saved is not None and saved.is_file():
            base = saved
    return load_config(base, overrides)


def run(args) -> int:
    import torch.distributed as dist

    from sigvlp.train.trainer import Trainer, TrainingDiverged

    try:  # configuration, model and data errors: one clear line, exit status 2
        config = config_from_args(args)
        trainer = Trainer(config, resume=args.resume)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError) as e:
        print(f"sigvlp train: error: {e}", file=sys.stderr)
        return 2
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
    finally:
        if trainer.distributed and dist.is_initialized():
            dist.destroy_process_group()
    if trainer.is_main:
        if summary.get("step") is None:  # no step ran (cannot happen when step < steps; kept honest)
            print(f"done: no step trained (step {trainer.step}), checkpoint {summary.get('checkpoint')}")
        else:
            print(f"done: step {summary['step']}, loss {summary.get('loss', float('nan')):.4f}, "
                  f"checkpoint {summary.get('checkpoint')}")
    return 0
