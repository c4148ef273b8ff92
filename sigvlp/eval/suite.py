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
from sigvlp.eval.report import SCHEMA, SECTIONS
from sigvlp.prompts import ABNORMALITY_PROMPTS, ORGAN_PROMPTS

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
    (None: all). sections: which of SECTIONS to run. train_split / train_data: the split (and
    dataset root, default the evaluated one) the probes are fitted on.
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
    sections: tuple[str, ...] = SECTIONS
    device: str = "auto"
    precision: str = "fp32"
    cache: Optional[str] = None
    masks: Optional[str] = None
    expect_preset: Optional[str] = None
    progress: bool = True
    plots: bool = True

    def __post_init__(self):
        if self.split not in ("train", "valid"):
            raise ValueError(f"split: expected 'train' or 'valid', got {self.split!r}")
        if self.train_split is not None and self.train_split not in ("train", "valid"):
            raise ValueError(f"train_split: expected 'train', 'valid' or None, got {self.train_split!r}")
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
        bad = sorted(set(self.sections) - set(SECTIONS))
        if bad:
            raise ValueError(f"sections: unknown {bad}; known: {list(SECTIONS)}")
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


def checkpoint_hash(folder) -> str:
    """sha256 over the checkpoint's config.json and model.safetensors bytes (sigvlp.checkpoint)."""
    return ckpt_io.checkpoint_hash(folder)


def state_hash(model) -> str:
    """sha256 of an in-memory model's config and weights (for a model passed without a folder)."""
    return ckpt_io.state_hash(model)


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
    from sigvlp.data.ctrate import _find_csv

    return _find_csv(root, split, "labels")


def read_labels(csv_path: Path, names: Optional[Sequence[str]], volumes: Sequence[str]) -> tuple[np.ndarray, list]:
    """(N, L) 0/1 labels of `volumes` from a labels CSV; names None: the 18 CT-RATE labels.
    ValueError for a missing column (naming it and the CSV), a volume without a row, or a
    non-0/1 value."""
    import csv

    from sigvlp.data.ctrate import CTRATE_LABELS

    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        columns = list(reader.fieldnames or [])
        rows = {r.get("VolumeName"): r for r in reader}
    if "VolumeName" not in columns:
        raise ValueError(f"labels CSV {csv_path}: no 'VolumeName' column (columns: {columns})")
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
    masks = Path(config.masks) if config.masks else (root / "masks" if (root / "masks").is_dir() else None)
    findings = root / "findings" / f"{split}_findings.jsonl"
    ds = CTRateDataset(root, split, masks_dir=masks, findings=str(findings) if findings.is_file() else None)
    if len(ds) == 0:
        raise ValueError(f"data: split {split!r} of {root} has no usable volumes\n{ds.scan.summary()}")
    records = list(ds.records)
    cache_root = _cache_root(root, config)
    cache = PreprocessCache(cache_root, model_config.preprocess_config())
    if hasattr(ds, "cached"):
        entries = ds.cached(cache)
        skipped = list(getattr(getattr(ds, "cache_report", None), "skipped", []))
    else:  # older sigvlp.data
        from sigvlp.data import build_cache

        entries, rep = build_cache(ds, cache)
        skipped = list(rep.skipped)
    skipped = list(ds.scan.skipped) + skipped
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
        from sigvlp.data.loader import default_cache_root
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
        from sigvlp._fileperm import apply_umask

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


# ----------------------------------------------------------------------------- evaluate
def evaluate(ckpt=None, data=None, config: Optional[EvalConfig] = None, *, model=None, out=None) -> dict:
    """Run the suite; returns the report (validated against sigvlp.eval.report's schema).

    ckpt: a checkpoint folder (save_pretrained, or a training run: its latest checkpoint);
    model: an in-memory SigVLP instead (ckpt then only names it). data: a dataset root in the
    CT-RATE layout. out: a folder for report.json and the plots (None: nothing written).
    Errors: FileNotFoundError for missing folders, ValueError for bad data/labels/config
    (naming what is wrong)."""
    from sigvlp.eval import sections as S
    from sigvlp.eval.report import validate_report, write_report

    config = config or EvalConfig()
    if data is None:
        raise ValueError("data: a dataset folder in the CT-RATE layout is required")
    t0 = time.perf_counter()
    device = _device(config.device)
    if model is None:
        if ckpt is None:
            raise ValueError("ckpt: a checkpoint folder (or model=) is required")
        model, folder, sha = load_checkpoint(ckpt, expect_preset=config.expect_preset)
    else:
        folder = Path(ckpt) if ckpt is not None else None
        sha = checkpoint_hash(folder) if folder is not None and (folder / "model.safetensors").is_file() \
            else state_hash(model)
    was_training = model.training
    model.eval()
    model.to(device)
    mcfg = model.config
    chunk_config = mcfg.chunk_config()
    scale, bias = _logit_scale(model)
    run = set(config.sections)
    embedder = Embedder(model, device, config, sha)
    rng_seed = config.seed

    valid = open_split(data, config.split, mcfg, config, need_labels="zero_shot" in run or "depth_sweep" in run
                       or "embedding_map" in run)
    n = len(valid.entries)
    report: dict = {"schema": SCHEMA, "device": str(device),
                    "checkpoint": {"path": str(folder) if folder else None, "sha256": sha, "config": mcfg.to_dict()},
                    "dataset": {"root": str(Path(data).expanduser().resolve()), "split": config.split,
                                "train_split": config.train_split, "n_volumes": n, "labels_csv": valid.labels_csv,
                                "skipped": valid.skipped},
                    "config": config.to_dict(), "plots": {}}
    report["config"]["logit_scale"], report["config"]["logit_bias"] = scale, bias
    has_maps = all(getattr(cv, "has_organ_map", False) for _, cv in valid.entries)
    has_profiles = all(cv.organ_profile is not None for _, cv in valid.entries)

    # --- spans of the valid split: whole volumes, chunks, depth crops
    spans = [(v, 0, cv.shape[0]) for v, (_, cv) in enumerate(valid.entries)]
    chunk_spans = chunk_plan(valid, chunk_config, config.chunks_per_volume, rng_seed) if (
        {"organs", "retrieval"} & run and has_profiles) else []
    max_depth = max(cv.shape[0] for _, cv in valid.entries)
    depths = tuple(config.depths) if config.depths else default_depths(chunk_config, max_depth)
    depth_spans = {}
    if "depth_sweep" in run:
        for d in depths:
            depth_spans[d] = [(v, max(0, (cv.shape[0] - d) // 2), max(0, (cv.shape[0] - d) // 2) + min(d, cv.shape[0]))
                              for v, (_, cv) in enumerate(valid.entries)]
    all_spans = list(dict.fromkeys(spans + chunk_spans + [s for ds in depth_spans.values() for s in ds]))
    index = {s: i for i, s in enumerate(all_spans)}
    seg_idx = set()
    if "segmentation" in run and has_maps:
        seg_idx = {index[spans[v]] for v in range(min(config.seg_volumes, n))}
    pooled, tokens = embedder.cached_encode(valid, all_spans, seg_idx, f"embed {config.split}")
    vol_emb = pooled[[index[s] for s in spans]]

    # --- zero-shot abnormality classification (whole volumes)
    names = valid.label_names
    if "zero_shot" in run or "depth_sweep" in run:
        pos_t = encode_texts(model, [config.prompts[0].format(label=x) for x in names])
        neg_t = encode_texts(model, [config.prompts[1].format(label=x) for x in names])
    if "zero_shot" in run:
        scores = S.pair_probability(vol_emb, pos_t, neg_t, scale, bias)
        try:
            report["zero_shot"] = S.zero_shot_section(valid.labels, scores, names, config.prompts,
                                                      min_positives=config.min_positives,
                                                      min_negatives=config.min_negatives,
                                                      n_bootstrap=config.n_bootstrap, seed=config.seed)
            used = report["zero_shot"]["labels_used"]
        except ValueError as e:  # no label with enough positives and negatives in this split
            report["zero_shot"] = {"skipped": str(e)}
            used = []
    else:
        report["zero_shot"] = {"skipped": "not requested"}
        used = names

    # --- organ presence per chunk
    from sigvlp.data.chunks import chunk_text, organs_in_chunk
    from sigvlp.data.organs import ORGANS

    chunk_texts = []
    if chunk_spans:
        chunk_emb = pooled[[index[s] for s in chunk_spans]]
        organ_y = np.zeros((len(chunk_spans), len(ORGANS)), np.int64)
        for i, (v, z0, z1) in enumerate(chunk_spans):
            rec, cv = valid.entries[v]
            present = organs_in_chunk(cv.organ_profile, z0, z1, chunk_config)
            organ_y[i, [ORGANS.index(o) for o in present]] = 1
            chunk_texts.append(chunk_text(rec.findings, present, chunk_config.general))
    train = None
    train_root = config.train_data or data
    same = config.train_split == config.split and Path(train_root).resolve() == Path(data).resolve()
    need_train = config.train_split is not None and not same and (
        ("organs" in run and chunk_spans) or ("segmentation" in run and has_maps))
    if need_train:
        try:
            train = open_split(train_root, config.train_split, mcfg, config, need_labels=False, role="train")
        except (ValueError, FileNotFoundError) as e:
            train = None
            report["dataset"]["train_error"] = str(e)
    if "organs" in run:
        if not chunk_spans:
            report["organs"] = {"skipped": "no organ z-profiles in the cache (the dataset has no organ masks)"}
        else:
            opos = encode_texts(model, [config.organ_prompts[0].format(organ=o) for o in ORGANS])
            oneg = encode_texts(model, [config.organ_prompts[1].format(organ=o) for o in ORGANS])
            zs = S.pair_probability(chunk_emb, opos, oneg, scale, bias)
            probe_scores = probe_train = None
            if train is not None and all(cv.organ_profile is not None for _, cv in train.entries):
                tspans = chunk_plan(train, chunk_config, config.chunks_per_volume, rng_seed)
                temb, _ = embedder.cached_encode(train, tspans, set(), f"embed {train.name} chunks")
                probe_train = np.zeros((len(tspans), len(ORGANS)), np.int64)
                for i, (v, z0, z1) in enumerate(tspans):
                    present = organs_in_chunk(train.entries[v][1].organ_profile, z0, z1, chunk_config)
                    probe_train[i, [ORGANS.index(o) for o in present]] = 1
                probe_scores = S.fit_linear_probe(temb, probe_train, chunk_emb, seed=config.seed)
            try:
                report["organs"] = S.organ_section(organ_y, zs, list(ORGANS), config.organ_prompts,
                                                   probe_train=probe_train, probe_scores=probe_scores,
                                                   min_positives=config.min_positives,
                                                   min_negatives=config.min_negatives)
            except ValueError as e:
                report["organs"] = {"skipped": str(e)}
    else:
        report["organs"] = {"skipped": "not requested"}

    # --- retrieval
    if "retrieval" in run:
        vtexts = [volume_text(rec, cv.organ_profile, chunk_config) for rec, cv in valid.entries]
        keep = [i for i, t in enumerate(vtexts) if t]
        if keep:
            remb = encode_texts(model, [vtexts[i] for i in keep])
            ctext_emb = encode_texts(model, [t or " " for t in chunk_texts]) if chunk_texts else None
            report["retrieval"] = S.retrieval_section(vol_emb[keep], remb, [vtexts[i] for i in keep],
                                                      chunk_emb if chunk_texts else None, ctext_emb, chunk_texts)
            report["retrieval"]["n_volumes_without_text"] = n - len(keep)
        else:
            report["retrieval"] = {"skipped": "no report or findings text for any volume"}
    else:
        report["retrieval"] = {"skipped": "not requested"}

    # --- segmentation probe
    if "segmentation" not in run:
        report["segmentation"] = {"skipped": "not requested"}
    elif not has_maps:
        report["segmentation"] = {"skipped": "the preprocessing cache holds no organ maps (no organ masks)"}
    elif train is None or not all(getattr(cv, "has_organ_map", False) for _, cv in train.entries):
        report["segmentation"] = {"skipped": f"needs the {config.train_split!r} split with organ masks to fit "
                                             "the probe"}
    else:
        report["segmentation"] = _segmentation(embedder, train, valid, tokens, index, spans, config)

    # --- depth sweep
    if "depth_sweep" in run:
        from sigvlp.eval.flops import encoder_flops

        points = []
        size = valid.entries[0][1].shape[1:]
        cols = [names.index(x) for x in used]
        for d in depths:
            emb = pooled[[index[s] for s in depth_spans[d]]]
            sc = S.pair_probability(emb, pos_t[cols], neg_t[cols], scale, bias)
            fl = encoder_flops(model, d, size[0], size[1], device=device)
            p = S.depth_sweep_point(d, fl["tokens"], fl, valid.labels[:, cols], sc, used)
            p["volumes_shorter"] = int(sum(cv.shape[0] < d for _, cv in valid.entries))
            points.append(p)
        report["depth_sweep"] = {"points": points, "crop": "central d slices of each volume (whole volume when "
                                 "shorter)", "flops": "one volume of d slices at the split's in-plane size; "
                                 "torch.utils.flop_counter + analytic attention (4*Lq*Lk*heads*head_dim)"}
    else:
        report["depth_sweep"] = {"skipped": "not requested"}

    # --- embedding map
    coords = None
    if "embedding_map" in run:
        from sigvlp.eval.plots import embedding_map

        coords, method = embedding_map(vol_emb, seed=config.seed)
        report["embedding_map"] = {"method": method, "n": n, "colour": "each scored abnormality"}
    else:
        report["embedding_map"] = {"skipped": "not requested"}

    report["seconds"] = time.perf_counter() - t0
    if out is not None:
        out = Path(out)
        if config.plots:
            cols = [names.index(x) for x in used] if names else []
            report["plots"] = _plots(report, out, coords, valid.labels[:, cols] if cols else None, used)
        validate_report(report)
        write_report(report, out / "report.json")
    validate_report(report)
    if was_training:
        model.train()
    return report


def _plots(report, out: Path, coords, labels, names) -> dict:
    from sigvlp.eval.plots import write_plots

    return write_plots(report, out, map_coords=coords, map_labels=labels, map_names=names or [])


def _segmentation(embedder: Embedder, train: Split, valid: Split, valid_tokens: dict, index: dict, spans: list,
                  config: EvalConfig) -> dict:
    from sigvlp.data.organs import ORGANS
    from sigvlp.eval import sections as S

    patch = embedder.patch
    n_classes = len(ORGANS) + 1
    k = min(config.seg_volumes, len(train.entries))
    tspans = [(v, 0, train.entries[v][1].shape[0]) for v in range(k)]
    _, ttok = embedder.cached_encode(train, tspans, set(range(k)), f"embed {train.name} tokens")
    feats, labs = [], []
    for i, (v, z0, z1) in enumerate(tspans):
        tok, _ = ttok[i]
        lab = train.entries[v][1].organ_labels(patch, z0, z1).reshape(-1)
        feats.append(tok.astype(np.float32))
        labs.append(lab)
    feats, labs = np.concatenate(feats), np.concatenate(labs)
    probe = S.fit_segmentation_probe(feats, labs, n_classes=n_classes, seed=config.seed,
                                     max_tokens=config.seg_max_tokens)
    inter = np.zeros(n_classes)
    size = np.zeros(n_classes)
    patch_inter = np.zeros(n_classes)
    patch_size_ = np.zeros(n_classes)
    n_eval = 0
    for v in range(len(valid.entries)):
        i = index[spans[v]]
        if i not in valid_tokens:
            continue
        tok, grid = valid_tokens[i]
        cv = valid.entries[v][1]
        vox = S.predict_voxels(probe, tok, grid, patch, cv.shape[0], n_classes)
        a, b = S.dice_counts(vox, cv.organ_map(), n_classes)
        inter += a
        size += b
        pl = cv.organ_labels(patch).reshape(-1)
        pp = probe.predict(tok.astype(np.float32))
        a, b = S.dice_counts(pp, pl, n_classes)
        patch_inter += a
        patch_size_ += b
        n_eval += 1
    sec = S.segmentation_section(inter, size, list(ORGANS), n_train_tokens=int(min(len(labs), config.seg_max_tokens)),
                                 n_train_volumes=k, n_valid_volumes=n_eval,
                                 upsampling="class probabilities per patch, trilinear to voxels, argmax")
    with np.errstate(invalid="ignore", divide="ignore"):
        pd = np.where(patch_size_ > 0, 2 * patch_inter / patch_size_, np.nan)
    sec["per_organ_dice_patch"] = {o: float(pd[j + 1]) for j, o in enumerate(ORGANS) if patch_size_[j + 1] > 0}
    return sec
