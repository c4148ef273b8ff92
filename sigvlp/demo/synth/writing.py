"""Writing a phantom dataset in the CT-RATE layout (``write_dataset``), its synth.json marker and
what it allows (``check_overwritable``, ``clear_previous``: only files a previous run wrote are ever
removed), and the embedded default dataset (``ensure_default_dataset``, ``default_dataset_dir``)."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import multiprocessing as mp
import os
from pathlib import Path
from typing import Optional

import numpy as np

from sigvlp.data.ctrate import LABEL_COLUMNS, METADATA_COLUMNS, REPORT_COLUMNS, volume_relpath
from sigvlp.demo.synth.config import RESCALE_INTERCEPT, RESCALE_SLOPE, SYNTH_PRESETS, SynthConfig
from sigvlp.demo.synth.phantom import Phantom, make_phantom
from sigvlp.demo.synth.reports import csv_rows

__all__ = ["DEFAULT_DATASET", "MARKER", "WRITTEN", "check_overwritable", "clear_previous", "default_dataset_dir",
           "ensure_default_dataset", "save_nifti", "volume_name", "write_dataset", "written_files"]


def volume_name(split: str, index: int) -> str:
    """The CT-RATE file name of volume `index` (0-based) of `split`: "train_1_a_1.nii.gz" for ("train", 0)."""
    return f"{split}_{index + 1}_a_1.nii.gz"


def save_nifti(phantom: Phantom, path, orientation: str = "RAS", *, mask_path=None):
    """Write the phantom's CT (int16, stored = HU + 1024 with scl_slope 1 / scl_inter -1024) to `path`
    and its labels (uint8 TotalSegmentator ids) to `mask_path` when given, both with the affine of
    `orientation` ("RAS" or "LPS": i to the left and j to the back), parent folders created."""
    import nibabel as nib  # import cost: only the writers need nibabel, not `import sigvlp.demo.synth`

    for p, arr, kind in ((path, phantom.hu, "ct"), (mask_path, phantom.labels, "mask")):
        if p is None:
            continue
        data = phantom.file_array(arr, orientation)
        if kind == "ct":
            data = (data.astype(np.int32) - int(RESCALE_INTERCEPT)).astype(np.int16)  # stored = HU + 1024
        img = nib.Nifti1Image(data, phantom.affine(orientation))
        img.header.set_xyzt_units("mm")
        img.set_qform(img.affine, code=1)
        img.set_sform(img.affine, code=1)
        if kind == "ct":
            img.header.set_data_dtype(np.int16)
            img.header.set_slope_inter(RESCALE_SLOPE, RESCALE_INTERCEPT)
        Path(p).parent.mkdir(parents=True, exist_ok=True)
        nib.save(img, str(p))


def _make_and_write(job):
    """Draw volume `index` of `split` (its seed hashed from the dataset seed), write its CT and mask
    files under `out`, and return its CSV rows (reports.csv_rows). A module-level function so that a
    process pool can run it."""
    out, split, index, seed, config = job
    vseed = int.from_bytes(hashlib.sha1(f"{seed}/{split}/{index}".encode()).digest()[:4], "little")
    phantom = make_phantom(vseed, config)
    name = volume_name(split, index)
    rel = volume_relpath(name)
    orientation = "LPS" if np.random.default_rng([vseed, 6]).random() < config.lps_fraction else "RAS"
    save_nifti(phantom, Path(out) / "dataset" / rel, orientation, mask_path=Path(out) / "masks" / rel)
    return csv_rows(phantom, name)


def _write_csv(path: Path, columns, rows):
    """A CSV with header `columns` and one line per row dict, parent folders created."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(columns))
        w.writeheader()
        w.writerows(rows)


#: The top-level names write_dataset writes under its folder; synth.json is its marker.
WRITTEN = ("dataset", "masks", "findings", "synth.json")
MARKER = "synth.json"


def written_files(n_train: int, n_valid: int) -> list[str]:
    """Relative paths of the files write_dataset(out, n_train, n_valid, ...) writes (marker excluded)."""
    files = []
    for split, csv_split, n in (("train", "train", n_train), ("valid", "validation", n_valid)):
        for i in range(n):
            rel = volume_relpath(volume_name(split, i))
            files += [f"dataset/{rel}", f"masks/{rel}"]
        files += [f"dataset/radiology_text_reports/{csv_split}_reports.csv",
                  f"dataset/multi_abnormality_labels/{split}_predicted_labels.csv",
                  f"dataset/metadata/{csv_split}_metadata.csv", f"findings/{split}_findings.jsonl"]
    return files


def _read_marker(out: Path) -> Optional[dict]:
    """The parsed synth.json of `out`, or None when absent. ValueError when it is not synth's."""
    marker = out / MARKER
    if not marker.is_file() or marker.is_symlink():
        if marker.exists() or marker.is_symlink():
            raise ValueError(f"{out}: {MARKER} is not a file written by sigvlp synth; refusing to delete anything")
        return None
    try:
        info = json.loads(marker.read_text())
        n_train, n_valid = info["n_train"], info["n_valid"]
        ok = all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in (n_train, n_valid))
    except (ValueError, TypeError, KeyError, OSError, UnicodeDecodeError):
        ok = False
    if not ok:
        raise ValueError(f"{out}: {MARKER} is not a marker written by sigvlp synth (no n_train/n_valid); "
                         f"refusing to delete anything")
    return info


def check_overwritable(out) -> Optional[dict]:
    """Raise ValueError unless `out` is absent, empty, or a previous sigvlp synth output (has synth's
    synth.json marker); return that marker (None when there is none)."""
    out = Path(out)
    if not out.is_dir() or not any(out.iterdir()):
        return None
    info = _read_marker(out)
    if info is None:
        raise ValueError(f"{out}: folder is not empty and has no {MARKER}: it does not look like a sigvlp synth "
                         f"output, so nothing is overwritten (use an empty or new folder)")
    return info


def clear_previous(out: Path) -> None:
    """Remove the files a previous write_dataset wrote under `out`, as listed by its synth.json
    marker (n_train/n_valid give the layout), then the folders this leaves empty, then the marker.
    Nothing else is touched: a folder without the marker raises ValueError (see check_overwritable)."""
    out = Path(out)
    info = check_overwritable(out)
    if info is None:
        return
    dirs = set()
    for rel in written_files(info["n_train"], info["n_valid"]):
        p = out / rel
        if p.is_symlink() or p.is_file():
            p.unlink()
        parent = p.parent
        while parent != out:
            dirs.add(parent)
            parent = parent.parent
    for d in sorted(dirs, key=lambda d: len(d.parts), reverse=True):  # deepest first; only empty ones
        if d.is_dir() and not d.is_symlink() and not any(d.iterdir()):
            d.rmdir()
    (out / MARKER).unlink()


def _write_split(out: Path, split: str, n: int, seed: int, config: SynthConfig, workers: int) -> None:
    """The n volumes of `split` ("train" or "valid"; `workers` processes when > 1), then its report,
    label and metadata CSVs and its findings bank."""
    csv_split = {"train": "train", "valid": "validation"}[split]
    jobs = [(str(out), split, i, seed, config) for i in range(n)]
    if workers > 1 and n > 1:
        with mp.get_context("fork" if hasattr(os, "fork") else "spawn").Pool(workers) as pool:
            results = pool.map(_make_and_write, jobs, chunksize=max(1, n // (4 * workers)))
    else:
        results = [_make_and_write(j) for j in jobs]
    reports, labels, metas, banks = zip(*results) if results else ((), (), (), ())
    _write_csv(out / "dataset" / "radiology_text_reports" / f"{csv_split}_reports.csv", REPORT_COLUMNS, reports)
    _write_csv(out / "dataset" / "multi_abnormality_labels" / f"{split}_predicted_labels.csv", LABEL_COLUMNS, labels)
    _write_csv(out / "dataset" / "metadata" / f"{csv_split}_metadata.csv", METADATA_COLUMNS, metas)
    (out / "findings").mkdir(parents=True, exist_ok=True)
    with open(out / "findings" / f"{split}_findings.jsonl", "w", encoding="utf-8") as f:
        for entry in banks:
            f.write(json.dumps(entry) + "\n")


def write_dataset(out, n_train: int = 200, n_valid: int = 50, seed: int = 0, config: SynthConfig = SynthConfig(),
                  workers: int = 0, progress: bool = False, *, overwrite: bool = False) -> Path:
    """Write a complete CT-RATE-style phantom dataset under `out` (layout: sigvlp.demo.synth's docstring).
    A non-empty `out` is refused (FileExistsError: old volumes would sit beside the new CSVs)
    unless overwrite=True, which first removes the files a previous write_dataset wrote there
    (those its synth.json marker lists, see clear_previous) and nothing else; a non-empty folder
    without that marker is never overwritten (ValueError). n_train, n_valid >= 0, not both 0
    (ValueError: an empty dataset)."""
    if n_train < 0 or n_valid < 0:
        raise ValueError(f"n_train and n_valid must be >= 0, got {n_train}, {n_valid}")
    if n_train == 0 and n_valid == 0:
        raise ValueError("n_train and n_valid are both 0: nothing to write (one of them must be >= 1)")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            check_overwritable(out)  # a folder that is not synth's output: say so rather than suggest overwrite
            raise FileExistsError(f"{out}: folder is not empty; pass overwrite=True (--overwrite) to replace "
                                  f"what a previous run wrote")
        clear_previous(out)
    info = {"n_train": n_train, "n_valid": n_valid, "seed": seed, "config": dataclasses.asdict(config)}
    out.mkdir(parents=True, exist_ok=True)
    # Marker first (flagged incomplete) so an interrupted run can still be cleared by the next one;
    # rewritten without the flag at the end, so a half-written dataset never looks complete.
    (out / MARKER).write_text(json.dumps({**info, "complete": False}, indent=1))
    workers = workers or min(os.cpu_count() or 1, 8)
    for split, n in (("train", n_train), ("valid", n_valid)):
        _write_split(out, split, n, seed, config, workers)
        if progress:
            print(f"{split}: {n} volumes written")
    (out / MARKER).write_text(json.dumps(info, indent=1))
    return out


DEFAULT_DATASET = {"n_train": 64, "n_valid": 16, "seed": 0, "preset": "small"}


def default_dataset_dir() -> Path:
    """$SIGVLP_CACHE/phantoms, else ~/.cache/sigvlp/phantoms: where ensure_default_dataset writes by default."""
    root = os.environ.get("SIGVLP_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "sigvlp")
    return Path(root) / "phantoms"


def ensure_default_dataset(path=None, *, n_train: int = DEFAULT_DATASET["n_train"],
                           n_valid: int = DEFAULT_DATASET["n_valid"], seed: int = DEFAULT_DATASET["seed"],
                           preset: str = DEFAULT_DATASET["preset"], workers: int = 0) -> Path:
    """The embedded default dataset: generated once (deterministically) under `path`
    (default ~/.cache/sigvlp/phantoms, or $SIGVLP_CACHE/phantoms) and reused while its
    parameters match. It only ever replaces its own output: a non-empty `path` without synth's
    synth.json marker raises ValueError and nothing is deleted."""
    path = Path(path) if path is not None else default_dataset_dir()
    config = SYNTH_PRESETS[preset]
    want = {"n_train": n_train, "n_valid": n_valid, "seed": seed, "config": dataclasses.asdict(config)}
    info = check_overwritable(path)  # ValueError for a folder synth did not write
    if info is not None and info == json.loads(json.dumps(want)):  # an incomplete run has "complete": False
        return path
    return write_dataset(path, n_train, n_valid, seed, config, workers=workers, overwrite=True)

