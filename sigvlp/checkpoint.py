"""Checkpoints: where they are, how they are written and read, and their content hash.

One home for train, eval and embed. A checkpoint is a folder holding what
``SigVLP.save_pretrained`` writes (``model.safetensors`` + ``config.json``, so
``SigVLP.from_pretrained`` loads it); a training run's checkpoints also hold ``trainer.pt``
(optimizer, scheduler, RNG states, data position, step) and live in
``RUN/checkpoints/step_00001000/``.

Path forms (``resolve_checkpoint``, the same rule everywhere): a checkpoint folder itself (a
save_pretrained folder or one step folder), a training run folder ``RUN`` (its latest step) or
its ``RUN/checkpoints`` folder (its latest step). A step folder counts when it is named
``step_<digits>`` and holds the files its reader needs: ``config.json`` to load the model (eval,
embed), ``trainer.pt`` to resume training (a folder without them is never taken).

Writing (``save_checkpoint``): the folder is written under a temporary name, every file
fsync'ed, then renamed into place and the parent fsync'ed: a crash at any point leaves either
the previous checkpoints or the complete new one, never a torn folder that looks valid. Older
checkpoints beyond ``keep_last`` are removed afterwards.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from sigvlp.model import SigVLP
from sigvlp.model.modeling import CONFIG_NAME, WEIGHTS_NAME

__all__ = ["STATE_FILE", "checkpoint_hash", "latest_checkpoint", "list_checkpoints", "load_model",
           "load_trainer_state", "resolve_checkpoint", "save_checkpoint", "state_hash"]

#: the trainer state file of a training checkpoint
STATE_FILE = "trainer.pt"
_STEP_RE = re.compile(r"^step_(\d+)$")


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_checkpoints(ckpt_dir, need: Sequence[str] = (STATE_FILE,)) -> list[tuple[int, Path]]:
    """(step, folder) of the step_<digits> folders under ckpt_dir that hold every file in `need`
    (default: a training checkpoint's trainer.pt), oldest first; [] when ckpt_dir is no folder."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    out = []
    for p in ckpt_dir.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir() and all((p / f).is_file() for f in need):
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(ckpt_dir, need: Sequence[str] = (STATE_FILE,)) -> Optional[Path]:
    """The newest step folder of list_checkpoints(ckpt_dir, need), or None."""
    found = list_checkpoints(ckpt_dir, need)
    return found[-1][1] if found else None


def resolve_checkpoint(path, *, what: str = "ckpt", need: Sequence[str] = (CONFIG_NAME,)) -> Path:
    """The checkpoint folder `path` names: `path` itself when it holds every file in `need`
    (default config.json: a save_pretrained or step folder), else the latest step folder of
    ``path/checkpoints`` (a training run) or of `path` (a run's checkpoints folder).

    what: the argument's name in error messages ("ckpt", "--ckpt"). FileNotFoundError naming
    it when `path` does not exist or holds none of these."""
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{what}: no such checkpoint folder {p}")
    if p.is_dir() and all((p / f).is_file() for f in need):
        return p
    for folder in (p / "checkpoints", p):
        found = latest_checkpoint(folder, need)
        if found is not None:
            return found
    raise FileNotFoundError(f"{what}: {p} holds no {' + '.join(need)} (a SigVLP.save_pretrained or step folder) "
                            f"and no step_* folders with one (a training run or its checkpoints folder)")


def load_model(path, *, what: str = "ckpt", config=None, map_location="cpu", **overrides) -> tuple[SigVLP, Path]:
    """(model, folder): SigVLP.from_pretrained of the folder resolve_checkpoint(path) names.
    config / overrides: as SigVLP.from_pretrained (a differing weight field is a ValueError
    naming it, prefixed with `what`)."""
    folder = resolve_checkpoint(path, what=what)
    try:
        model = SigVLP.from_pretrained(folder, map_location=map_location, config=config, **overrides)
    except ValueError as e:
        raise ValueError(f"{what}: {e}") from None
    return model, folder


def checkpoint_hash(folder) -> str:
    """sha256 (hex) over a checkpoint folder's config.json and model.safetensors bytes (each
    preceded by its file name). FileNotFoundError naming a missing file."""
    h = hashlib.sha256()
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        f = Path(folder) / name
        if not f.is_file():
            raise FileNotFoundError(f"ckpt: {f} is missing")
        h.update(name.encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def state_hash(model) -> str:
    """sha256 (hex) of an in-memory model's config (sorted JSON) and weights (fp32 bytes, by name)."""
    h = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def save_checkpoint(ckpt_dir, step: int, write_model: Callable[[Path], None], state: dict,
                    keep_last: int = 3) -> Path:
    """Write checkpoint `step` atomically as ckpt_dir/step_XXXXXXXX (8 digits); write_model(folder)
    writes the weights (save_pretrained), `state` goes to trainer.pt. Keeps the newest keep_last."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / f"step_{step:08d}"
    tmp = ckpt_dir / f".tmp-step_{step:08d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        write_model(tmp)
        torch.save(state, tmp / STATE_FILE)
        for f in tmp.iterdir():
            _fsync_path(f)
        _fsync_path(tmp)
        if final.exists():  # the same step saved again (a resumed run): replace it
            old = ckpt_dir / f".old-step_{step:08d}-{os.getpid()}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_path(ckpt_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for _, old in list_checkpoints(ckpt_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in ckpt_dir.glob(".tmp-step_*"):  # left by a killed run
        if stale != tmp:
            shutil.rmtree(stale, ignore_errors=True)
    return final


def load_trainer_state(folder) -> dict:
    """The trainer.pt dict of a training checkpoint folder (on the CPU); FileNotFoundError when absent."""
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: not a checkpoint folder (no {STATE_FILE})")
    return torch.load(path, map_location="cpu", weights_only=False)
