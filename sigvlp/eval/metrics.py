"""Metrics of the evaluation suite (arrays in, numbers out; no model here).

Zero-shot abnormality classification follows CT-CLIP's published protocol:

- the score of a label is the two-way softmax of the model's logits for the prompt pair
  ("{label} is present.", "{label} is not present."), probability of "present";
- per label, the decision threshold is the point of a 100-point grid over [0, 1]
  (``np.linspace(0, 1, 100)``) that minimises sqrt((1 - TPR)^2 + FPR^2), with predictions
  ``score > threshold`` and ties resolved to the larger threshold (CT-CLIP keeps the last grid
  point with ``distance <= best``);
- AUROC per label; F1 is scikit-learn's *weighted* average over both classes; accuracy;
  precision of the positive class; all averaged over the labels scored.

Bootstrap confidence intervals resample the volumes (rows) with replacement, keeping each
label's threshold fixed at its full-data value as CT-CLIP does (its script computes the
resampling indices but never uses them; here they are used). The resampled statistics are
computed vectorised (AUROC from average ranks = Mann-Whitney U; weighted F1 from confusion
counts); tests check them against scikit-learn on resamples.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

#: CT-CLIP's threshold grid: 100 points over [0, 1].
THRESHOLD_GRID = np.linspace(0.0, 1.0, 100)


def _sk():
    try:
        import sklearn.metrics as skm
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError("sigvlp.eval needs scikit-learn: pip install -e '.[eval]'") from e
    return skm


def _binary(y, name: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array of 0/1 labels, got shape {y.shape}")
    if y.size and not np.isin(y, (0, 1)).all():
        bad = sorted(set(np.unique(y).tolist()) - {0, 1})[:5]
        raise ValueError(f"{name}: expected 0/1 labels, found {bad}")
    return y.astype(np.int64)


def _scores(s, n: int, name: str) -> np.ndarray:
    s = np.asarray(s, dtype=np.float64)
    if s.ndim != 1 or s.shape[0] != n:
        raise ValueError(f"{name}: expected shape ({n},) like y_true, got {s.shape}")
    if not np.isfinite(s).all():
        raise ValueError(f"{name}: scores must be finite (found NaN or inf)")
    return s


def _check_pair(y_true, y_score) -> tuple[np.ndarray, np.ndarray]:
    y = _binary(y_true, "y_true")
    s = _scores(y_score, y.shape[0], "y_score")
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.shape[0]:
        raise ValueError(f"y_true: needs both classes for AUROC and the threshold rule, got {n_pos} positives "
                         f"of {y.shape[0]}")
    return y, s


def ctclip_threshold(y_true, y_score, grid: Optional[Sequence[float]] = None) -> float:
    """The grid threshold minimising sqrt((1 - TPR)^2 + FPR^2) for predictions ``y_score > t``.

    y_true (N,) 0/1 with both classes; y_score (N,) float (probabilities, CT-CLIP's softmax
    scores). grid: thresholds to try (default THRESHOLD_GRID, 100 points over [0, 1]); ties go to
    the last (largest) grid point, as in CT-CLIP. Returns a Python float. ValueError on bad input.
    """
    y, s = _check_pair(y_true, y_score)
    grid = THRESHOLD_GRID if grid is None else np.asarray(grid, dtype=np.float64)
    pred = s[None, :] > grid[:, None]  # (G, N)
    pos = y.astype(bool)
    tpr = pred[:, pos].sum(1) / pos.sum()
    fpr = pred[:, ~pos].sum(1) / (~pos).sum()
    dist = np.sqrt((1.0 - tpr) ** 2 + fpr ** 2)
    last = len(dist) - 1 - int(np.argmin(dist[::-1]))  # the last grid point at the minimum
    return float(grid[last])


def binary_metrics(y_true, y_score, *, threshold: Optional[float] = None) -> dict:
    """CT-CLIP's per-label zero-shot metrics.

    y_true (N,) 0/1 with both classes present; y_score (N,) float scores (the "present"
    probability of the prompt pair). threshold: None picks it with `ctclip_threshold`;
    a float applies that one (``score > threshold`` is positive).

    Returns {"auroc", "f1_weighted", "accuracy", "precision", "threshold"} (Python floats):
    scikit-learn's roc_auc_score, f1_score(average="weighted"), accuracy_score and
    precision_score of the positive class (0 when nothing is predicted positive).
    ValueError names the argument on bad input (shape, non-0/1 labels, one class only, NaN).
    """
    y, s = _check_pair(y_true, y_score)
    skm = _sk()
    t = ctclip_threshold(y, s) if threshold is None else float(threshold)
    pred = (s > t).astype(np.int64)
    return {
        "auroc": float(skm.roc_auc_score(y, s)),
        "f1_weighted": float(skm.f1_score(y, pred, average="weighted", zero_division=0)),
        "accuracy": float(skm.accuracy_score(y, pred)),
        "precision": float(skm.precision_score(y, pred, zero_division=0)),
        "threshold": t,
    }


def detection_metrics(y_true, y_score, threshold: float) -> dict:
    """Positive-class precision, recall, F1 at ``score > threshold`` and AUROC (organ
    classification). Returns {"auroc", "precision", "recall", "f1", "threshold"}."""
    y, s = _check_pair(y_true, y_score)
    skm = _sk()
    pred = (s > threshold).astype(np.int64)
    return {
        "auroc": float(skm.roc_auc_score(y, s)),
        "precision": float(skm.precision_score(y, pred, zero_division=0)),
        "recall": float(skm.recall_score(y, pred, zero_division=0)),
        "f1": float(skm.f1_score(y, pred, zero_division=0)),
        "threshold": float(threshold),
    }


class InsufficientData(ValueError):
    """Too little data for a metric or a report section (too few positives or negatives, too few
    volumes). str(e) is one line for the report's {"skipped": reason}; detail holds structured
    extras that the skipped entry carries beside it (e.g. {"labels_skipped": {...}})."""

    def __init__(self, reason: str, detail: Optional[dict] = None):
        super().__init__(reason)
        self.detail = dict(detail or {})

    def entry(self) -> dict:
        """The report entry of the skipped section: {"skipped": str(self), **detail}."""
        return {"skipped": str(self), **self.detail}


def count_of(n: int, unit: str) -> str:
    """'1 volume', '3 volumes': n and the unit, plural unless n == 1."""
    return f"{n} {unit}" if n == 1 else f"{n} {unit}s"


def select_labels(y_true: np.ndarray, names: Sequence[str], min_positives: int = 1,
                  min_negatives: int = 1, *, unit: str = "row") -> tuple[list[int], dict[str, dict]]:
    """Columns of y_true (N, L) with at least min_positives ones and min_negatives zeros.
    Returns (kept column indices, {skipped name: {"positives", "negatives", "skipped"}}), where
    "skipped" is one line naming the label and its counts of `unit` (e.g. "volume")."""
    y = np.asarray(y_true)
    if y.ndim != 2 or y.shape[1] != len(names):
        raise ValueError(f"y_true: expected shape (N, {len(names)}), got {y.shape}")
    kept, skipped = [], {}
    for j, name in enumerate(names):
        pos = int(y[:, j].sum())
        neg = int(y.shape[0] - pos)
        if pos < min_positives or neg < min_negatives:
            skipped[name] = {"positives": pos, "negatives": neg,
                             "skipped": f"{name!r} has {pos} positive and {neg} negative {unit}s (needs >= "
                                        f"{min_positives} positive and >= {min_negatives} negative)"}
        else:
            kept.append(j)
    return kept, skipped


def too_few(n_rows: int, skipped: dict, min_positives: int, min_negatives: int, *, what: str = "label",
            unit: str = "row", detail_key: str = "labels_skipped") -> InsufficientData:
    """The InsufficientData for "no column qualifies" (select_labels kept none): one line with the
    row count, the thresholds and the closest column; detail {detail_key: skipped}."""
    closest = max(skipped, key=lambda k: min(skipped[k]["positives"], skipped[k]["negatives"]), default=None)
    near = (f" (closest: {closest!r}, {skipped[closest]['positives']} positive / "
            f"{skipped[closest]['negatives']} negative)") if closest is not None else ""
    return InsufficientData(f"{count_of(n_rows, unit)}: no {what} has >= {min_positives} positive and >= "
                            f"{min_negatives} negative {unit}s{near}", {detail_key: skipped})


def multilabel_metrics(y_true, y_score, names: Sequence[str], *, min_positives: int = 1,
                       min_negatives: int = 1, unit: str = "volume") -> dict:
    """`binary_metrics` for every label column with enough of both classes, and their means.

    y_true (N, L) 0/1, y_score (N, L); unit names the rows in messages. Returns {"per_label":
    {name: metrics + n_pos, n_neg}, "mean": {auroc, f1_weighted, accuracy, precision},
    "labels_used": [...], "labels_skipped": {name: {"positives", "negatives", "skipped"}}}.
    InsufficientData (a ValueError; one line, labels_skipped in its detail) when no label qualifies.
    """
    y = np.asarray(y_true)
    s = np.asarray(y_score, dtype=np.float64)
    if y.ndim != 2 or s.shape != y.shape:
        raise ValueError(f"y_true, y_score: expected equal (N, L) shapes, got {y.shape} and {s.shape}")
    kept, skipped = select_labels(y, names, min_positives, min_negatives, unit=unit)
    if not kept:
        raise too_few(y.shape[0], skipped, min_positives, min_negatives, unit=unit)
    per = {}
    for j in kept:
        m = binary_metrics(y[:, j], s[:, j])
        m["n_pos"] = int(y[:, j].sum())
        m["n_neg"] = int(y.shape[0] - m["n_pos"])
        per[names[j]] = m
    mean = {k: float(np.mean([per[n][k] for n in per])) for k in ("auroc", "f1_weighted", "accuracy", "precision")}
    return {"per_label": per, "mean": mean, "labels_used": [names[j] for j in kept], "labels_skipped": skipped}


# ----------------------------------------------------------------------------- bootstrap
def rank_auroc(y: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Row-wise AUROC of (B, N) labels and scores from average ranks (ties count one half, as
    roc_auc_score); NaN where a row has one class only."""
    from scipy.stats import rankdata

    y = np.asarray(y, dtype=bool)
    ranks = rankdata(np.asarray(s, dtype=np.float64), axis=-1)
    n_pos = y.sum(-1).astype(np.float64)
    n_neg = y.shape[-1] - n_pos
    u = (ranks * y).sum(-1) - n_pos * (n_pos + 1) / 2
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((n_pos > 0) & (n_neg > 0), u / (n_pos * n_neg), np.nan)


def weighted_f1(y: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Row-wise f1_score(average="weighted", zero_division=0) of (B, N) 0/1 labels and
    predictions (both classes' F1 weighted by their support)."""
    y = np.asarray(y, dtype=bool)
    p = np.asarray(pred, dtype=bool)
    n = y.shape[-1]
    out = np.zeros(y.shape[:-1])
    for cls_y, cls_p in ((y, p), (~y, ~p)):
        tp = (cls_y & cls_p).sum(-1)
        denom = cls_y.sum(-1) + cls_p.sum(-1)
        f1 = np.divide(2 * tp, denom, out=np.zeros(denom.shape), where=denom > 0)
        out += f1 * cls_y.sum(-1) / n
    return out


def bootstrap_ci(y_true, y_score, thresholds, *, names: Optional[Sequence[str]] = None, n_resamples: int = 1000,
                 seed: int = 0, confidence: float = 0.95) -> dict:
    """Percentile bootstrap over rows (volumes) of the label-mean AUROC and weighted F1, and of
    each label's AUROC.

    y_true (N, L) 0/1, y_score (N, L), thresholds (L,) fixed per label (from the full data).
    Each resample draws N row indices with replacement from numpy's default_rng(seed); a label
    whose resample holds one class only is left out of that resample's mean. Returns
    {"n_resamples", "seed", "confidence", "mean_auroc": {"estimate", "low", "high", "std"},
    "mean_f1_weighted": {...}, "per_label_auroc": {name: {"low", "high"}}}.
    """
    y = _as_2d_binary(y_true, "y_true")
    s = np.asarray(y_score, dtype=np.float64)
    if s.shape != y.shape:
        raise ValueError(f"y_score: expected y_true's shape {y.shape}, got {s.shape}")
    t = np.asarray(thresholds, dtype=np.float64).reshape(-1)
    if t.shape[0] != y.shape[1]:
        raise ValueError(f"thresholds: expected {y.shape[1]} values (one per label), got {t.shape[0]}")
    if not (isinstance(n_resamples, int) and n_resamples >= 1):
        raise ValueError(f"n_resamples: expected an int >= 1, got {n_resamples!r}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence: expected a value in (0, 1), got {confidence}")
    names = list(names) if names is not None else [str(j) for j in range(y.shape[1])]
    n, n_labels = y.shape
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_resamples, n))
    aurocs = np.empty((n_resamples, n_labels))
    f1s = np.empty((n_resamples, n_labels))
    for j in range(n_labels):
        yj, sj = y[idx, j], s[idx, j]
        aurocs[:, j] = rank_auroc(yj, sj)
        f1 = weighted_f1(yj, sj > t[j])
        f1[np.isnan(aurocs[:, j])] = np.nan  # same label set as the AUROC mean
        f1s[:, j] = f1
    with np.errstate(invalid="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            mean_auroc = np.nanmean(aurocs, axis=1)
            mean_f1 = np.nanmean(f1s, axis=1)
    lo_q, hi_q = (1 - confidence) / 2, 1 - (1 - confidence) / 2

    def interval(x):
        x = x[np.isfinite(x)]
        if not x.size:
            return {"estimate": float("nan"), "low": float("nan"), "high": float("nan"), "std": float("nan")}
        return {"estimate": float(x.mean()), "low": float(np.quantile(x, lo_q)), "high": float(np.quantile(x, hi_q)),
                "std": float(x.std())}

    per = {}
    for j, name in enumerate(names):
        iv = interval(aurocs[:, j])
        per[name] = {"low": iv["low"], "high": iv["high"]}
    return {"n_resamples": n_resamples, "seed": seed, "confidence": confidence,
            "mean_auroc": interval(mean_auroc), "mean_f1_weighted": interval(mean_f1), "per_label_auroc": per}


def _as_2d_binary(y, name: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 2:
        raise ValueError(f"{name}: expected (N, L) 0/1 labels, got shape {y.shape}")
    if y.size and not np.isin(y, (0, 1)).all():
        raise ValueError(f"{name}: expected 0/1 labels")
    return y.astype(bool)


# ----------------------------------------------------------------------------- retrieval
def _tie_hit_probability(m: np.ndarray, n_neg: np.ndarray, n_pos: np.ndarray) -> np.ndarray:
    """P(a positive is among the first m places) for n_pos positives and n_neg negatives in a
    uniformly random order: 1 - C(n_neg, m) / C(n_neg + n_pos, m)
    = 1 - prod_{j=1..n_pos} (n_neg - m + j) / (n_neg + j) for 0 <= m <= n_neg + 1 (m clipped
    to that range here); exactly m / (n_neg + 1) for one positive. All arrays (Q,)."""
    m = np.clip(m, 0, n_neg + 1).astype(np.float64)
    t = n_neg.astype(np.float64)
    miss = np.ones_like(m)
    for j in range(1, int(n_pos.max()) + 1):
        miss = np.where(n_pos >= j, miss * (t - m + j) / (t + j), miss)
    return np.where(n_pos == 1, m / (t + 1), 1.0 - miss)


def retrieval_metrics(sim, positives, ks: Sequence[int] = (1, 5, 10, 50)) -> dict:
    """Recall@K and ranks of a query x candidate similarity matrix.

    sim (Q, C) float; positives (Q, C) bool, at least one per row (candidates with the same
    text as the query's own count as correct).

    Ties are broken uniformly at random, in expectation. For a query, let G be the number of
    negatives scored strictly above its best positive, T the negatives scored equal to it and
    P (>= 1) the positives scored equal to it. Its recall@k is the probability that a random
    order of the tied group puts a positive within the first k - G places:
    1 - C(T, k - G) / C(T + P, k - G), i.e. clamp((k - G) / (T + 1), 0, 1) for P = 1; its rank
    is the expected one, G + 1 + T / (P + 1). So a tie with a negative is never a full hit, a
    tie among positives alone is, and a collapsed model (every score equal, one positive per
    query) gets recall@k = k / C exactly, i.e. chance, and mean rank (C + 1) / 2.
    Returns {"R@k": mean over queries for each k, "median_rank" (median of the expected ranks),
    "mean_rank", "n_queries", "n_candidates"}. ValueError on mismatched shapes, no queries or
    a query without a positive.
    """
    sim = np.asarray(sim, dtype=np.float64)
    pos = np.asarray(positives, dtype=bool)
    if sim.ndim != 2 or pos.shape != sim.shape:
        raise ValueError(f"sim, positives: expected equal (Q, C) shapes, got {sim.shape} and {pos.shape}")
    if sim.shape[0] == 0:
        raise ValueError("sim: no queries")
    if not pos.any(1).all():
        raise ValueError(f"positives: rows {np.flatnonzero(~pos.any(1))[:5].tolist()} have no positive candidate")
    best = np.where(pos, sim, -np.inf).max(1)[:, None]
    above = ((sim > best) & ~pos).sum(1)
    tied_neg = ((sim == best) & ~pos).sum(1)
    tied_pos = ((sim == best) & pos).sum(1)
    out = {f"R@{k}": float(_tie_hit_probability(k - above, tied_neg, tied_pos).mean()) for k in ks}
    ranks = above + 1 + tied_neg / (tied_pos + 1)
    out.update(median_rank=float(np.median(ranks)), mean_rank=float(ranks.mean()), n_queries=int(sim.shape[0]),
               n_candidates=int(sim.shape[1]))
    return out


# ----------------------------------------------------------------------------- segmentation
def dice_scores(pred, target, n_classes: int, *, ignore: Sequence[int] = (0,)) -> np.ndarray:
    """Dice 2|P & G| / (|P| + |G|) per class of two integer label maps of equal shape; NaN for a
    class absent from both (and for ignored classes). Returns (n_classes,) float64."""
    pa, ga = np.asarray(pred), np.asarray(target)
    if pa.shape != ga.shape:
        raise ValueError(f"pred, target: expected equal shapes, got {pa.shape} and {ga.shape}")
    p, g = pa.reshape(-1), ga.reshape(-1)

    def count(x):
        return np.bincount(x, minlength=n_classes)[:n_classes].astype(np.float64)

    inter = count(g[p == g])
    size = count(p) + count(g)
    with np.errstate(invalid="ignore", divide="ignore"):
        d = np.where(size > 0, 2 * inter / size, np.nan)
    d[list(ignore)] = np.nan
    return d
