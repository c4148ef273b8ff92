"""``sigvlp masks DATA [--split S] [--fast] [--device cpu|gpu] [--layout auto|v2|v1]``: organ masks
for a CT-RATE-layout dataset with TotalSegmentator.

Every volume of the split that has no mask yet (none under any root that ``masks_dir="auto"``
searches, CT-RATE's ``ts_seg/ts_total`` included) is segmented with TotalSegmentator's ``total``
task into one multilabel map (``--ml``, with its label table in the header extension, see
sigvlp.data.masks), written to ``DATA/masks/<the volume's path relative to its split folder's
parent>``, e.g. ``DATA/masks/train_fixed/train_1/train_1_a/train_1_a_1.nii.gz``, where
``masks_dir="auto"`` finds it. The run is resumable: a mask is written to a temporary name and
renamed when complete, and volumes with a mask are skipped. A volume that fails is reported and
skipped (exit status 1 at the end); the others go on.

Input HU: v2 files and files with header scaling go to TotalSegmentator as they are; a v1 file
whose HU need the metadata CSV's rescale is rescaled first (as load_volume decides) and handed
over in memory, in its own voxel grid, so the mask matches the file.

TotalSegmentator is an optional extra: ``pip install -e ".[seg]"`` (or ``pip install
TotalSegmentator``); it is imported only by this command. It downloads its weights (a few
hundred MB for ``total``; ``--fast`` uses the smaller 3 mm model) into ``~/.totalsegmentator``
(``TOTALSEG_HOME_DIR`` moves it) on first use, so the first run needs network access. On a CPU
use ``--fast``: the full-resolution model takes minutes per volume there.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from sigvlp.data.ctrate import CTRateDataset, add_layout_argument

INSTALL_HINT = ('sigvlp masks: TotalSegmentator is not installed; install the optional extra: '
                'pip install -e ".[seg]"  (or: pip install TotalSegmentator)')


def output_path(dataset: CTRateDataset, volume) -> Path:
    """Where `sigvlp masks` writes the mask of `volume`: DATA/masks/<path relative to the parent of
    its split folder>."""
    volume = Path(volume)
    for folder in dataset.volume_dirs:
        if volume.is_relative_to(folder):
            return dataset.root / "masks" / volume.relative_to(folder.parent)
    raise ValueError(f"{volume} is not under a volume folder of {dataset.root} ({dataset.volume_dirs})")


def plan(dataset: CTRateDataset) -> tuple[list[tuple[Path, Path]], int]:
    """([(volume, mask to write)], number of volumes that already have a mask) for the dataset's
    volumes, in order. A volume has a mask when one exists under any masks_dir="auto" root (as
    CTRateDataset finds it) or at its output path."""
    roots = [r for r in dataset.auto_mask_roots() if r.is_dir()]
    todo, done = [], 0
    for rec in dataset.records:
        out = output_path(dataset, rec.path)
        if out.exists() or dataset.find_mask(rec.path, rec.name, roots) is not None:
            done += 1
        else:
            todo.append((Path(rec.path), out))
    return todo, done


def import_totalsegmentator():
    """TotalSegmentator's python entry point. ImportError when the extra is not installed."""
    from totalsegmentator.python_api import totalsegmentator  # optional dependency: the [seg] extra

    return totalsegmentator


def hu_input(volume: Path, metadata, already_hu):
    """What TotalSegmentator reads for `volume`: the path itself, or an in-memory NIfTI in HU (same
    grid and affine) when the HU need the metadata CSV's rescale (CT-RATE v1)."""
    import nibabel as nib  # import cost: only this command builds images
    import numpy as np

    from sigvlp.data.volume import load_volume

    if already_hu:  # CT-RATE v2: HU as stored
        return str(volume)
    decision = load_volume(volume, metadata, already_hu=already_hu).rescale
    if decision.source != "metadata":
        return str(volume)
    img = nib.load(str(volume))
    hu = np.asarray(img.dataobj.get_unscaled(), np.float32) * decision.slope + decision.intercept
    header = img.header.copy()
    header.set_data_dtype(np.float32)
    header.set_slope_inter(1.0, 0.0)
    return nib.Nifti1Image(hu, img.affine, header)


def segment_one(segment, volume: Path, out: Path, *, metadata=None, already_hu=None, fast: bool = False,
                device: str = "gpu") -> None:
    """Run `segment` (TotalSegmentator's python entry point) on one volume and write its multilabel
    map to `out` atomically (a temporary name in the same folder, then a rename)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".partial-{os.getpid()}-{out.name}"
    try:
        segment(hu_input(volume, metadata, already_hu), tmp, ml=True, fast=fast, device=device, quiet=True,
                task="total")
        if not tmp.is_file():
            raise RuntimeError(f"TotalSegmentator wrote no file at {tmp}")
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()


def add_arguments(parser) -> None:
    parser.add_argument("data", metavar="DATA", help="dataset folder in the CT-RATE layout")
    parser.add_argument("--split", default="train", choices=("train", "valid"), help="split to segment")
    parser.add_argument("--fast", action="store_true", help="TotalSegmentator's 3 mm model (use it on a CPU)")
    parser.add_argument("--device", default="gpu", choices=("gpu", "cpu"), help="where TotalSegmentator runs")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_layout_argument(parser)


def run(args) -> int:
    from tqdm import tqdm

    try:
        ds = CTRateDataset(args.data, args.split, masks_dir=None, findings=None, require=(), layout=args.layout)
    except (ValueError, FileNotFoundError) as e:
        print(f"sigvlp masks: error: {e}", file=sys.stderr)
        return 2
    todo, done = plan(ds)
    print(f"sigvlp masks: {len(ds)} {args.split} volumes ({ds.layout}), {done} with a mask, {len(todo)} to segment "
          f"-> {ds.root / 'masks'}")
    if not todo:
        return 0
    try:
        segment = import_totalsegmentator()
    except ImportError:
        print(INSTALL_HINT, file=sys.stderr)
        return 2
    meta = {r.path: r.metadata for r in ds.records}
    failed: list[tuple[Path, str]] = []
    for volume, out in tqdm(todo, desc="masks", unit="vol", disable=args.quiet, file=sys.stderr):
        try:
            segment_one(segment, volume, out, metadata=meta.get(str(volume)), already_hu=ds.already_hu,
                        fast=args.fast, device=args.device)
        except Exception as e:  # noqa: BLE001 - one bad volume never stops the others; reported by name
            failed.append((volume, f"{type(e).__name__}: {e}"))
            tqdm.write(f"sigvlp masks: failed {volume}: {type(e).__name__}: {e}", file=sys.stderr)
    print(f"sigvlp masks: wrote {len(todo) - len(failed)} masks, {len(failed)} failed"
          + "".join(f"\n  failed {v}: {why}" for v, why in failed))
    return 1 if failed else 0

