"""The evaluation suite: `evaluate(ckpt, data, EvalConfig(...)) -> report dict`.

Steps (each a report section, see sigvlp.eval.report): zero-shot abnormality classification of
whole volumes (CT-CLIP's protocol, bootstrap CIs), organ presence per chunk (zero-shot and a
linear probe fitted on the train split's chunks), retrieval (volume <-> report, chunk ->
organ text), a segmentation probe on the encoder's token features (Dice per organ on voxels),
the variable-depth sweep (central crops of 2^k slices, with the encoder FLOPs of each point)
and a 2-D embedding map.

Embeddings are computed once per (checkpoint, split, data, chunk plan) and cached under
``<cache>/eval/`` (safetensors); a changed checkpoint, changed data (the preprocessing cache's
content-keyed entry names) or a changed plan gives another key, never a stale hit.
Works on CPU or GPU ("auto": CUDA when available), with tqdm progress bars when installed.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from sigvlp import checkpoint as ckpt_io
from sigvlp.data.chunks import chunk_text, organs_in_chunk
from sigvlp.data.organs import ORGANS
from sigvlp.eval.flops import encoder_flops
from sigvlp.eval.metrics import InsufficientData, count_of, select_labels, too_few
from sigvlp.eval.plots import embedding_map, unplottable, write_plots
from sigvlp.eval.report import SCHEMA, validate_report, write_report
from sigvlp.eval.report import SECTIONS as SECTION_NAMES
from sigvlp.eval.sections import (depth_sweep_point, dice_counts, fit_linear_probe, fit_segmentation_probe,
                                  organ_section, pair_probability, predict_voxels, retrieval_section,
                                  segmentation_section, zero_shot_section)
from sigvlp.prompts import ABNORMALITY_PROMPTS, ORGAN_PROMPTS
from sigvlp.fileperm import apply_umask

EMB_FORMAT = 1  # bump when what the embedding cache stores changes meaning


@dataclass
class EvalConfig:
    """What `evaluate` runs. Every field has a CLI flag in `sigvlp eval`.

    labels: the abnormality columns to score (None: the 18 CT-RATE labels, all of which the
    labels CSV must have); a label is scored when it has >= min_positives positive and
    >= min_negatives negative volumes (the subset is stated in the report). prompts /
    organ_prompts: (positive, negative) templates with {label} / {organ}. n_bootstrap resamples
    (seeded by seed). chunks_per_volume: chunks drawn per volume (the model's chunk preset) for
    organ classification and chunk retrieval. depths: slices for the depth sweep (None: powers
    of two from the chunk preset's min_slices up to the longest volume). seg_volumes: volumes
    per split whose token features feed the segmentation probe. max_volumes: cap per split
    (None: all). sections: which of the report's sections to run (keys of SECTIONS; they run in
    its order). train_split / train_data: the split (and dataset root, default the evaluated
    one) the probes are fitted on.
    """

    split: str = "valid"
    train_split: Optional[str] = "train"
    train_data: Optional[str] = None
    labels: Optional[tuple[str, ...]] = None
    prompts: tuple[str, str] = ABNORMALITY_PROMPTS
    organ_prompts: tuple[str, str] = ORGAN_PROMPTS
    min_positives: int = 5
    min_negatives: int = 5
    n_bootstrap: int = 1000
    seed: int = 0
    chunks_per_volume: int = 4
    depths: Optional[tuple[int, ...]] = None
    seg_volumes: int = 32
    seg_max_tokens: int = 20000
    max_volumes: Optional[int] = None
    max_train_volumes: Optional[int] = None
    token_budget: int = 16384
    sections: tuple[str, ...] = SECTION_NAMES
    device: str = "auto"
    precision: str = "fp32"
    cache: Optional[str] = None
    masks: Optional[str] = None
    layout: str = "auto"  # CT-RATE layout: "v2", "v1" or "auto" (sigvlp.data.ctrate)
    expect_preset: Optional[str] = None
    progress: bool = True
    plots: bool = True

    def __post_init__(self):
        if self.split not in ("train", "valid"):
            raise ValueError(f"split: expected 'train' or 'valid', got {self.split!r}")
        if self.train_split is not None and self.train_split not in ("train", "valid"):
            raise ValueError(f"train_split: expected 'train', 'valid' or None, got {self.train_split!r}")
        if self.layout not in ("auto", "v2", "v1"):
            raise ValueError(f"layout: expected 'auto', 'v2' or 'v1', got {self.layout!r}")
        for name in ("prompts", "organ_prompts"):
            p = tuple(getattr(self, name))
            key = "{label}" if name == "prompts" else "{organ}"
            if len(p) != 2 or not all(isinstance(t, str) and key in t for t in p):
                raise ValueError(f"{name}: expected two templates (positive, negative) containing {key}, got {p!r}")
            setattr(self, name, p)
        if self.labels is not None:
            if isinstance(self.labels, str) or not all(isinstance(x, str) and x for x in self.labels):
                raise ValueError(f"labels: expected a list of label names, got {self.labels!r}")
            self.labels = tuple(self.labels)
        bad = sorted(set(self.sections) - set(SECTION_NAMES))
        if bad:
            raise ValueError(f"sections: unknown {bad}; known: {list(SECTION_NAMES)}")
        self.sections = tuple(self.sections)
        for name in ("min_positives", "min_negatives", "chunks_per_volume", "token_budget", "n_bootstrap"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision: expected 'fp32' or 'bf16', got {self.precision!r}")
        if self.depths is not None:
            self.depths = tuple(int(d) for d in self.depths)
            if not self.depths or min(self.depths) < 1:
                raise ValueError(f"depths: expected positive slice counts, got {self.depths}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- helpers
def _progress(it, enabled: bool, **kw):
    if not enabled:
        return it
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return it
    return tqdm(it, **kw)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {name!r} requested but CUDA is not available")
    return dev


def resolve_checkpoint(path) -> Path:
    """A save_pretrained folder (config.json + model.safetensors), a training run folder, its
    checkpoints folder or one of its step folders (the latest complete step_* is used):
    sigvlp.checkpoint.resolve_checkpoint."""
    return ckpt_io.resolve_checkpoint(path, what="ckpt")


def load_checkpoint(ckpt, *, expect_preset: Optional[str] = None, map_location="cpu"):
    """(model, folder, sha256) of a checkpoint folder. expect_preset: the SigVLPConfig preset the
    checkpoint must have (ValueError naming the differing fields otherwise)."""
    from sigvlp.model import SigVLPConfig

    want = SigVLPConfig.preset(expect_preset) if expect_preset else None
    model, folder = ckpt_io.load_model(ckpt, what="ckpt", config=want, map_location=map_location)
    return model, folder, ckpt_io.checkpoint_hash(folder)


# ----------------------------------------------------------------------------- data
@dataclass
class Split:
    name: str
    root: Path
    entries: list  # [(CTRateRecord, CachedVolume)]
    labels: Optional[np.ndarray]  # (N, L) 0/1 or None
    label_names: list
    labels_csv: Optional[str]
    skipped: list = field(default_factory=list)


def _labels_csv(root: Path, split: str) -> Optional[Path]:
    from sigvlp.data.ctrate import find_csv

    return find_csv(root, split, "labels")


def read_labels(csv_path: Path, names: Optional[Sequence[str]], volumes: Sequence[str]) -> tuple[np.ndarray, list]:
    """(N, L) 0/1 labels of `volumes` from a labels CSV; names None: the 18 CT-RATE labels.
    ValueError for a missing column (naming it and the CSV), a volume without a row, a
    non-0/1 value, or two rows for a volume that disagree (``sigvlp.data.csvfiles``)."""
    from sigvlp.data.csvfiles import read_csv_table
    from sigvlp.data.ctrate import CTRATE_LABELS

    try:  # BOM, CRLF, repeated rows (identical: dropped; disagreeing: an error), non-UTF-8 text
        columns, rows = read_csv_table(csv_path)
    except ValueError as e:
        raise ValueError(f"labels CSV {e}") from None
    wanted = list(names) if names is not None else list(CTRATE_LABELS)
    missing = [n for n in wanted if n not in columns]
    if missing:
        have = [c for c in columns if c != "VolumeName"]
        if names is None:
            raise ValueError(f"labels CSV {csv_path}: missing column(s) {missing} of the CT-RATE labels; "
                             f"choose the labels to score with --labels (available: {have})")
        raise ValueError(f"labels: {missing} absent from the labels CSV {csv_path} (available: {have})")
    out = np.zeros((len(volumes), len(wanted)), dtype=np.int64)
    for i, v in enumerate(volumes):
        row = rows.get(v)
        if row is None:
            raise ValueError(f"labels CSV {csv_path}: no row for {v}")
        for j, n in enumerate(wanted):
            try:
                val = float(row[n])
            except (TypeError, ValueError):
                raise ValueError(f"labels CSV {csv_path}: {v} column {n!r} holds {row[n]!r}, expected 0 or 1") from None
            if val not in (0.0, 1.0):
                raise ValueError(f"labels CSV {csv_path}: {v} column {n!r} holds {row[n]!r}, expected 0 or 1")
            out[i, j] = int(val)
    return out, wanted


def open_split(root, split: str, model_config, config: EvalConfig, *, need_labels: bool, role: str = "eval") -> Split:
    """The split's cached volumes (preprocessed with the model's preset) and labels."""
    from sigvlp.data import CTRateDataset, PreprocessCache

    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data: no such dataset folder {root} (expected the CT-RATE layout; "
                                f"`sigvlp synth --out DIR` writes one)")
    masks = Path(config.masks) if config.masks else "auto"  # auto: DATA/masks, dataset/ts_seg/ts_total, ...
    findings = root / "findings" / f"{split}_findings.jsonl"
    ds = CTRateDataset(root, split, masks_dir=masks, findings=str(findings) if findings.is_file() else None,
                       layout=config.layout)
    if len(ds) == 0:
        raise ValueError(f"data: split {split!r} of {root} has no usable volumes\n{ds.scan.summary()}")
    records = list(ds.records)
    cache_root = _cache_root(root, config)
    cache = PreprocessCache(cache_root, model_config.preprocess_config())
    entries = ds.cached(cache, progress=config.progress)
    skipped = list(ds.scan.skipped) + list(ds.cache_report.skipped)
    entries = sorted(entries, key=lambda e: e[0].name)
    cap = config.max_train_volumes if role == "train" else config.max_volumes
    if cap is not None:
        entries = entries[:cap]
    if not entries:
        raise ValueError(f"data: no volume of split {split!r} under {root} could be preprocessed "
                         f"({len(records)} found)")
    labels, names, csv_path = None, [], None
    if need_labels:
        csv_path = _labels_csv(root, split)
        if csv_path is None:
            raise ValueError(f"data: no labels CSV for split {split!r} under {root} "
                             f"(expected e.g. dataset/multi_abnormality_labels/{split}_predicted_labels.csv)")
        labels, names = read_labels(csv_path, config.labels, [rec.name for rec, _ in entries])
    return Split(split, root, entries, labels, names, str(csv_path) if csv_path else None,
                 [f"{p}: {why}" for p, why in skipped])


def _cache_root(root: Path, config: EvalConfig) -> Path:
    if config.cache:
        return Path(config.cache)
    try:
        from sigvlp.data.preprocess import default_cache_root
    except ImportError:
        return Path(os.environ.get("SIGVLP_CACHE") or root / ".sigvlp_cache")
    return Path(default_cache_root(root))


def volume_text(record, profile, chunk_config) -> str:
    """The text a whole volume is retrieved by: its organs' findings + general description
    (the chunk text of a chunk spanning the volume), else the report's Findings_EN."""
    from sigvlp.data.chunks import chunk_text, organs_in_chunk

    if record.findings:
        depth = profile.shape[1] if profile is not None else 0
        organs = organs_in_chunk(profile, 0, depth, chunk_config) if depth else list(record.findings.get("organs", {}))
        text = chunk_text(record.findings, organs, chunk_config.general)
        if text:
            return text
    report = record.report or {}
    return (report.get("Findings_EN") or report.get("Impressions_EN") or "").strip()


# ----------------------------------------------------------------------------- embeddings
class Embedder:
    """Pooled embeddings (and token features) of slice spans of cached volumes, packed under a
    token budget, with an on-disk cache per (checkpoint, split, data, plan)."""

    def __init__(self, model, device: torch.device, config: EvalConfig, ckpt_sha: str):
        self.model = model
        self.device = device
        self.config = config
        self.ckpt_sha = ckpt_sha
        self.patch = tuple(model.config.patch_size)

    def _autocast(self):
        if self.device.type == "cuda" and self.config.precision == "bf16":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        import contextlib

        return contextlib.nullcontext()

    def _tokens(self, shape) -> int:
        pt, ph, pw = self.patch
        return -(-shape[0] // pt) * (shape[1] // ph) * (shape[2] // pw)

    @torch.inference_mode()
    def encode(self, spans: list, entries: list, keep_tokens: set, desc: str) -> tuple[np.ndarray, dict]:
        """spans: [(volume index, z0, z1)]; returns ((S, D) float32, {span index: (tokens (n, width)
        float16, grid (3,))} for span indices in keep_tokens)."""
        from sigvlp.model import volume_batch

        sizes = [self._tokens((z1 - z0, *entries[v][1].shape[1:])) for v, z0, z1 in spans]
        groups, cur, used = [], [], 0
        for i, n in enumerate(sizes):
            if cur and used + n > self.config.token_budget:
                groups.append(cur)
                cur, used = [], 0
            cur.append(i)
            used += n
        if cur:
            groups.append(cur)
        pooled = [None] * len(spans)
        tokens = {}
        for group in _progress(groups, self.config.progress, desc=desc, unit="batch"):
            arrays = [entries[spans[i][0]][1].read(spans[i][1], spans[i][2]).astype(np.float32) for i in group]
            batch = volume_batch(arrays, self.patch)
            with self._autocast():
                emb, tok = self.model.encode_volume(batch["patches"], batch["cu_seqlens"], batch["max_seqlen"],
                                                    batch["grid_thw"])
            emb = emb.float().cpu().numpy()
            cu = batch["cu_seqlens"].tolist()
            for k, i in enumerate(group):
                pooled[i] = emb[k]
                if i in keep_tokens:
                    tokens[i] = (tok[cu[k]:cu[k + 1]].float().cpu().numpy().astype(np.float16),
                                 batch["grid_thw"][k].numpy().astype(np.int64))
        return np.stack(pooled).astype(np.float32), tokens

    def cached_encode(self, split: Split, spans: list, keep_tokens: set, desc: str) -> tuple[np.ndarray, dict]:
        files = [os.path.basename(cv.file) for _, cv in split.entries]
        key_blob = json.dumps([EMB_FORMAT, self.ckpt_sha, split.name, files, spans, sorted(keep_tokens),
                               self.config.precision])
        key = hashlib.sha256(key_blob.encode()).hexdigest()[:20]
        folder = _cache_root(split.root, self.config) / "eval"
        path = folder / f"emb-{split.name}-{key}.safetensors"
        if path.is_file():
            try:
                return _load_embeddings(path, len(spans))
            except Exception:  # a torn or foreign file: recompute
                pass
        pooled, tokens = self.encode(spans, split.entries, keep_tokens, desc)
        _save_embeddings(path, pooled, tokens, key)
        return pooled, tokens


def _save_embeddings(path: Path, pooled: np.ndarray, tokens: dict, key: str):
    import tempfile

    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"pooled": np.ascontiguousarray(pooled)}
    for i, (tok, grid) in tokens.items():
        tensors[f"tokens_{i}"] = np.ascontiguousarray(tok)
        tensors[f"grid_{i}"] = np.ascontiguousarray(grid)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"sigvlp_eval": json.dumps({"key": key, "format": EMB_FORMAT})})
        apply_umask(tmp)  # mkstemp / save_file create 0600
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load_embeddings(path: Path, n: int) -> tuple[np.ndarray, dict]:
    from safetensors.numpy import load_file

    t = load_file(str(path))
    pooled = t["pooled"]
    if pooled.shape[0] != n:
        raise ValueError("span count mismatch")
    tokens = {int(k[7:]): (v, t[f"grid_{k[7:]}"]) for k, v in t.items() if k.startswith("tokens_")}
    return pooled, tokens


@torch.inference_mode()
def encode_texts(model, texts: Sequence[str], batch: int = 128) -> np.ndarray:
    """(M, D) float32 normalised text embeddings, in batches; repeated texts encoded once."""
    unique = list(dict.fromkeys(texts))
    out = []
    for i in range(0, len(unique), batch):
        out.append(model.encode_texts(unique[i:i + batch]).float().cpu().numpy())
    if not out:
        return np.zeros((0, model.config.embed_dim), np.float32)
    emb = np.concatenate(out)
    where = {t: i for i, t in enumerate(unique)}
    return emb[[where[t] for t in texts]]


def _logit_scale(model) -> tuple[float, float]:
    return float(model.log_logit_scale.detach().float().exp()), float(model.logit_bias.detach().float())


# ----------------------------------------------------------------------------- plan
def chunk_plan(split: Split, chunk_config, k: int, seed: int) -> list:
    """[(volume index, z0, z1)]: k chunks per volume drawn with the chunk preset's sampler, from
    a generator seeded by (seed, crc32 of the volume name) (independent of volume order)."""
    from sigvlp.data.chunks import ChunkSampler

    sampler = ChunkSampler(chunk_config)
    spans = []
    for v, (rec, cv) in enumerate(split.entries):
        rng = np.random.default_rng([seed, zlib.crc32(rec.name.encode())])
        for _ in range(k):
            z0, z1 = sampler.sample(cv.shape[0], rng)
            spans.append((v, z0, z1))
    return spans


def default_depths(chunk_config, max_depth: int) -> tuple[int, ...]:
    d, out = max(chunk_config.min_slices, chunk_config.patch[0]), []
    while d < max_depth:
        out.append(d)
        d *= 2
    out.append(min(d, max(max_depth, 1)))  # the last point never exceeds the longest volume
    return tuple(out)


def central_crops(split: Split, depth: int) -> list:
    """[(volume index, z0, z1)]: the central `depth` slices of each volume (the whole volume when
    it is shorter), z0 = (slices - depth) // 2."""
    out = []
    for v, (_, cv) in enumerate(split.entries):
        z0 = max(0, (cv.shape[0] - depth) // 2)
        out.append((v, z0, z0 + min(depth, cv.shape[0])))
    return out


def chunk_organs(split: Split, spans: list, chunk_config) -> tuple[np.ndarray, list]:
    """((M, O) int64 0/1, [organ names per span]): the organs present in each chunk span (organs_in_chunk
    of the cached z-profile; O = len(ORGANS), columns in ORGANS order)."""
    y = np.zeros((len(spans), len(ORGANS)), np.int64)
    present = []
    for i, (v, z0, z1) in enumerate(spans):
        present.append(organs_in_chunk(split.entries[v][1].organ_profile, z0, z1, chunk_config))
        y[i, [ORGANS.index(o) for o in present[-1]]] = 1
    return y, present


def _has_profiles(split: Split) -> bool:
    return all(cv.organ_profile is not None for _, cv in split.entries)


def _has_maps(split: Split) -> bool:
    return all(getattr(cv, "has_organ_map", False) for _, cv in split.entries)


def encode_prompt_pair(model, templates: Sequence[str], key: str, values: Sequence[str]) -> tuple:
    """((V, D), (V, D)) float32 text embeddings of the (positive, negative) templates filled with
    each value ({key} replaced)."""
    return tuple(encode_texts(model, [t.format(**{key: x}) for x in values]) for t in templates)


# ----------------------------------------------------------------------------- context
@dataclass
class EvalContext:
    """What the sections share; `prepare` builds it, each section (see SECTIONS) reads it.

    model: the SigVLP (eval mode, on embedder.device); config: the EvalConfig; embedder: the
    Embedder (its cache keyed by the checkpoint hash); valid: the evaluated Split (labels when a
    labelled section runs); train: the Split the probes are fitted on (None: not needed, not
    configured, the evaluated split itself, or it failed to open: train_error holds why);
    chunk_config: the model's chunk preset; scale / bias: the logit scale (exp of the learned log)
    and bias. Spans are (volume index, z0, z1) of valid: spans (whole volumes, one per volume),
    chunk_spans (chunk_plan, empty when neither organs nor retrieval runs or the cache lacks organ
    z-profiles), depth_spans {slices: central crops} for each of depths (empty unless the depth
    sweep runs). pooled (S, D) float32 holds the embeddings of all of them, row index[span];
    tokens {row: ((n, width) float16 token features, (3,) grid)} those of the segmentation volumes.
    Written by sections: labels_used (the zero-shot section's scored labels, read by the depth
    sweep and the plots; when zero-shot does not run, valid's labels with enough positive and
    negative volumes: counted_labels) and map_coords (the
    embedding map's (N, 2) coordinates, for its plot).
    """

    model: torch.nn.Module
    config: EvalConfig
    embedder: Embedder
    valid: Split
    chunk_config: object
    scale: float
    bias: float
    spans: list
    chunk_spans: list
    depths: tuple
    depth_spans: dict
    pooled: np.ndarray
    index: dict
    tokens: dict
    train: Optional[Split] = None
    train_error: Optional[str] = None
    labels_used: list = field(default_factory=list)
    map_coords: Optional[np.ndarray] = None

    @property
    def device(self) -> torch.device:
        return self.embedder.device

    def rows(self, spans: list) -> np.ndarray:
        """(len(spans), D) float32 pooled embeddings of planned spans."""
        return self.pooled[[self.index[s] for s in spans]]

    @functools.cached_property
    def label_prompts(self) -> tuple:
        """((L, D), (L, D)): text embeddings of config.prompts for each of valid.label_names."""
        return encode_prompt_pair(self.model, self.config.prompts, "label", self.valid.label_names)

    @functools.cached_property
    def chunk_targets(self) -> tuple[np.ndarray, list]:
        """((M, O) organ presence, [organ text]) of chunk_spans (chunk_organs; chunk_text of the findings)."""
        y, present = chunk_organs(self.valid, self.chunk_spans, self.chunk_config)
        texts = [chunk_text(self.valid.entries[v][0].findings, organs, self.chunk_config.general)
                 for (v, _, _), organs in zip(self.chunk_spans, present)]
        return y, texts


def prepare(model, data, config: EvalConfig, ckpt_sha: str, device: torch.device) -> EvalContext:
    """The context of `evaluate`: opens the split (and the probe split where a section needs it),
    plans the spans of config.sections and encodes them all in one (cached) pass. model: a SigVLP
    in eval mode on device; data: the dataset root. Errors as open_split."""
    run = set(config.sections)
    valid = open_split(data, config.split, model.config, config,
                       need_labels=bool({"zero_shot", "depth_sweep", "embedding_map"} & run))
    cc = model.config.chunk_config()
    spans = [(v, 0, cv.shape[0]) for v, (_, cv) in enumerate(valid.entries)]
    chunk_spans = chunk_plan(valid, cc, config.chunks_per_volume, config.seed) if (
        {"organs", "retrieval"} & run and _has_profiles(valid)) else []
    depths = tuple(config.depths) if config.depths else default_depths(cc, max(z1 for _, _, z1 in spans))
    depth_spans = {d: central_crops(valid, d) for d in depths} if "depth_sweep" in run else {}
    all_spans = list(dict.fromkeys(spans + chunk_spans + [s for ds in depth_spans.values() for s in ds]))
    index = {s: i for i, s in enumerate(all_spans)}
    seg = {index[spans[v]] for v in range(min(config.seg_volumes, len(spans)))} if (
        "segmentation" in run and _has_maps(valid)) else set()
    embedder = Embedder(model, device, config, ckpt_sha)
    pooled, tokens = embedder.cached_encode(valid, all_spans, seg, f"embed {config.split}")
    scale, bias = _logit_scale(model)
    ctx = EvalContext(model, config, embedder, valid, cc, scale, bias, spans, chunk_spans, depths, depth_spans,
                      pooled, index, tokens, labels_used=counted_labels(valid, config)[0])
    ctx.train, ctx.train_error = _open_train(ctx, data)
    return ctx


def counted_labels(split: Split, config: EvalConfig) -> tuple[list, dict]:
    """(names of the split's labels with >= config.min_positives positive and >= min_negatives
    negative volumes, {other label: {"positives", "negatives", "skipped"}}): the --min-count rule
    of the zero-shot section (metrics.select_labels), for the sections that score labels when
    zero-shot does not run. ([], {}) for a split without labels."""
    if split.labels is None:
        return [], {}
    kept, skipped = select_labels(split.labels, split.label_names, config.min_positives, config.min_negatives,
                                  unit="volume")
    return [split.label_names[j] for j in kept], skipped


def _open_train(ctx: EvalContext, data) -> tuple[Optional[Split], Optional[str]]:
    """(the probe split or None, why it failed to open or None): opened only when the organ probe
    (organs with chunks) or the segmentation probe (organ maps) runs and it is another split."""
    config, run = ctx.config, set(ctx.config.sections)
    train_root = config.train_data or data
    same = config.train_split == config.split and Path(train_root).resolve() == Path(data).resolve()
    needed = ("organs" in run and ctx.chunk_spans) or ("segmentation" in run and _has_maps(ctx.valid))
    if config.train_split is None or same or not needed:
        return None, None
    try:
        return open_split(train_root, config.train_split, ctx.model.config, config, need_labels=False,
                          role="train"), None
    except (ValueError, FileNotFoundError) as e:
        return None, str(e)


# ----------------------------------------------------------------------------- sections
def run_zero_shot(ctx: EvalContext) -> dict:
    """Zero-shot abnormality classification of whole volumes (sections.zero_shot_section); sets
    ctx.labels_used ([] when no label has enough positives and negatives: the section is skipped,
    with labels_skipped)."""
    cfg = ctx.config
    pos_t, neg_t = ctx.label_prompts
    scores = pair_probability(ctx.rows(ctx.spans), pos_t, neg_t, ctx.scale, ctx.bias)
    try:
        sec = zero_shot_section(ctx.valid.labels, scores, ctx.valid.label_names, cfg.prompts,
                                min_positives=cfg.min_positives, min_negatives=cfg.min_negatives,
                                n_bootstrap=cfg.n_bootstrap, seed=cfg.seed)
    except InsufficientData as e:  # no label with enough positives and negatives in this split
        ctx.labels_used = []
        return e.entry()
    ctx.labels_used = sec["labels_used"]
    return sec


def run_organs(ctx: EvalContext) -> dict:
    """Organ presence per chunk: zero-shot with config.organ_prompts and a linear probe fitted on
    the train split's chunks (sections.organ_section)."""
    if not ctx.chunk_spans:
        return {"skipped": "no organ z-profiles in the cache (the dataset has no organ masks)"}
    cfg = ctx.config
    chunk_emb = ctx.rows(ctx.chunk_spans)
    opos, oneg = encode_prompt_pair(ctx.model, cfg.organ_prompts, "organ", ORGANS)
    zs = pair_probability(chunk_emb, opos, oneg, ctx.scale, ctx.bias)
    probe_train, probe_scores = _organ_probe(ctx, chunk_emb)
    try:
        sec = organ_section(ctx.chunk_targets[0], zs, list(ORGANS), cfg.organ_prompts, probe_train=probe_train,
                            probe_scores=probe_scores, min_positives=cfg.min_positives,
                            min_negatives=cfg.min_negatives)
    except InsufficientData as e:  # no organ with enough positive and negative chunks
        return e.entry()
    if ctx.train_error is not None:
        sec["linear_probe"] = {"skipped": _train_unopened(ctx)}
    return sec


def _train_unopened(ctx: EvalContext) -> str:
    """The one-line skip reason of a probe whose train split failed to open (the report's
    dataset.train_error holds the error's first line, dataset.train_error_detail the rest)."""
    return f"the {ctx.config.train_split!r} split could not be opened: see dataset.train_error"


def _organ_probe(ctx: EvalContext, chunk_emb: np.ndarray) -> tuple:
    """(train chunks' organ labels, (M, O) probe probabilities on chunk_emb), or (None, None)
    without a train split with organ z-profiles."""
    train, cfg = ctx.train, ctx.config
    if train is None or not _has_profiles(train):
        return None, None
    tspans = chunk_plan(train, ctx.chunk_config, cfg.chunks_per_volume, cfg.seed)
    temb, _ = ctx.embedder.cached_encode(train, tspans, set(), f"embed {train.name} chunks")
    y, _ = chunk_organs(train, tspans, ctx.chunk_config)
    return y, fit_linear_probe(temb, y, chunk_emb, seed=cfg.seed)


def run_retrieval(ctx: EvalContext) -> dict:
    """Volume <-> report text (volume_text) and chunk -> organ text retrieval (sections.retrieval_section)."""
    vtexts = [volume_text(rec, cv.organ_profile, ctx.chunk_config) for rec, cv in ctx.valid.entries]
    keep = [i for i, t in enumerate(vtexts) if t]
    if not keep:
        return {"skipped": "no report or findings text for any volume"}
    texts = [vtexts[i] for i in keep]
    chunk_texts = ctx.chunk_targets[1]
    chunk_emb = ctx.rows(ctx.chunk_spans) if chunk_texts else None
    ctext_emb = encode_texts(ctx.model, [t or " " for t in chunk_texts]) if chunk_texts else None
    try:
        sec = retrieval_section(ctx.rows(ctx.spans)[keep], encode_texts(ctx.model, texts), texts, chunk_emb,
                                ctext_emb, chunk_texts)
    except InsufficientData as e:  # fewer than two volumes with text
        return e.entry()
    sec["n_volumes_without_text"] = len(vtexts) - len(keep)
    return sec


def run_segmentation(ctx: EvalContext) -> dict:
    """Segmentation probe: a multinomial probe on the token features of the train split's first
    seg_volumes volumes, Dice per organ over the voxels (and the patches) of the evaluated ones."""
    if not _has_maps(ctx.valid):
        return {"skipped": "the preprocessing cache holds no organ maps (no organ masks)"}
    if ctx.train_error is not None:
        return {"skipped": _train_unopened(ctx)}
    if ctx.train is None or not _has_maps(ctx.train):
        return {"skipped": f"needs the {ctx.config.train_split!r} split with organ masks to fit the probe"}
    try:
        probe, n_tokens, n_volumes = _fit_segmentation(ctx)
    except InsufficientData as e:  # one class only among the train patches
        return e.entry()
    vox, patch, n_eval = _segmentation_counts(ctx, probe)
    sec = segmentation_section(vox[0], vox[1], list(ORGANS), n_train_tokens=n_tokens, n_train_volumes=n_volumes,
                               n_valid_volumes=n_eval,
                               upsampling="class probabilities per patch, trilinear to voxels, argmax")
    sec["per_organ_dice_patch"] = segmentation_section(patch[0], patch[1], list(ORGANS))["per_organ_dice"]
    return sec


def _fit_segmentation(ctx: EvalContext) -> tuple:
    """(probe, tokens it was fitted on, train volumes used): fit_segmentation_probe on the token
    features of the train split's first seg_volumes volumes and their patch organ labels."""
    train, cfg = ctx.train, ctx.config
    k = min(cfg.seg_volumes, len(train.entries))
    tspans = [(v, 0, train.entries[v][1].shape[0]) for v in range(k)]
    _, ttok = ctx.embedder.cached_encode(train, tspans, set(range(k)), f"embed {train.name} tokens")
    feats = np.concatenate([ttok[i][0].astype(np.float32) for i in range(k)])
    labs = np.concatenate([train.entries[v][1].organ_labels(ctx.embedder.patch, z0, z1).reshape(-1)
                           for v, z0, z1 in tspans])
    probe = fit_segmentation_probe(feats, labs, n_classes=len(ORGANS) + 1, seed=cfg.seed,
                                   max_tokens=cfg.seg_max_tokens)
    return probe, int(min(len(labs), cfg.seg_max_tokens)), k


def _segmentation_counts(ctx: EvalContext, probe) -> tuple:
    """((2, C) voxel, (2, C) patch (intersection, |P| + |G|) sums, volumes counted) of the probe on
    the evaluated volumes whose token features were kept (C = organs + background)."""
    n_classes, patch = len(ORGANS) + 1, ctx.embedder.patch
    vox, pat, n_eval = np.zeros((2, n_classes)), np.zeros((2, n_classes)), 0
    for v, span in enumerate(ctx.spans):
        if ctx.index[span] not in ctx.tokens:
            continue
        tok, grid = ctx.tokens[ctx.index[span]]
        cv = ctx.valid.entries[v][1]
        vox += dice_counts(predict_voxels(probe, tok, grid, patch, cv.shape[0], n_classes), cv.organ_map(), n_classes)
        pat += dice_counts(probe.predict(tok.astype(np.float32)), cv.organ_labels(patch).reshape(-1), n_classes)
        n_eval += 1
    return vox, pat, n_eval


def run_depth_sweep(ctx: EvalContext) -> dict:
    """Zero-shot on the central crops of each of ctx.depths slices, over ctx.labels_used (the labels
    zero_shot scored, else those passing its --min-count rule: counted_labels), with the encoder
    FLOPs of one volume per depth (flops.encoder_flops). Skipped when labels_used is empty (with
    labels_skipped when zero_shot did not run)."""
    valid, used, cfg = ctx.valid, ctx.labels_used, ctx.config
    n = len(valid.entries)
    if not used and "zero_shot" in cfg.sections:
        return {"skipped": f"zero_shot scored no label among the {count_of(n, 'volume')}: no zero-shot score "
                           "to sweep"}
    if not used:
        _, skipped = counted_labels(valid, cfg)
        return too_few(n, skipped, cfg.min_positives, cfg.min_negatives, unit="volume").entry()
    cols = [valid.label_names.index(x) for x in used]
    pos_t, neg_t = ctx.label_prompts
    size = valid.entries[0][1].shape[1:]
    points = []
    for d in ctx.depths:
        sc = pair_probability(ctx.rows(ctx.depth_spans[d]), pos_t[cols], neg_t[cols], ctx.scale, ctx.bias)
        fl = encoder_flops(ctx.model, d, size[0], size[1], device=ctx.device)
        p = depth_sweep_point(d, fl["tokens"], fl, valid.labels[:, cols], sc, used)
        p["volumes_shorter"] = int(sum(cv.shape[0] < d for _, cv in valid.entries))
        points.append(p)
    return {"points": points, "crop": "central d slices of each volume (whole volume when shorter)",
            "flops": "one volume of d slices at the split's in-plane size; torch.utils.flop_counter + analytic "
                     "attention (4*Lq*Lk*heads*head_dim)"}


def run_embedding_map(ctx: EvalContext) -> dict:
    """2-D map of the volume embeddings (plots.embedding_map: UMAP, else PCA); sets ctx.map_coords.
    Skipped with fewer than plots.MIN_MAP_POINTS volumes."""
    try:
        ctx.map_coords, method = embedding_map(ctx.rows(ctx.spans), seed=ctx.config.seed)
    except InsufficientData as e:
        return e.entry()
    colour = "each scored abnormality" if ctx.labels_used else "none: no abnormality label scored"
    return {"method": method, "n": len(ctx.valid.entries), "colour": colour}


# The report's sections in the order `evaluate` runs them: name -> function(EvalContext) -> the
# section's dict (sigvlp.eval.report documents each; {"skipped": reason} when it cannot run). The
# names are sigvlp.eval.report.SECTIONS (EvalConfig.sections picks among them); zero_shot runs
# before depth_sweep (it sets ctx.labels_used) and embedding_map sets ctx.map_coords for the plots.
SECTIONS = {"zero_shot": run_zero_shot, "organs": run_organs, "retrieval": run_retrieval,
            "segmentation": run_segmentation, "depth_sweep": run_depth_sweep, "embedding_map": run_embedding_map}


# ----------------------------------------------------------------------------- evaluate
def evaluate(ckpt=None, data=None, config: Optional[EvalConfig] = None, *, model=None, out=None) -> dict:
    """Run the suite; returns the report (validated against sigvlp.eval.report's schema).

    ckpt: a checkpoint folder (save_pretrained, or a training run: its latest checkpoint);
    model: an in-memory SigVLP instead (ckpt then only names it). data: a dataset root in the
    CT-RATE layout. out: a folder for report.json and the plots (None: nothing written).
    Each of config.sections runs in SECTIONS order over one shared EvalContext (`prepare`).
    Errors: FileNotFoundError for missing folders, ValueError for bad data/labels/config
    (naming what is wrong)."""
    config = config or EvalConfig()
    if data is None:
        raise ValueError("data: a dataset folder in the CT-RATE layout is required")
    t0 = time.perf_counter()
    device = _device(config.device)
    model, folder, sha = _model_and_hash(ckpt, model, config)
    was_training = model.training
    model.eval()
    model.to(device)
    ctx = prepare(model, data, config, sha, device)
    report = _report_head(ctx, data, folder, sha)
    for name, run_section in SECTIONS.items():
        report[name] = run_section(ctx) if name in config.sections else {"skipped": "not requested"}
    report["seconds"] = time.perf_counter() - t0
    if out is not None:
        _write(report, ctx, Path(out))
    validate_report(report)
    if was_training:
        model.train()
    return report


def _model_and_hash(ckpt, model, config: EvalConfig) -> tuple:
    """(model, checkpoint folder or None, sha256): the checkpoint loaded, or the model given
    (hashed from ckpt's files when they are there, else from its state)."""
    if model is None:
        if ckpt is None:
            raise ValueError("ckpt: a checkpoint folder (or model=) is required")
        return load_checkpoint(ckpt, expect_preset=config.expect_preset)
    folder = Path(ckpt) if ckpt is not None else None
    sha = ckpt_io.checkpoint_hash(folder) if folder is not None and (folder / "model.safetensors").is_file() \
        else ckpt_io.state_hash(model)
    return model, folder, sha


def _report_head(ctx: EvalContext, data, folder, sha: str) -> dict:
    """The report's keys before the sections: schema, device, checkpoint, dataset, config, plots."""
    valid, config = ctx.valid, ctx.config
    report = {"schema": SCHEMA, "device": str(ctx.device),
              "checkpoint": {"path": str(folder) if folder else None, "sha256": sha,
                             "config": ctx.model.config.to_dict()},
              "dataset": {"root": str(Path(data).expanduser().resolve()), "split": config.split,
                          "train_split": config.train_split, "n_volumes": len(valid.entries),
                          "labels_csv": valid.labels_csv, "skipped": valid.skipped},
              "config": config.to_dict(), "plots": {}}
    report["config"]["logit_scale"], report["config"]["logit_bias"] = ctx.scale, ctx.bias
    if ctx.train_error is not None:  # one line; the rest (e.g. the scan's list of unusable files) beside it
        first, *rest = ctx.train_error.splitlines() or [""]
        report["dataset"]["train_error"] = first
        if any(line.strip() for line in rest):
            report["dataset"]["train_error_detail"] = [line.strip() for line in rest if line.strip()]
    return report


def _write(report: dict, ctx: EvalContext, out: Path) -> None:
    """The plots (config.plots; the map coloured by ctx.labels_used; report["plots_skipped"] says
    why any is not written) and out/report.json."""
    if ctx.config.plots:
        names, used = ctx.valid.label_names, ctx.labels_used
        cols = [names.index(x) for x in used] if names else []
        report["plots_skipped"] = unplottable(report, map_coords=ctx.map_coords)
        report["plots"] = write_plots(report, out, map_coords=ctx.map_coords,
                                      map_labels=ctx.valid.labels[:, cols] if cols else None, map_names=used or [])
    validate_report(report)
    write_report(report, out / "report.json")
