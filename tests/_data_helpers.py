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
    Path(path).parent.mkdir(parents=True, exist_ok=True)
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


def label_table_xml(table: dict) -> bytes:
    """A NIfTI header extension body in the form TotalSegmentator writes (a Caret XML label table;
    totalsegmentator/nifti_ext_header.py), written here from the format, not copied."""
    labels = "\n".join(f'<Label Key="{k}" Red="1" Green="0" Blue="0" Alpha="1"><![CDATA[{v}]]></Label>'
                       for k, v in table.items())
    return (f'<?xml version="1.0" encoding="UTF-8"?> <CaretExtension> <VolumeInformation Index="0"> <LabelTable>\n'
            f'{labels}\n</LabelTable> <VolumeType><![CDATA[Label]]></VolumeType> </VolumeInformation>'
            f'</CaretExtension>\n  ').encode()


def save_labels(path, data_xyz, table: dict = None):
    """A uint8 label map (nibabel (x, y, z) order, identity affine), with a TotalSegmentator label
    table in the header extension when `table` is given."""
    img = nib.Nifti1Image(np.asarray(data_xyz, np.uint8), np.eye(4))
    img.header.set_data_dtype(np.uint8)
    if table is not None:
        img.header.extensions.append(nib.nifti1.Nifti1Extension(0, label_table_xml(table)))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return Path(path)


def write_ctrate(root, names, *, layout="v2", value=None, shape=(8, 8, 6), intercept=-1024, masks=None,
                 csv=True):
    """A tiny CT-RATE tree under root/dataset in the exact layout (v2: <split>_fixed/<split>_<pid>/
    <split>_<pid>_<scan>/<VolumeName>; v1: <split>/...), int16 volumes without header scaling, the
    reports and metadata CSVs (RescaleSlope 1, RescaleIntercept `intercept`). value(name) -> the
    stored voxel values (default: air around a 40 HU block). masks: a folder under which each
    volume gets a label map at the same relative path (ids 5 liver and 51 heart by slice half).
    Returns {name: volume path}."""
    import csv as _csv

    from sigvlp.data.ctrate import volume_relpath

    root = Path(root)
    paths = {}
    for name in names:
        if value is not None:
            data = np.asarray(value(name), np.int16)
        else:
            data = np.full(shape, -1000, np.int16)
            data[2:6, 2:6, :] = 40
        p = root / "dataset" / volume_relpath(name, layout)
        save(p, data, dtype=np.int16)
        paths[name] = p
        if masks is not None:
            lab = np.zeros(data.shape, np.uint8)
            lab[2:6, 2:6, : data.shape[2] // 2] = 5
            lab[2:6, 2:6, data.shape[2] // 2:] = 51
            save_labels(Path(masks) / volume_relpath(name, layout), lab)
    if csv:
        for split, csv_split in (("train", "train"), ("valid", "validation")):
            rows = [n for n in names if n.startswith(split + "_")]
            if not rows:
                continue
            for sub, kind, cols in (("radiology_text_reports", "reports", ("VolumeName", "Findings_EN", "Impressions_EN")),
                                    ("metadata", "metadata", ("VolumeName", "RescaleSlope", "RescaleIntercept"))):
                f = root / "dataset" / sub / f"{csv_split}_{kind}.csv"
                f.parent.mkdir(parents=True, exist_ok=True)
                old = list(_csv.DictReader(open(f, newline=""))) if f.exists() else []
                have = {r["VolumeName"] for r in old}
                new = [{"VolumeName": n, "Findings_EN": "The liver is normal.", "Impressions_EN": "Normal.",
                        "RescaleSlope": 1, "RescaleIntercept": intercept} for n in rows if n not in have]
                with open(f, "w", newline="") as fh:
                    w = _csv.DictWriter(fh, fieldnames=list(cols), extrasaction="ignore")
                    w.writeheader()
                    w.writerows(old + new)
    return paths
