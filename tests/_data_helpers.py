"""Shared helpers for the data tests: one tiny phantom dataset per test session."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np

from sigvlp.demo.synth import SYNTH_PRESETS, write_dataset

TINY = SYNTH_PRESETS["tiny"]
_DATASETS: dict = {}


def tiny_dataset(tmp_path_factory, n_train: int = 6, n_valid: int = 2, seed: int = 0) -> Path:
    """A tiny CT-RATE-layout phantom dataset, written once per session and parameter set.
    Tests that modify a dataset copy it first (copy_dataset)."""
    key = (n_train, n_valid, seed)
    if key not in _DATASETS:
        out = tmp_path_factory.mktemp(f"phantoms_{n_train}_{n_valid}_{seed}")
        _DATASETS[key] = write_dataset(out, n_train, n_valid, seed=seed, config=TINY, workers=1)
    return _DATASETS[key]


def copy_dataset(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def save(path, data, affine=None, slope=None, inter=None, dtype=None):
    """Write a NIfTI file; slope/inter go into the header when given."""
    img = nib.Nifti1Image(np.asarray(data), np.eye(4) if affine is None else affine)
    if dtype is not None:
        img.header.set_data_dtype(dtype)
    if slope is not None:
        img.header.set_slope_inter(slope, inter)
    nib.save(img, str(path))
    return path


def truncate_gz(path: Path, keep_fraction: float = 0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep_fraction)])
    # sanity: gzip must now fail to decompress fully
    try:
        gzip.decompress(path.read_bytes())
    except (EOFError, OSError):
        return path
    raise AssertionError("truncation left a readable gzip stream")


def die_on_odd(job):
    """A pool job for build_cache's worker-death handling: (ok, value), or the process exits
    abruptly (as the out-of-memory killer would end it) when job[0] is odd."""
    import os

    if job[0] % 2:
        os._exit(9)
    return True, job[1]
