"""Report sections from arrays: embeddings, labels and scores in, report dicts out.

The model-facing code (sigvlp.eval.suite) computes embeddings; everything here is numpy +
scikit-learn, so each section can be tested on fixed arrays.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from sigvlp.eval.metrics import (InsufficientData, bootstrap_ci, count_of, ctclip_threshold, detection_metrics,
                                 dice_scores, multilabel_metrics, retrieval_metrics, select_labels, too_few)


def pair_probability(emb: np.ndarray, pos_text: np.ndarray, neg_text: np.ndarray, logit_scale: float,
                     logit_bias: float = 0.0) -> np.ndarray:
    """CT-CLIP's two-way softmax over the model's logits for a prompt pair.

    emb (N, D) normalised image embeddings; pos_text / neg_text (L, D) normalised embeddings of
    the "present" / "not present" prompts of L labels; logits = logit_scale * cos + logit_bias
    (the bias cancels in the softmax). Returns (N, L) float64 probabilities of "present".
    """
    emb = np.asarray(emb, dtype=np.float64)
    lp = logit_scale * emb @ np.asarray(pos_text, dtype=np.float64).T + logit_bias
    ln = logit_scale * emb @ np.asarray(neg_text, dtype=np.float64).T + logit_bias
    # softmax([lp, ln])[0] = 1 / (1 + exp(ln - lp)) = sigmoid(lp - ln), computed stably
    from scipy.special import expit

    return expit(lp - ln)


def zero_shot_section(y_true, scores, names: Sequence[str], prompts: Sequence[str], *, min_positives: int = 5,
                      min_negatives: int = 5, n_bootstrap: int = 1000, seed: int = 0) -> dict:
    """Zero-shot abnormality section: multilabel_metrics + bootstrap CIs (mean AUROC, mean
    weighted F1, per-label AUROC) over the labels used. InsufficientData (its entry() is the
    skipped section, with labels_skipped) when no label has enough positive and negative volumes."""
    out = multilabel_metrics(y_true, scores, list(names), min_positives=min_positives, min_negatives=min_negatives,
                             unit="volume")
    cols = [list(names).index(n) for n in out["labels_used"]]
    y = np.asarray(y_true)[:, cols]
    s = np.asarray(scores, dtype=np.float64)[:, cols]
    thr = [out["per_label"][n]["threshold"] for n in out["labels_used"]]
    bs = bootstrap_ci(y, s, thr, names=out["labels_used"], n_resamples=n_bootstrap, seed=seed)
    for n in out["labels_used"]:
        ci = bs["per_label_auroc"][n]
        out["per_label"][n]["auroc_ci"] = [ci["low"], ci["high"]]
    out["bootstrap"] = bs
    out["prompts"] = list(prompts)
    out["protocol"] = ("CT-CLIP: two-way softmax of the logits of the prompt pair; per-label threshold minimising "
                       "sqrt((1-TPR)^2+FPR^2) on np.linspace(0,1,100), score > threshold, ties to the larger "
                       "threshold; sklearn AUROC, weighted F1, accuracy, positive-class precision; means over "
                       "labels_used; bootstrap over volumes with thresholds fixed")
    out["n_volumes"] = int(np.asarray(y_true).shape[0])
    return out


def _organ_block(y: np.ndarray, s: np.ndarray, names: Sequence[str], thresholds: Optional[Sequence[float]]) -> dict:
    per = {}
    for j, name in enumerate(names):
        t = ctclip_threshold(y[:, j], s[:, j]) if thresholds is None else thresholds[j]
        m = detection_metrics(y[:, j], s[:, j], t)
        m["n_pos"] = int(y[:, j].sum())
        m["n_neg"] = int(y.shape[0] - m["n_pos"])
        per[name] = m
    mean = {k: float(np.mean([m[k] for m in per.values()])) for k in ("auroc", "precision", "recall", "f1")}
    return {"per_organ": per, "mean": mean}


def fit_linear_probe(x_train, y_train, x_test, *, seed: int = 0, c: float = 1.0) -> np.ndarray:
    """One logistic regression per column of y_train (N, K) 0/1 on standardised features.
    Returns (M, K) probabilities for x_test; a column with one class in train yields NaN."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x_train = np.asarray(x_train, dtype=np.float64)
    x_test = np.asarray(x_test, dtype=np.float64)
    y_train = np.asarray(y_train)
    out = np.full((x_test.shape[0], y_train.shape[1]), np.nan)
    with _one_blas_thread():
        for j in range(y_train.shape[1]):
            if len(np.unique(y_train[:, j])) < 2:
                continue
            clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000, random_state=seed))
            clf.fit(x_train, y_train[:, j])
            out[:, j] = clf.predict_proba(x_test)[:, 1]
    return out


def _one_blas_thread():
    """BLAS on one thread for the small scikit-learn fits: next to torch's own thread pool,
    multi-threaded BLAS oversubscribes the cores (measured 7x slower on 2 busy cores)."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


def organ_section(y_true, zs_scores, names: Sequence[str], prompts: Sequence[str], *, probe_train=None,
                  probe_scores=None, min_positives: int = 5, min_negatives: int = 5) -> dict:
    """Organ presence per chunk: zero-shot (two-way softmax, CT-CLIP threshold rule) and the
    linear probe (probabilities at 0.5, the logistic regression's decision). y_true (M, O) 0/1
    on the evaluated chunks; zs_scores / probe_scores (M, O); probe_train (N, O) the train
    chunks' labels (an organ needs both classes there too). InsufficientData (entry() with
    organs_skipped) when no organ has enough positive and negative chunks."""
    y = np.asarray(y_true)
    kept, skipped = select_labels(y, list(names), min_positives, min_negatives, unit="chunk")
    if not kept:
        raise too_few(y.shape[0], skipped, min_positives, min_negatives, what="organ", unit="chunk",
                      detail_key="organs_skipped")
    used = [names[j] for j in kept]
    out = {"organs_used": used, "organs_skipped": skipped, "n_chunks": int(y.shape[0])}
    zs = _organ_block(y[:, kept], np.asarray(zs_scores)[:, kept], used, None)
    zs["prompts"] = list(prompts)
    zs["threshold_rule"] = "CT-CLIP grid rule per organ"
    out["zero_shot"] = zs
    if probe_scores is not None:
        probe_scores = np.asarray(probe_scores)
        fitted = [j for j in kept if np.isfinite(probe_scores[:, j]).all()]  # both classes among train chunks
        if fitted:
            lp = _organ_block(y[:, fitted], probe_scores[:, fitted], [names[j] for j in fitted], [0.5] * len(fitted))
            lp["threshold_rule"] = "probability > 0.5"
            lp["n_train"] = int(np.asarray(probe_train).shape[0]) if probe_train is not None else None
            lp["not_fitted"] = [names[j] for j in kept if j not in fitted]
            out["linear_probe"] = lp
        else:
            out["linear_probe"] = {"skipped": "no organ has both classes among the train chunks"}
    else:
        out["linear_probe"] = {"skipped": "no train split embeddings"}
    return out


def nontrivial_recall(metrics: dict) -> dict:
    """retrieval_metrics' output with each R@k for k >= n_candidates replaced by {"skipped":
    "k >= C candidates: trivially 1"}: every candidate is among the first k, so the recall is 1
    whatever the model (R@5 of 3 volumes says nothing). Returns metrics (changed in place)."""
    n = metrics["n_candidates"]
    for key in [k for k in metrics if k.startswith("R@")]:
        k = int(key[2:])
        if k >= n:
            metrics[key] = {"skipped": f"{k} >= {count_of(n, 'candidate')}: trivially 1"}
    return metrics


def _recall(sim, positives, ks) -> dict:
    return nontrivial_recall(retrieval_metrics(sim, positives, ks))


def retrieval_section(vol_emb, report_emb, report_texts: Sequence[str], chunk_emb=None, chunk_text_emb=None,
                      chunk_texts: Optional[Sequence[str]] = None, ks=(1, 5, 10, 50)) -> dict:
    """Volume <-> report retrieval (both directions) and chunk -> organ-text retrieval over the
    split. Identical texts count as correct for each other's queries. Needs >= 2 volumes
    (InsufficientData otherwise: one candidate is always found); chunk retrieval with fewer than
    2 chunks with text is {"skipped": reason}. An R@k with k >= the candidates is not a number
    but {"skipped": reason} (nontrivial_recall)."""
    def same_text(a, b):
        a, b = np.asarray(a, dtype=object), np.asarray(b, dtype=object)
        return a[:, None] == b[None, :]

    v = np.asarray(vol_emb, dtype=np.float64)
    if v.shape[0] < 2:
        raise InsufficientData(f"{count_of(v.shape[0], 'volume')} with report text: retrieval needs >= 2")
    r = np.asarray(report_emb, dtype=np.float64)
    sim = v @ r.T
    pos = same_text(report_texts, report_texts)
    out = {"volume_to_report": _recall(sim, pos, ks), "report_to_volume": _recall(sim.T, pos.T, ks)}
    if chunk_emb is not None and chunk_texts is not None and len(chunk_texts):
        keep = np.array([bool(t) for t in chunk_texts])
        if keep.sum() >= 2:
            c = np.asarray(chunk_emb, dtype=np.float64)[keep]
            t = np.asarray(chunk_text_emb, dtype=np.float64)[keep]
            texts = [x for x, k in zip(chunk_texts, keep) if k]
            out["chunk_to_organ_text"] = _recall(c @ t.T, same_text(texts, texts), ks)
            out["chunk_to_organ_text"]["n_without_text"] = int((~keep).sum())
        else:
            out["chunk_to_organ_text"] = {"skipped": f"{count_of(int(keep.sum()), 'chunk')} with organ text "
                                                     "(needs >= 2; organ text comes from the findings bank)"}
    else:
        out["chunk_to_organ_text"] = {"skipped": "no chunks"}
    return out


# ----------------------------------------------------------------------------- segmentation probe
def fit_segmentation_probe(features, labels, *, n_classes: int, seed: int = 0, max_tokens: int = 20000,
                           c: float = 1.0):
    """Multinomial logistic regression from token features (N, width) to patch organ labels
    (N,) in [0, n_classes) (0 = background); at most max_tokens tokens, drawn with the seed.
    Returns a fitted sklearn pipeline. InsufficientData when the labels hold one class only."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = np.asarray(features, dtype=np.float32)
    y = np.asarray(labels, dtype=np.int64)
    if x.shape[0] != y.shape[0] or x.ndim != 2:
        raise ValueError(f"features, labels: expected (N, width) and (N,), got {x.shape} and {y.shape}")
    if len(np.unique(y)) < 2:
        raise InsufficientData("the segmentation probe needs >= 2 classes among the train patches, found "
                               f"{len(np.unique(y))}")
    if x.shape[0] > max_tokens:
        idx = np.random.default_rng(seed).choice(x.shape[0], max_tokens, replace=False)
        x, y = x[idx], y[idx]
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=300, random_state=seed))
    with _one_blas_thread():
        clf.fit(x, y)
    return clf


def predict_voxels(probe, features, grid_thw: Sequence[int], patch: Sequence[int], depth: int,
                   n_classes: int) -> np.ndarray:
    """Token features (T*H*W, width) in t-major order -> (depth, H*ph, W*pw) organ labels:
    class probabilities per patch, trilinearly upsampled to voxels, argmax."""
    import torch
    import torch.nn.functional as F

    t, h, w = (int(g) for g in grid_thw)
    proba = np.zeros((t * h * w, n_classes), dtype=np.float32)
    with _one_blas_thread():
        proba[:, probe.classes_] = probe.predict_proba(np.asarray(features, dtype=np.float32))
    x = torch.from_numpy(proba.reshape(t, h, w, n_classes)).permute(3, 0, 1, 2)[None]
    size = (t * patch[0], h * patch[1], w * patch[2])
    up = F.interpolate(x, size=size, mode="trilinear", align_corners=False)[0]
    return up.argmax(0)[:depth].numpy()


def segmentation_section(dice_inter: np.ndarray, dice_size: np.ndarray, organ_names: Sequence[str], **extra) -> dict:
    """Dice per organ from intersections and |P| + |G| summed over the split's voxels
    (index 0 = background, left out)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        d = np.where(dice_size > 0, 2 * dice_inter / dice_size, np.nan)
    per = {name: float(d[i + 1]) for i, name in enumerate(organ_names) if dice_size[i + 1] > 0}
    vals = [v for v in per.values() if np.isfinite(v)]
    return {"per_organ_dice": per, "mean_dice": float(np.mean(vals)) if vals else float("nan"),
            "dice": "over all voxels of the split, per organ", **extra}


def dice_counts(pred, target, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(intersection, |P| + |G|) per class of two label maps, for accumulating Dice."""
    p = np.asarray(pred).reshape(-1)
    g = np.asarray(target).reshape(-1)
    inter = np.bincount(g[p == g], minlength=n_classes)[:n_classes]
    size = np.bincount(p, minlength=n_classes)[:n_classes] + np.bincount(g, minlength=n_classes)[:n_classes]
    return inter.astype(np.float64), size.astype(np.float64)


def depth_sweep_point(slices: int, tokens: int, flops: dict, y_true, scores, names: Sequence[str]) -> dict:
    """One point of the F1-vs-slices curve: the zero-shot label means (thresholds picked by the
    CT-CLIP rule at this depth) over `names` (the main section's labels_used), with the encoder
    FLOPs of one volume at this depth (flops: {"total", "counted", "attention_analytic"})."""
    y = np.asarray(y_true)
    s = np.asarray(scores, dtype=np.float64)
    aurocs, f1s = [], []
    for j in range(len(names)):
        if 0 < y[:, j].sum() < y.shape[0]:
            from sigvlp.eval.metrics import binary_metrics

            m = binary_metrics(y[:, j], s[:, j])
            aurocs.append(m["auroc"])
            f1s.append(m["f1_weighted"])
    return {"slices": int(slices), "tokens": int(tokens), "encoder_flops": float(flops["total"]),
            "flops_counted": float(flops.get("counted", 0.0)),
            "flops_attention_analytic": float(flops.get("attention_analytic", 0.0)),
            "mean_auroc": float(np.mean(aurocs)) if aurocs else None,
            "mean_f1_weighted": float(np.mean(f1s)) if f1s else None,
            "n_labels": len(aurocs), "n_volumes": int(y.shape[0])}


__all__ = ["dice_scores", "pair_probability", "zero_shot_section", "organ_section", "retrieval_section",
           "nontrivial_recall", "fit_linear_probe", "fit_segmentation_probe", "predict_voxels",
           "segmentation_section", "dice_counts", "depth_sweep_point"]
