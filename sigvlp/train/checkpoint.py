"""Checkpoints of a training run: one folder per step, written atomically.

``<run>/checkpoints/step_00001000/`` holds what ``SigVLP.save_pretrained`` writes
(``model.safetensors`` + ``config.json``, so ``SigVLP.from_pretrained`` loads it) and
``trainer.pt`` (optimizer, scheduler, RNG states, data position, step). The folder is written
under a temporary name, every file fsync'ed, then renamed into place and the parent fsync'ed:
a crash at any point leaves either the previous checkpoints or the complete new one, never a
torn folder that looks valid. Older checkpoints beyond ``keep_last`` are removed afterwards.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Callable, Optional

import torch

__all__ = ["save_checkpoint", "latest_checkpoint", "list_checkpoints", "load_trainer_state", "STATE_FILE"]

STATE_FILE = "trainer.pt"
_STEP_RE = re.compile(r"^step_(\d{8})$")


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_checkpoints(ckpt_dir) -> list[tuple[int, Path]]:
    """(step, folder) of the complete checkpoints under ckpt_dir, oldest first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    out = []
    for p in ckpt_dir.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(ckpt_dir) -> Optional[Path]:
    found = list_checkpoints(ckpt_dir)
    return found[-1][1] if found else None


def save_checkpoint(ckpt_dir, step: int, write_model: Callable[[Path], None], state: dict,
                    keep_last: int = 3) -> Path:
    """Write checkpoint `step` atomically; write_model(folder) writes the weights (save_pretrained)."""
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
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: not a checkpoint folder (no {STATE_FILE})")
    return torch.load(path, map_location="cpu", weights_only=False)
