"""``sigvlp embed INPUT... --ckpt DIR --out FILE.safetensors``: pooled and token embeddings of CT volumes.

Inputs: NIfTI files (.nii, .nii.gz), folders (searched recursively for NIfTI files and for DICOM
series: a folder holding DICOM files is one series), or a DICOM series folder. Each volume is read
as HU in canonical RAS+ (z, y, x) order (``sigvlp.data.load_volume``; DICOM through
``sigvlp.data.dicom.load_dicom_series``: dcm2niix, a series it cannot make right is skipped with
the reason), preprocessed with the checkpoint's preprocess preset (whole depth, the
slice axis is never cropped), and encoded by the model in one sequence of any length.

Output (safetensors): ``pooled`` (N, embed_dim) float32 L2-normalised; ``grid_thw`` (N, 3) int32
(T, H, W) tokens per volume; ``cu_seqlens`` (N + 1,) int32; ``depth`` (N,) int32 preprocessed slices;
``tokens`` (total_tokens, width) float32 final token features, rows cu_seqlens[i]:cu_seqlens[i+1]
for input i in t-major order (omitted with --no-tokens). Metadata: ``inputs`` (JSON list of the
embedded paths, row order), ``skipped`` (JSON list of {"input", "error"}), ``config`` (the model
config), ``checkpoint``. The INPUT paths are checked before any work: when none holds a NIfTI file
or DICOM series, a one-line error (exit status 2) and nothing else; a missing one among others is
reported before the progress bar starts and skipped. An input that cannot be read is reported and
skipped; the rest are written (exit status 1 if any was skipped, 2 if none could be embedded).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Iterable, Optional

from sigvlp.cliargs import ArgumentParser, check_writable
from sigvlp.data.dicom import is_dicom_file, load_dicom_series
from sigvlp.fileperm import apply_umask

__all__ = ["add_arguments", "run", "find_inputs", "split_inputs", "load_dicom_series", "load_any", "embed_inputs",
           "resolve_checkpoint", "MetadataLookup"]

NIFTI_SUFFIXES = (".nii", ".nii.gz")
MISSING = "no such file, or a folder without NIfTI or DICOM files"
BACKENDS = ("auto", "torch", "cpu", "triton", "cuda")


def _is_nifti(p: Path) -> bool:
    return p.name.lower().endswith(NIFTI_SUFFIXES)


def find_inputs(paths: Iterable) -> list[tuple[str, str]]:
    """Expand INPUT arguments into (kind, path) with kind "nifti" or "dicom" (a series folder).
    A missing path or a folder with nothing readable gives ("missing", path) so it is reported."""
    found: list[tuple[str, str]] = []
    for raw in paths:
        p = Path(raw)
        if p.is_file():
            found.append(("dicom", str(p.parent)) if is_dicom_file(p) and not _is_nifti(p) else ("nifti", str(p)))
        elif p.is_dir():
            before = len(found)
            for d, subdirs, files in os.walk(p):
                subdirs.sort()
                files = sorted(files)
                dpath = Path(d)
                found.extend(("nifti", str(dpath / f)) for f in files if _is_nifti(Path(f)))
                if any(is_dicom_file(dpath / f) for f in files if not _is_nifti(Path(f))):
                    found.append(("dicom", str(dpath)))
            if len(found) == before:
                found.append(("missing", str(p)))
        else:
            found.append(("missing", str(p)))
    seen, unique = set(), []
    for item in found:
        if item not in seen:
            seen.add(item)
            unique.append(item)
    return unique


def resolve_checkpoint(ckpt) -> Path:
    """A save_pretrained folder (has config.json), a training run folder, its checkpoints folder
    or a step folder: the latest step_NNNNNNNN with a config.json (sigvlp.checkpoint's rule)."""
    from sigvlp.checkpoint import resolve_checkpoint as resolve  # imports torch: kept off the CLI's import path

    return resolve(ckpt, what="--ckpt")


class MetadataLookup:
    """CT-RATE metadata rows for NIfTI inputs. csvs: metadata CSVs given with ``--metadata`` (rows
    keyed by VolumeName). A file named like a CT-RATE volume (``valid_53_a_1.nii.gz``) that lies in
    the CT-RATE layout (v2: ``ROOT[/dataset]/valid_fixed/valid_53/valid_53_a/valid_53_a_1.nii.gz``,
    v1: ``ROOT[/dataset]/valid/valid_53/...``; ``layout`` "auto", "v2" or "v1" says which count)
    also gets the row of ROOT's metadata CSV for its split, found as ``sigvlp.data.ctrate`` finds
    it (a ``*metadata*.csv`` under ROOT named after the split). ``row(path)`` is None when no CSV
    has a row for the file; ``already_hu(path)`` is True for a file in the v2 layout (its values
    are HU: the metadata rescale must not be applied again), else None. Errors: ValueError for an
    unreadable CSV, several metadata CSVs of a split, or a bad layout."""

    def __init__(self, csvs=(), auto: bool = True, layout: str = "auto"):
        from sigvlp.data.ctrate import LAYOUTS, read_csv_rows

        if layout not in LAYOUTS:
            raise ValueError(f"--layout: expected one of {', '.join(LAYOUTS)}, got {layout!r}")
        self.given: dict[str, dict] = {}
        for c in csvs or ():
            if not Path(c).is_file():
                raise FileNotFoundError(f"--metadata: no such CSV file {c}")
            self.given.update(read_csv_rows(c))
        self.auto = auto
        self.layout = layout
        self._found: dict[tuple[str, str], dict] = {}

    def _layout_root(self, path: Path) -> Optional[tuple[Path, str, str]]:
        """(dataset ROOT, split, layout) of a file lying in the CT-RATE layout, else None."""
        from sigvlp.data.ctrate import volume_relpath

        p = Path(os.path.abspath(path))
        for layout in ("v2", "v1") if self.layout == "auto" else (self.layout,):
            try:
                parts = Path(volume_relpath(path.name, layout)).parts
            except ValueError:
                return None
            if len(p.parts) <= len(parts) or tuple(p.parts[-len(parts):]) != parts:
                continue
            root = Path(*p.parts[:-len(parts)])
            if root.name == "dataset":
                root = root.parent
            return root, path.name.split("_", 1)[0], layout
        return None

    def already_hu(self, path) -> Optional[bool]:
        found = self._layout_root(Path(path))
        return True if found is not None and found[2] == "v2" else None

    def row(self, path) -> Optional[dict]:
        path = Path(path)
        name = path.name
        if name in self.given:
            return self.given[name]
        if not self.auto:
            return None
        found = self._layout_root(path)
        if found is None:
            return None
        root, split, _ = found
        key = (str(root), split)
        if key not in self._found:
            from sigvlp.data.ctrate import find_csv, read_csv_rows

            csv_path = find_csv(root, split, "metadata")
            self._found[key] = read_csv_rows(csv_path) if csv_path is not None else {}
        return self._found[key].get(name)


def load_any(kind: str, path, *, metadata: Optional[dict] = None, already_hu: Optional[bool] = None):
    """("nifti", file) or ("dicom", folder) -> Volume. metadata: the file's CT-RATE metadata row
    (NIfTI only); already_hu: as ``sigvlp.data.load_volume``."""
    if kind == "nifti":
        from sigvlp.data.volume import load_volume

        return load_volume(path, metadata, already_hu=already_hu)
    if kind == "dicom":
        return load_dicom_series(path)
    raise FileNotFoundError(f"{path}: {MISSING}")


def split_inputs(paths: Iterable) -> tuple[list[tuple[str, str]], list[dict]]:
    """find_inputs, checked before any work: ((kind, path) inputs to embed, skipped {"input",
    "error"} for each missing one). ValueError (one line, naming INPUT) when every input is missing."""
    found = find_inputs(paths)
    missing = [path for kind, path in found if kind == "missing"]
    if len(missing) == len(found):
        shown = ", ".join(missing[:3]) + (f", ... ({len(missing)} in all)" if len(missing) > 3 else "")
        raise ValueError(f"INPUT: {shown}: {MISSING}")
    skipped = [{"input": path, "error": f"FileNotFoundError: {path}: {MISSING}"} for path in missing]
    return [item for item in found if item[0] != "missing"], skipped


# ----------------------------------------------------------------------------- embedding


def embed_inputs(model, inputs: list[tuple[str, str]], *, tokens: bool = True, progress: bool = True,
                 autocast_dtype=None, metadata: Optional[MetadataLookup] = None,
                 already_hu: Optional[bool] = None) -> tuple[dict, list[str], list[dict]]:
    """Embed (kind, path) inputs one volume at a time. Returns (tensors, embedded paths, skipped) with
    tensors as described in the module docstring (on the CPU) and skipped a list of {"input", "error"}.
    metadata: a MetadataLookup (None: a default one, which finds CT-RATE metadata CSVs by layout);
    already_hu: passed to load_volume (None: decide per file; an ambiguous file is skipped with
    load_volume's message)."""
    import torch
    from tqdm import tqdm

    from sigvlp.data.preprocess import preprocess_array
    from sigvlp.model import volume_batch
    from sigvlp.ops import cu_seqlens_from_lengths

    cfg = model.config
    pre = cfg.preprocess_config()
    pooled, toks, grids, depths, names, skipped = [], [], [], [], [], []
    model.eval()
    dev = model.device
    lookup = metadata if metadata is not None else MetadataLookup()
    bar = tqdm(inputs, desc="embed", unit="vol", disable=not progress, file=sys.stderr)
    for kind, path in bar:
        bar.set_postfix_str(Path(path).name[-40:])
        try:
            row = lookup.row(path) if kind == "nifti" else None
            hu = already_hu if already_hu is not None or kind != "nifti" else lookup.already_hu(path)
            vol = load_any(kind, path, metadata=row, already_hu=hu)
            arr = preprocess_array(vol.hu, vol.spacing, pre)
        except Exception as e:  # unreadable input: report, skip, continue
            msg = f"{type(e).__name__}: {e}"
            skipped.append({"input": str(path), "error": msg})
            tqdm.write(f"sigvlp embed: skipped {path}: {msg}", file=sys.stderr)
            continue
        batch = volume_batch([arr], cfg.patch_size)
        with torch.inference_mode(), torch.autocast(dev.type, dtype=autocast_dtype or torch.bfloat16,
                                                     enabled=autocast_dtype is not None):
            p, t = model.encode_volume(batch["patches"], batch["cu_seqlens"], batch["max_seqlen"], batch["grid_thw"])
        pooled.append(p.float().cpu())
        if tokens:
            toks.append(t.float().cpu())
        grids.append(batch["grid_thw"])
        depths.append(arr.shape[0])
        names.append(str(path))
    out = {}
    if names:
        grid = torch.cat(grids).to(torch.int32)
        out = {"pooled": torch.cat(pooled).contiguous(), "grid_thw": grid.contiguous(),
               "cu_seqlens": cu_seqlens_from_lengths(grid.prod(1)),
               "depth": torch.tensor(depths, dtype=torch.int32)}
        if tokens:
            out["tokens"] = torch.cat(toks).contiguous()
    return out, names, skipped


# ----------------------------------------------------------------------------- CLI


def add_arguments(parser) -> None:
    from sigvlp.data.ctrate import add_layout_argument

    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="NIfTI files, folders of them, or DICOM series folders")
    parser.add_argument("--ckpt", required=True,
                        help="a SigVLP.save_pretrained folder, or a training run folder (its latest checkpoint)")
    parser.add_argument("--out", required=True, help="output .safetensors file (an existing one only with --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    parser.add_argument("--device", default="auto", help="'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ...")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast on a GPU (default: fp32)")
    parser.add_argument("--no-tokens", action="store_true", help="write pooled embeddings only")
    parser.add_argument("--backend", default=None, choices=BACKENDS,
                        help="attention backend (default: the checkpoint's, auto)")
    parser.add_argument("--metadata", action="append", default=None, metavar="CSV",
                        help="CT-RATE metadata CSV (VolumeName, RescaleSlope, RescaleIntercept, ...; repeatable) "
                             "(default: files in the CT-RATE layout find their dataset's CSV)")
    parser.add_argument("--already-hu", default="auto", choices=("auto", "yes", "no"),
                        help="yes: the files (after their header scaling) are HU, never apply the metadata "
                             "rescale (CT-RATE v2); no: apply the metadata rescale (v1); auto: yes for files in the v2 "
                             "layout (<split>_fixed/...), else decide per file")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_layout_argument(parser)


def _check_args(args):
    """Validate everything that needs no model: ValueError / FileNotFoundError naming the flag.
    Returns (device, out_path, checkpoint folder, metadata lookup, already_hu)."""
    import torch

    backend = getattr(args, "backend", None)
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"--backend: expected one of {', '.join(BACKENDS)}, got {backend!r}")
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"--device: {device!r} is not a device ('auto', 'cpu', 'cuda', 'cuda:1', ...)") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device: {device!r} requested but CUDA is not available (use --device cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device: {device!r} but only {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise ValueError(f"--device: expected 'auto', 'cpu' or 'cuda[:N]', got {device!r}")
    out_path = Path(args.out)
    if not out_path.name.endswith(".safetensors"):
        raise ValueError(f"--out: expected a .safetensors file name, got {args.out!r}")
    if out_path.is_dir():
        raise ValueError(f"--out: {args.out} is an existing folder (expected a .safetensors file name)")
    if out_path.exists() and not getattr(args, "overwrite", False):
        raise ValueError(f"--out: {args.out} exists; pass --overwrite to replace it, or name a new file")
    try:
        check_writable(out_path, kind="file")
    except ValueError as e:
        raise ValueError(f"--out: {e}") from None
    p = Path(args.ckpt)
    if not p.exists():
        raise FileNotFoundError(f"--ckpt: no such checkpoint folder {p}")
    if not p.is_dir():
        raise ValueError(f"--ckpt: {p} is not a folder (expected a save_pretrained folder or a training run)")
    ckpt = resolve_checkpoint(p)
    if not (ckpt / "model.safetensors").is_file():
        raise FileNotFoundError(f"--ckpt: {ckpt} has config.json but no model.safetensors")
    already_hu = {"auto": None, "yes": True, "no": False}[getattr(args, "already_hu", "auto") or "auto"]
    lookup = MetadataLookup(getattr(args, "metadata", None) or (), layout=getattr(args, "layout", "auto") or "auto")
    return device, out_path, ckpt, lookup, already_hu


def run(args) -> int:
    import torch
    from safetensors.torch import save_file

    from sigvlp.model import SigVLP

    try:
        device, out_path, ckpt, lookup, already_hu = _check_args(args)
        inputs, missing = split_inputs(args.inputs)  # before the model and the progress bar
        overrides = {"attn_backend": args.backend} if getattr(args, "backend", None) else {}
        model = SigVLP.from_pretrained(ckpt, map_location=device, **overrides)
    except (ValueError, FileNotFoundError) as e:
        print(f"sigvlp embed: error: {e}", file=sys.stderr)
        return 2
    for item in missing:
        print(f"sigvlp embed: skipped {item['input']}: {MISSING}", file=sys.stderr)
    tensors, names, skipped = embed_inputs(model, inputs, tokens=not args.no_tokens, progress=not args.quiet,
                                           autocast_dtype=torch.bfloat16 if args.bf16 else None,
                                           metadata=lookup, already_hu=already_hu)
    skipped = missing + skipped
    if not names:
        print(f"sigvlp embed: nothing embedded ({len(skipped)} input(s) skipped); {out_path} not written",
              file=sys.stderr)
        return 2
    meta = {"inputs": json.dumps(names), "skipped": json.dumps(skipped), "checkpoint": str(ckpt),
            "config": json.dumps(model.config.to_dict())}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_path.parent, prefix=f".{out_path.name}-", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        apply_umask(tmp)  # safetensors writes 0600
        os.replace(tmp, out_path)
    except BaseException:
        os.unlink(tmp)  # the temporary file this call created
        raise
    print(f"sigvlp embed: {len(names)} volume(s) -> {out_path}"
          + (f"; {len(skipped)} skipped: " + ", ".join(s["input"] for s in skipped) if skipped else ""))
    return 1 if skipped else 0


def main(argv: Optional[list] = None) -> int:
    parser = ArgumentParser(prog="sigvlp embed", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
