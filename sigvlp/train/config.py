"""The training configuration: one dataclass, loadable from YAML or JSON, overridable per key.

Precedence (lowest first): the dataclass defaults, the config file (``--config``), then the
command line (``--set key=value`` and the per-field flags such as ``--steps``). Keys of the model
preset go under ``model_overrides`` (``--set model.width=256`` is short for
``--set model_overrides.width=256``). A key that is not a field raises ValueError naming it and
listing the valid ones.

One owner per setting: what the weights depend on (patch size, preprocessing and chunk presets,
``max_text_tokens``, the tokenizer) belongs to the model config (sigvlp.model.SigVLPConfig); a
training config changes it only through ``model_overrides``, and a checkpoint carries it. A
config file written before this rule (top-level ``preprocess``, ``chunk`` or ``max_text_tokens``,
as every run folder's ``config.yaml`` had) still loads: ``load_config`` moves those keys into
``model_overrides`` (a key model_overrides already sets keeps model_overrides' value) and logs
one line on the "sigvlp.train" logger.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import numbers
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

__all__ = ["TrainConfig", "load_config", "apply_overrides", "parse_override", "save_config", "config_fields",
           "LEGACY_MODEL_KEYS"]

log = logging.getLogger("sigvlp.train")

#: top-level keys of older config files that the model config owns now (moved into model_overrides)
LEGACY_MODEL_KEYS = ("preprocess", "chunk", "max_text_tokens")


@dataclass
class TrainConfig:
    """Everything a training run reads. Units: steps are optimizer steps (after accumulation);
    token_budget is image tokens per micro-batch per rank; lr values are peak learning rates.

    The model config (``model`` preset + ``model_overrides``) owns what the weights depend on:
    patch size, the preprocessing and chunk presets, max_text_tokens and the tokenizer; training
    reads them from it (texts are cut to the model's max_text_tokens, as scoring does).
    ``min_slices`` / ``max_slices`` / ``whole_fraction`` stay here: they change how training
    samples chunks from the model's chunk preset (depth range, share of whole volumes), not what
    the model is or how it is scored (evaluation draws from the preset itself), so a checkpoint
    does not carry them.
    """

    # data
    data: Optional[str] = None              # dataset root in the CT-RATE layout (real or `sigvlp synth` output)
    split: str = "train"
    layout: str = "auto"                    # CT-RATE layout: "v2" (<split>_fixed, HU), "v1" (<split>), "auto"
    masks: Optional[str] = None             # organ masks folder (None: DATA/masks when present)
    findings: Optional[str] = None          # findings bank (None: DATA/findings/<split>_findings.jsonl when present)
    cache: Optional[str] = None             # preprocessing cache root (None: DATA/.sigvlp-cache or $SIGVLP_CACHE)
    min_slices: Optional[int] = None        # override the chunk preset's depth range (slices after preprocessing)
    max_slices: Optional[int] = None
    whole_fraction: Optional[float] = None  # override the chunk preset's share of whole-volume chunks
    token_budget: int = 8192                # image tokens per micro-batch (per rank)
    chunks_per_volume: int = 2
    num_workers: int = 2
    prompt_weight: float = 0.0              # weight of the CT-CLIP statement loss (sigvlp.prompts; 0: off)
    prompt_decorrelation: float = 0.0       # weight of the topic-direction decorrelation penalty (needs prompt_weight > 0)
    # model
    model: str = "base"                     # SigVLPConfig preset (not used with init_siglip)
    model_overrides: dict = field(default_factory=dict)
    init_from: Optional[str] = None         # a save_pretrained folder to start from
    init_siglip: Optional[str] = None       # a Hugging Face SigLIP folder to start from (SigVLP.from_siglip)
    # optimisation
    steps: int = 1000                       # optimizer steps
    grad_accum: int = 1                     # micro-batches per optimizer step
    optimizer: str = "muon"                 # muon: Muon for hidden matrices + AdamW for the rest; adamw: AdamW for all
    lr: float = 0.02                        # Muon (hidden matrices)
    adamw_lr: float = 1e-3                  # AdamW (embeddings, norms, heads, scalars)
    weight_decay: float = 0.01              # Muon
    adamw_weight_decay: float = 0.0
    momentum: float = 0.95
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1               # cosine floor as a fraction of the peak lr
    clip_grad: float = 1.0                  # max global grad norm (0: off)
    precision: str = "auto"                 # auto (bf16 autocast on GPU, fp32 on CPU), bf16, fp32
    compile: bool = False                   # torch.compile the model
    backend: Optional[str] = None           # sigvlp.ops backend for every op (None: auto)
    seed: int = 0
    # run folder, checkpoints, logging
    out: str = "runs/sigvlp"
    ckpt_every: int = 500                   # steps between checkpoints (the last step always saves)
    keep_last: int = 3                      # checkpoints kept
    log_every: int = 1                      # steps between metrics lines
    progress: bool = True                   # tqdm bar
    tensorboard: bool = True                # when the tensorboard package is installed
    threads: Optional[int] = None           # torch CPU threads (None: sigvlp.threads' rule; 0: torch's default)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        def positive(name, allow_zero=False):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < (0 if allow_zero else 1):
                raise ValueError(f"{name}: expected an integer >= {0 if allow_zero else 1}, got {v!r}")

        for name in ("token_budget", "chunks_per_volume", "steps", "grad_accum", "ckpt_every",
                     "keep_last", "log_every"):
            positive(name)
        for name in ("num_workers", "warmup_steps", "seed"):
            positive(name, allow_zero=True)
        for name in ("min_slices", "max_slices"):
            if getattr(self, name) is not None:
                positive(name)
        if self.min_slices is not None and self.max_slices is not None and self.min_slices > self.max_slices:
            raise ValueError(f"min_slices ({self.min_slices}) > max_slices ({self.max_slices})")
        for name in ("lr", "adamw_lr", "weight_decay", "adamw_weight_decay", "clip_grad", "prompt_weight",
                     "prompt_decorrelation"):
            v = getattr(self, name)
            if not isinstance(v, numbers.Real) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{name}: expected a finite number >= 0, got {v!r}")
            setattr(self, name, float(v))
        for name in ("min_lr_ratio",):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not 0 <= v <= 1:
                raise ValueError(f"{name}: expected a number in [0, 1], got {v!r}")
        if self.whole_fraction is not None and (not isinstance(self.whole_fraction, (int, float))
                                                or isinstance(self.whole_fraction, bool)
                                                or not 0 <= self.whole_fraction <= 1):
            raise ValueError(f"whole_fraction: expected null or a number in [0, 1], got {self.whole_fraction!r}")
        if self.prompt_decorrelation > 0 and self.prompt_weight == 0:
            raise ValueError("prompt_decorrelation: acts on the prompt statements, which prompt_weight = 0 leaves "
                             "out; set prompt_weight > 0 or prompt_decorrelation = 0")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum: expected a number in [0, 1), got {self.momentum!r}")
        if self.optimizer not in ("muon", "adamw"):
            raise ValueError(f"optimizer: expected 'muon' or 'adamw', got {self.optimizer!r}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision: expected 'auto', 'bf16' or 'fp32', got {self.precision!r}")
        if self.split not in ("train", "valid"):
            raise ValueError(f"split: expected 'train' or 'valid', got {self.split!r}")
        if self.layout not in ("auto", "v2", "v1"):
            raise ValueError(f"layout: expected 'auto', 'v2' or 'v1', got {self.layout!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or isinstance(self.threads, bool)
                                         or self.threads < 0):
            raise ValueError(f"threads: expected an integer >= 0 (0: torch's default; null: one per free core), "
                             f"got {self.threads!r}")
        if self.init_from and self.init_siglip:
            raise ValueError(f"init_from ({self.init_from}) and init_siglip ({self.init_siglip}): give one of them "
                             f"(a SigVLP checkpoint or a SigLIP folder to start from)")
        if not isinstance(self.model_overrides, dict):
            raise TypeError(f"model_overrides: expected a mapping, got {type(self.model_overrides).__name__}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def config_fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(TrainConfig)}


def _unknown(key: str) -> ValueError:
    if key in LEGACY_MODEL_KEYS:
        return ValueError(f"{key}: the model config owns it now; set model.{key}=... (model_overrides)")
    return ValueError(f"unknown config key {key!r}; valid keys: {', '.join(config_fields())} "
                      "(model preset fields go under model_overrides, e.g. model.width=...)")


def _hint(f: dataclasses.Field):
    hints = typing.get_type_hints(TrainConfig)
    return hints[f.name]


def _coerce(name: str, value: Any, hint) -> Any:
    """value (from YAML/JSON or a --set string parsed as YAML) -> the field's type."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(name, value, inner[0])
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0", "on", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ValueError(f"{name}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ValueError(f"{name}: expected an integer, got {value!r}")
        return int(value)
    if hint is float:
        # YAML 1.1 (PyYAML) reads 1e-3 (no dot) as a string: accept any text float() accepts
        if isinstance(value, str) and not isinstance(value, bool):
            try:
                return float(value.strip())
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ValueError(f"{name}: expected a string, got {value!r}")
        return str(value)
    if hint is dict or origin is dict:
        if not isinstance(value, Mapping):
            raise ValueError(f"{name}: expected a mapping, got {value!r}")
        return dict(value)
    return value


def parse_override(text: str) -> tuple[str, Any]:
    """'key=value' -> (key, value parsed as YAML: numbers, true/false, null, lists, strings)."""
    if "=" not in text:
        raise ValueError(f"--set: expected key=value, got {text!r}")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ValueError(f"--set: empty key in {text!r}")
    try:
        import yaml

        value = yaml.safe_load(raw) if raw.strip() else ""
    except Exception:
        value = raw
    return key, value


def apply_overrides(config: TrainConfig, overrides: Mapping[str, Any] | Sequence[tuple[str, Any]]) -> TrainConfig:
    """A new config with `overrides` (key -> value; "model.<field>" or "model_overrides.<field>"
    set one model field) applied on top of `config`."""
    items = overrides.items() if isinstance(overrides, Mapping) else overrides
    values = config.to_dict()
    fields = config_fields()
    for key, value in items:
        if key.startswith(("model.", "model_overrides.")):
            sub = key.split(".", 1)[1]
            if not sub:
                raise _unknown(key)
            values["model_overrides"] = {**values["model_overrides"], sub: value}
            continue
        key = key.replace("-", "_")
        if key not in fields:
            raise _unknown(key)
        if key == "model_overrides":
            value = _coerce(key, value, dict)
            values["model_overrides"] = {**values["model_overrides"], **value}
            continue
        values[key] = _coerce(key, value, _hint(fields[key]))
    return TrainConfig(**values)


def load_config(path=None, overrides=(), *, saved: Optional[Mapping] = None,
                saved_from: str = "saved config") -> TrainConfig:
    """TrainConfig from a YAML (.yaml/.yml) or JSON file (None: the defaults), then `overrides`.
    saved: a config mapping (e.g. a checkpoint's stored config, named `saved_from` in errors)
    used as the base instead of the defaults when no file is given."""
    config = TrainConfig()
    if path is not None:
        path = Path(path)
        config = _apply_mapping(config, _read_config_file(path), path)
    elif saved is not None:
        config = _apply_mapping(config, saved, saved_from)
    return apply_overrides(config, overrides)


def _read_config_file(path: Path):
    if not path.is_file():
        raise FileNotFoundError(f"--config: no such file {path}")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".json":
            return json.loads(text)
        import yaml

        return yaml.safe_load(text)
    except Exception as e:  # json.JSONDecodeError, yaml.YAMLError: one line naming the file
        kind = "JSON" if path.suffix == ".json" else "YAML"
        raise ValueError(f"{path}: invalid {kind}: {' '.join(str(e).split())}") from None


def _apply_mapping(config: TrainConfig, data, where) -> TrainConfig:
    """`config` with a config file's (or saved config's) mapping applied; errors name `where`."""
    data = data or {}
    if not isinstance(data, Mapping):
        raise ValueError(f"{where}: expected a mapping of config keys, got {type(data).__name__}")
    if "model" in data and isinstance(data["model"], Mapping):  # model: {preset: tiny, width: ...}
        data = dict(data)
        m = dict(data.pop("model"))
        data["model"] = m.pop("preset", TrainConfig.model)
        data["model_overrides"] = {**data.get("model_overrides", {}), **m}
    data = _legacy_model_keys(data, where)
    try:
        return apply_overrides(config, data)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def _legacy_model_keys(data: Mapping, path) -> Mapping:
    """`data` (a config file's mapping) with LEGACY_MODEL_KEYS moved from the top level into
    model_overrides (null values dropped; a key model_overrides sets keeps its value), logging
    one line when there were any."""
    found = [k for k in LEGACY_MODEL_KEYS if k in data]
    if not found:
        return data
    data = dict(data)
    over = data.get("model_overrides") or {}
    if not isinstance(over, Mapping):
        return data  # apply_overrides reports the bad model_overrides
    over = dict(over)
    moved, kept = [], []
    for k in found:
        v = data.pop(k)
        if v is None:
            continue
        if k in over:
            kept.append(f"{k} (model_overrides {over[k]!r}, top level {v!r})")
        else:
            over[k] = v
            moved.append(f"{k}={v!r}")
    data["model_overrides"] = over
    log.warning(f"{path}: top-level {', '.join(found)} belong to the model config now: "
                + (f"moved into model_overrides ({', '.join(moved)})" if moved else "nothing to move")
                + (f"; kept model_overrides' value for {', '.join(kept)}" if kept else ""))
    return data


def save_config(config: TrainConfig, path) -> None:
    """Write the resolved config as YAML (JSON for a .json path)."""
    path = Path(path)
    if path.suffix == ".json":
        path.write_text(json.dumps(config.to_dict(), indent=1) + "\n")
    else:
        import yaml

        path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
