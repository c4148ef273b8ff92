"""CT-RATE reader: folder layout, the three CSVs, optional organ masks and findings bank.

Layouts (``layout="auto" | "v2" | "v1"``; the synthetic phantoms are written in v1's)::

    v2 (today's download, HU)      ROOT/dataset/train_fixed/train_<pid>/train_<pid>_<scan>/train_<pid>_<scan>_<recon>.nii.gz
                                   ROOT/dataset/valid_fixed/valid_<pid>/...
    v1 (before, raw + CSV rescale) ROOT/dataset/train/train_<pid>/...,  ROOT/dataset/valid/...
    both                           ROOT/dataset/radiology_text_reports/{train,validation}_reports.csv
                                   ROOT/dataset/multi_abnormality_labels/{train,valid}_predicted_labels.csv
                                   ROOT/dataset/metadata/{train,validation}_metadata.csv
    TotalSegmentator masks         ROOT/dataset/ts_seg/ts_total/{train_fixed,valid_fixed}/<same path as the volume>

Volumes are found only under the split's own folders (``<split>_fixed`` for v2, ``<split>`` for
v1, each directly under ROOT or under ROOT/dataset; ROOT may also be the ``dataset`` folder),
never by a search of ROOT that could reach ``ts_seg/``, a masks or a findings folder.
``layout="auto"`` takes v2 when its folders exist (saying once in the log when v1's exist too),
else v1. v2 files are already HU (CT-CLIP's double-rescale bug): the metadata rescale is never
applied to them (``already_hu`` is forced to True; ``already_hu=False`` with v2 is a ValueError).
A VolumeName found twice among the split's folders is a ValueError naming both paths.

CSVs are found anywhere under ROOT by name (``*reports*.csv``, ``*labels*.csv``,
``*metadata*.csv`` containing the split's name: "train", or "valid"/"validation"), or given
explicitly. VolumeName in every CSV includes ".nii.gz". Organ masks (optional; any format that
``sigvlp.data.masks.load_total_labels`` reads: a multilabel file, or a folder of TotalSegmentator
binary files named like the volume without ".nii.gz") are looked up under each masks root by the
volume's path relative to its split folder's parent, by the canonical ``<split>/<split>_<pid>/
<split>_<pid>_<scan>/<VolumeName>`` path, with ``<split>_fixed`` accepted wherever ``<split>`` is,
or flat by VolumeName. By default (``masks_dir="auto"``) the masks roots are those of ROOT/masks,
ROOT/dataset/masks (or ``masks`` beside a ``dataset`` ROOT; where ``sigvlp masks`` writes) and
ROOT[/dataset]/ts_seg/ts_total (CT-RATE's own) that hold the split, searched in that order;
``None`` means no masks. A masks_dir one level too deep (``masks/train``, holding ``train_<pid>``
folders) is refused with the parent to pass instead, and a masks_dir where no volume has a mask
is an error, not a silent skip of every volume. The findings bank (``findings="auto"``:
``*findings*.jsonl|json`` named for the split under ROOT) is described in sigvlp.data.chunks.

``already_hu`` (None: decide per volume, see sigvlp.data.volume) is passed to every load: True
for datasets whose files are HU (CT-RATE v2), False to apply the metadata rescale (v1).

From the dataset to batches: ``make_loader(ds, chunk_config, loader_config, cache=...)`` or
``ds.cached(cache)`` -> [(record, CachedVolume)] for the usable volumes (built as needed).

Scanning checks what is cheap (CSV rows, mask presence, the NIfTI header: readable, 3-D,
slices > 0); a bad volume is skipped, counted and reported (``on_error="skip"``, the default)
or raises ValueError naming the file (``on_error="raise"``).

Commands that read a dataset take ``--layout`` through ``add_layout_argument(parser)``.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from tqdm import tqdm

from sigvlp.data.chunks import load_findings_bank
from sigvlp.data.csvfiles import read_csv_rows  # noqa: F401  (CSV reading lives there; importers use this name)
from sigvlp.data.preprocess import as_cache
from sigvlp.data.volume import load_volume

REPORT_COLUMNS = ("VolumeName", "ClinicalInformation_EN", "Technique_EN", "Findings_EN", "Impressions_EN")
CTRATE_LABELS = (
    "Medical material", "Arterial wall calcification", "Cardiomegaly", "Pericardial effusion",
    "Coronary artery wall calcification", "Hiatal hernia", "Lymphadenopathy", "Emphysema",
    "Atelectasis", "Lung nodule", "Lung opacity", "Pulmonary fibrotic sequela", "Pleural effusion",
    "Mosaic attenuation pattern", "Peribronchial thickening", "Consolidation", "Bronchiectasis",
    "Interlobular septal thickening",
)
LABEL_COLUMNS = ("VolumeName",) + CTRATE_LABELS
# The columns we read (and the synthetic metadata CSV writes); real CT-RATE has more.
METADATA_COLUMNS = (
    "VolumeName", "Manufacturer", "SeriesDescription", "ManufacturerModelName", "PatientSex",
    "PatientAge", "ReconstructionDiameter", "Rows", "Columns", "RescaleIntercept", "RescaleSlope",
    "XYSpacing", "ZSpacing", "NumberofSlices",
)
log = logging.getLogger("sigvlp.data")
_NAME_RE = re.compile(r"^(train|valid)_(\d+)_([a-z]+)_(\d+)\.nii(\.gz)?$")
_SPLIT_ALIASES = {"train": ("train",), "valid": ("valid", "validation")}
#: Accepted values of ``layout``.
LAYOUTS = ("auto", "v2", "v1")
#: The split folder of each layout.
SPLIT_DIRS = {"v2": "{split}_fixed", "v1": "{split}"}
_BOTH_SAID: set = set()  # (root, split) pairs whose "v1 and v2 both present" line was logged


def volume_relpath(name: str, layout: str = "v1") -> str:
    """VolumeName -> its path under the dataset folder: valid_53_a_1.nii.gz ->
    valid/valid_53/valid_53_a/valid_53_a_1.nii.gz (v1), valid_fixed/valid_53/... (layout="v2")."""
    if layout not in SPLIT_DIRS:
        raise ValueError(f"layout must be 'v1' or 'v2', got {layout!r}")
    m = _NAME_RE.match(name)
    if not m:
        raise ValueError(f"VolumeName {name!r} does not follow <split>_<pid>_<scan>_<recon>.nii.gz")
    split, pid, scan = m.group(1), m.group(2), m.group(3)
    return f"{SPLIT_DIRS[layout].format(split=split)}/{split}_{pid}/{split}_{pid}_{scan}/{name}"


def split_folders(root, split: str, layout: str = "auto") -> tuple[str, list[Path]]:
    """(the layout used, the split's volume folders) of a dataset ROOT: ``<split>_fixed`` (v2) or
    ``<split>`` (v1) under ROOT/dataset and ROOT. "auto": v2 when any v2 folder exists (logged
    once when v1's exist too), else v1. Errors: ValueError for a bad layout or split,
    FileNotFoundError when the layout has no folder (naming the folders looked for)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if split not in _SPLIT_ALIASES:
        raise ValueError(f"split must be 'train' or 'valid', got {split!r}")
    root, asked = Path(root), layout
    found = {lay: [d for base in (root / "dataset", root) if (d := base / pat.format(split=split)).is_dir()]
             for lay, pat in SPLIT_DIRS.items()}
    if layout == "auto":
        layout = "v2" if found["v2"] or not found["v1"] else "v1"
        if found["v2"] and found["v1"] and (str(root.resolve()), split) not in _BOTH_SAID:
            _BOTH_SAID.add((str(root.resolve()), split))
            log.warning("%s: both CT-RATE v2 (%s) and v1 (%s) %s volumes are present; using v2 (layout='v1' or "
                        "--layout v1 reads the others)", root, found["v2"][0], found["v1"][0], split)
    if not found[layout]:
        looked = [str(base / SPLIT_DIRS[lay].format(split=split)) for lay in (("v2", "v1") if asked == "auto"
                  else (layout,)) for base in (root / "dataset", root)]
        raise FileNotFoundError(f"{root}: no {'' if asked == 'auto' else asked + ' '}{split!r} volume folder (looked for {', '.join(looked)}; "
                                f"CT-RATE v2 puts volumes in dataset/{split}_fixed/, v1 in dataset/{split}/)")
    return layout, found[layout]


def add_layout_argument(parser) -> None:
    """``--layout auto|v2|v1`` for a command that reads a dataset (train's comes from its config)."""
    parser.add_argument("--layout", default="auto", choices=LAYOUTS,
                        help="CT-RATE layout: v2 (dataset/<split>_fixed/..., HU files), v1 (dataset/<split>/..., "
                             "metadata rescale), auto (v2 when present, else v1)")


def find_csv(root: Path, split: str, kind: str) -> Optional[Path]:
    """The split's `kind` CSV ("reports", "labels", "metadata") under root, or None (train, eval and
    embed find CT-RATE's CSVs through this one rule)."""
    found = []
    for p in sorted(root.rglob(f"*{kind}*.csv")):
        stem = p.name.lower()
        if any(re.match(rf"^{alias}[_\-]", stem) for alias in _SPLIT_ALIASES[split]):
            found.append(p)
    if len(found) > 1:
        raise ValueError(f"{root}: several {kind} CSVs for split {split!r}: {[str(p) for p in found]}; pass one")
    return found[0] if found else None


def _find_bank(root: Path, split: str) -> Optional[Path]:
    found = [p for pat in ("*findings*.jsonl", "*findings*.json") for p in sorted(root.rglob(pat))
             if any(re.match(rf"^{alias}[_\-]", p.name.lower()) for alias in _SPLIT_ALIASES[split])]
    if len(found) > 1:
        raise ValueError(f"{root}: several findings banks for split {split!r}: {[str(p) for p in found]}; pass one")
    return found[0] if found else None


@dataclass
class CTRateRecord:
    name: str  # VolumeName, with .nii.gz
    path: str
    report: Optional[dict] = None
    labels: Optional[dict[str, int]] = None
    metadata: Optional[dict] = None
    mask_path: Optional[str] = None
    findings: Optional[dict] = None  # organ -> sentences, and "general"


@dataclass
class ScanReport:
    seen: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)

    def summary(self) -> str:
        lines = [f"{self.seen - len(self.skipped)} of {self.seen} volumes usable, {len(self.skipped)} skipped"]
        lines += [f"  skipped {p}: {why}" for p, why in self.skipped]
        return "\n".join(lines)


class CTRateDataset:
    """The volumes of one split with their report, labels, metadata row, mask and findings.

    require: which CSVs a volume must have a row in ("reports", "labels", "metadata"); a
    volume missing a required row is bad input. check_headers: open each NIfTI header.
    """

    def __init__(self, root, split: str = "train", *, reports_csv=None, labels_csv=None, metadata_csv=None,
                 masks_dir="auto", findings="auto", require=("reports", "metadata"), check_headers: bool = True,
                 on_error: str = "skip", already_hu: Optional[bool] = None, layout: str = "auto"):
        if split not in _SPLIT_ALIASES:
            raise ValueError(f"split must be 'train' or 'valid', got {split!r}")
        if on_error not in ("skip", "raise"):
            raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
        self.root = Path(root)
        if self.root.is_file():
            raise FileNotFoundError(f"{self.root} is a file, expected a dataset folder")  # CLIs catch this
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root}: no such dataset folder")
        self.split = split
        self.on_error = on_error
        csvs = {}
        for kind, given in (("reports", reports_csv), ("labels", labels_csv), ("metadata", metadata_csv)):
            p = Path(given) if given is not None else find_csv(self.root, split, kind)
            if p is not None and not p.exists():
                raise FileNotFoundError(f"{p}: no such {kind} CSV")
            csvs[kind] = read_csv_rows(p) if p is not None else None
            if kind in require and csvs[kind] is None:
                raise ValueError(f"{self.root}: no {kind} CSV found for split {split!r}")
        if already_hu not in (None, True, False):
            raise ValueError(f"already_hu must be None, True or False, got {already_hu!r}")
        self.layout, self.volume_dirs = split_folders(self.root, split, layout)
        if self.layout == "v2":
            if already_hu is False:
                raise ValueError("already_hu=False applies the metadata rescale, but CT-RATE v2 files are already HU "
                                 "(it would rescale twice); use layout='v1' for v1 files")
            already_hu = True
        self.already_hu = already_hu
        self.masks_dirs = self._mask_roots(masks_dir)
        self.masks_dir = self.masks_dirs[0] if self.masks_dirs else None
        if isinstance(findings, str) and findings == "auto":
            findings = _find_bank(self.root, split)
        if findings is not None and not isinstance(findings, dict):
            findings = load_findings_bank(findings)
        self.findings_bank = findings
        self.scan = ScanReport()
        self.cache_report = ScanReport()
        self.records = self._scan(csvs, tuple(require), check_headers)
        no_mask = [p for p, why in self.scan.skipped if why.startswith("no organ mask")]
        if self.masks_dirs and no_mask and not self.records:
            name = Path(no_mask[0]).name
            example = self.masks_dir / (volume_relpath(name, self.layout) if _NAME_RE.match(name) else name)
            raise ValueError(f"{self._masks_text()}: no organ mask found for any of the {len(no_mask)} {split} "
                             f"volumes; expected e.g. {example} (the masks root holds <split>/... or "
                             f"<split>_fixed/... as the dataset does), or pass masks_dir=None to use no masks")

    def _masks_text(self) -> str:
        return str(self.masks_dir) if len(self.masks_dirs) == 1 else " and ".join(map(str, self.masks_dirs))

    def _split_dir_names(self) -> tuple[str, ...]:
        return tuple(pat.format(split=self.split) for pat in SPLIT_DIRS.values())

    def _holds_split(self, folder: Path) -> bool:
        return any((folder / d).is_dir() for d in self._split_dir_names()) or any(
            folder.glob(f"{self.split}_*.nii*"))

    def auto_mask_roots(self) -> list[Path]:
        """Where masks_dir="auto" looks, in search order: ROOT/masks (where `sigvlp masks` writes),
        ROOT/dataset/masks (or masks beside a dataset ROOT), then CT-RATE's ts_seg/ts_total."""
        r = self.root
        cands = [r / "masks", r / "dataset" / "masks"]
        if r.name == "dataset":
            cands.append(r.parent / "masks")
        return cands + [r / "dataset" / "ts_seg" / "ts_total", r / "ts_seg" / "ts_total"]

    def _mask_roots(self, masks_dir) -> list[Path]:
        if masks_dir is None:
            return []
        if isinstance(masks_dir, str) and masks_dir == "auto":
            # A masks root counts when it holds this split (a folder, or flat <split>_* files).
            return [c for c in self.auto_mask_roots() if c.is_dir() and self._holds_split(c)]
        masks_dir = Path(masks_dir)
        if not masks_dir.is_dir():
            raise FileNotFoundError(f"{masks_dir}: no such masks folder")
        names = self._split_dir_names()
        split_level = masks_dir.name in _SPLIT_ALIASES[self.split] + names[:1] or any(
            p.is_dir() and re.match(rf"^{self.split}_\d+$", p.name) for p in masks_dir.iterdir())
        if split_level and not any((masks_dir / d).is_dir() for d in names):
            raise ValueError(f"masks_dir {masks_dir} is the {self.split!r} level of the masks tree (it holds "
                             f"{self.split}_<pid> folders); pass the masks root {masks_dir.parent} instead")
        return [masks_dir]

    def _volume_files(self) -> list[Path]:
        """The split's volumes, from its own folders only; a VolumeName found twice is an error."""
        fence = [Path(os.path.abspath(p)) for p in self.masks_dirs + self.auto_mask_roots()
                 + [self.root / "findings", self.root / "dataset" / "ts_seg", self.root / "ts_seg"]]
        found: dict[str, Path] = {}
        for folder in self.volume_dirs:
            for p in sorted(folder.rglob(f"{self.split}_*.nii*")):
                if not p.name.endswith((".nii", ".nii.gz")) or not p.is_file():
                    continue
                if any(Path(os.path.abspath(p)).is_relative_to(f) for f in fence):
                    continue
                if p.name in found:
                    raise ValueError(f"VolumeName {p.name} found twice: {found[p.name]} and {p}; keep one "
                                     f"(or pick a layout: layout='v1' / 'v2')")
                found[p.name] = p
        return sorted(found.values())

    def _bad(self, path, reason):
        if self.on_error == "raise":
            raise ValueError(f"{path}: {reason}")
        self.scan.skipped.append((str(path), reason))

    def find_mask(self, path, name: Optional[str] = None, roots=None) -> Optional[Path]:
        """The first existing mask (file, or binary-mask folder named like the volume without
        .nii[.gz]) of the volume at `path`, over `roots` (default: this dataset's masks roots) in
        order, as the module docstring describes; None when there is none."""
        path = Path(path)
        name = name or path.name
        roots = self.masks_dirs if roots is None else [Path(r) for r in roots]
        if not roots:
            return None
        rels = []
        for folder in self.volume_dirs:
            if path.is_relative_to(folder):
                rels.append(path.relative_to(folder.parent))
        if _NAME_RE.match(name):
            rels += [Path(volume_relpath(name, lay)) for lay in SPLIT_DIRS]
        rels += [Path(d) / name for d in self._split_dir_names()] + [Path(name)]
        stem = re.sub(r"\.nii(\.gz)?$", "", name)
        for root in roots:
            for rel in rels:
                for cand in (root / rel, root / rel.parent / stem):
                    if cand.exists():
                        return cand
        return None

    def _scan(self, csvs, require, check_headers) -> list[CTRateRecord]:
        import nibabel as nib  # import cost: only a scan opens NIfTI headers

        records = []
        for path in self._volume_files():
            self.scan.seen += 1
            name = path.name
            missing = [k for k in require if csvs.get(k) is not None and name not in csvs[k]]
            if missing:
                self._bad(path, f"no row for {name} in the {' and '.join(missing)} CSV")
                continue
            if check_headers:
                try:
                    shape = nib.load(str(path)).shape
                except Exception as e:
                    self._bad(path, f"unreadable NIfTI header ({type(e).__name__}: {e})")
                    continue
                if len(shape) < 3 or any(s != 1 for s in shape[3:]):
                    self._bad(path, f"expected a 3-D image, got shape {shape}")
                    continue
                if any(s == 0 for s in shape[:3]):
                    self._bad(path, f"empty image, shape {shape}")
                    continue
            mask = self.find_mask(path, name)
            if self.masks_dir is not None and mask is None:
                self._bad(path, f"no organ mask for {name} under {self._masks_text()}")
                continue
            labels = None
            if csvs.get("labels") is not None and name in csvs["labels"]:
                row = csvs["labels"][name]
                try:
                    labels = {k: int(float(row[k])) for k in CTRATE_LABELS if k in row}
                except ValueError as e:
                    self._bad(path, f"non-numeric label in the labels CSV ({e})")
                    continue
            findings = None
            if self.findings_bank is not None:
                findings = self.findings_bank.get(name)
                if findings is None:
                    self._bad(path, f"no entry for {name} in the findings bank")
                    continue
            records.append(CTRateRecord(
                name=name, path=str(path),
                report=(csvs["reports"] or {}).get(name) if csvs.get("reports") else None,
                labels=labels,
                metadata=(csvs["metadata"] or {}).get(name) if csvs.get("metadata") else None,
                mask_path=str(mask) if mask is not None else None, findings=findings))
        return records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> CTRateRecord:
        return self.records[i]

    def load(self, i: int):
        """The i-th volume as a sigvlp.data.Volume (HU, canonical orientation)."""
        rec = self.records[i]
        return load_volume(rec.path, rec.metadata, already_hu=self.already_hu)

    def cached(self, cache=None, *, workers: int = 0, progress: bool = False) -> list:
        """[(CTRateRecord, CachedVolume)] for the volumes that preprocess; built as needed.
        cache: a PreprocessCache, a PreprocessConfig or preset name, or None (the "sigvlp" preset
        in the default cache folder, see sigvlp.data.preprocess.default_cache_root). Volumes that fail
        (decode errors, implausible HU, MemoryError, ...) are skipped, counted in
        self.cache_report and logged; on_error="raise" raises instead."""
        entries, self.cache_report = build_cache(self, as_cache(cache, self.root), workers=workers,
                                                 progress=progress)
        if self.cache_report.skipped:
            log.warning("%s", self.cache_report.summary())
        return entries


def build_cache(dataset: CTRateDataset, cache, *, on_error: Optional[str] = None, workers: int = 0,
                progress: bool = False):
    """Preprocess every record into `cache` (a PreprocessCache). Returns (entries, ScanReport):
    entries[i] is (record, CachedVolume). A volume that fails (truncated gzip, NaN voxels,
    ambiguous or implausible HU, mask mismatch, MemoryError, any other exception, or a worker
    process killed, e.g. by the out-of-memory killer) is skipped, counted and reported, or raises
    ValueError when on_error="raise"; one volume never aborts the others."""
    on_error = on_error or dataset.on_error
    report = ScanReport(seen=len(dataset.records))
    jobs = [(cache, r.path, r.mask_path, r.metadata, r.name, str(dataset.root), dataset.already_hu)
            for r in dataset.records]
    # progress: a tqdm bar over the volumes (volumes/s, ETA): first-time preprocessing takes minutes
    bar = tqdm(total=len(jobs), desc=f"preprocess {dataset.split}", unit="vol", disable=not progress or not jobs,
               dynamic_ncols=True)
    with bar:
        if workers and workers > 1 and len(jobs) > 1:
            results = _run_pool(jobs, workers, on_result=lambda i, r: bar.update(1))
        else:
            results = []
            for job in jobs:
                results.append(_cache_one(job))
                bar.update(1)
    entries = []
    for rec, (ok, value) in zip(dataset.records, results):
        if ok:
            entries.append((rec, value))
            continue
        if on_error == "raise":
            raise ValueError(value)
        report.skipped.append((rec.path, value))
        if progress:
            print(f"skipped {rec.path}: {value}")
    return entries, report


def _tracked(args):
    """Run fn(job) after leaving a marker that job i started (read back when a pool breaks)."""
    fn, i, job, marks = args
    open(os.path.join(marks, str(i)), "w").close()
    return fn(job)


def _run_pool(jobs, workers, fn=None, on_result=None):
    """fn (default _cache_one: job -> (ok, value)) over jobs in `workers` spawned processes. A job
    whose process dies (e.g. the out-of-memory killer) takes the pool down with it; the jobs that
    had started and not finished are then the suspects: each is rerun alone in its own process
    (the one that dies again is reported as failed, (False, message)), the rest go to a fresh pool.
    Each broken pool costs at most `workers` single-process reruns. on_result(i, result) is called
    as each job finishes (in completion order)."""
    import multiprocessing as mp
    import tempfile
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    fn = fn or _cache_one
    results = [None] * len(jobs)
    ctx = mp.get_context("spawn")

    def alone(i):
        try:
            with ProcessPoolExecutor(1, mp_context=ctx) as ex:
                results[i] = ex.submit(fn, jobs[i]).result()
        except BrokenProcessPool:
            results[i] = (False, f"{jobs[i][1]}: the worker process died (killed by the system, out of memory?)")
        if on_result:
            on_result(i, results[i])

    pending = list(range(len(jobs)))
    while pending:
        with tempfile.TemporaryDirectory() as marks:
            with ProcessPoolExecutor(workers, mp_context=ctx) as ex:
                futures = {ex.submit(_tracked, (fn, i, jobs[i], marks)): i for i in pending}
                for f in as_completed(futures):
                    try:
                        results[futures[f]] = f.result()
                    except BrokenProcessPool:
                        continue
                    if on_result:
                        on_result(futures[f], results[futures[f]])
            started = {int(n) for n in os.listdir(marks)}
        suspects = [i for i in pending if results[i] is None and i in started]
        for i in suspects:
            alone(i)
        left = [i for i in pending if results[i] is None]
        if left and not suspects:  # broken before any job started: no progress to be had in a pool
            for i in left:
                alone(i)
            left = []
        pending = left
    return results


def _cache_one(job):
    cache, path, mask_path, metadata, name, root, already_hu = job
    try:
        return True, cache.get(path, mask_path, metadata, name=name, root=root, already_hu=already_hu)
    except MemoryError:
        return False, f"{path}: MemoryError while preprocessing (volume too large for this worker's memory)"
    except Exception as e:  # noqa: BLE001 - one bad volume never aborts the others; reported by name
        msg = str(e) if isinstance(e, (ValueError, OSError, EOFError)) else f"{type(e).__name__}: {e}"
        return False, msg if os.fspath(path) in msg else f"{path}: {msg}"
