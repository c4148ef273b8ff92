"""PNG plots of an evaluation report (matplotlib, Agg canvas: no display, no global backend).

- ``zero_shot_auroc.png``: per-label AUROC bars with bootstrap CIs and the mean;
- ``organ_radar.png``: per-organ F1 and AUROC, zero-shot and linear probe (radar chart);
- ``f1_vs_slices.png``: weighted F1 (and AUROC) against the number of slices the encoder
  sees, point area proportional to the encoder FLOPs;
- ``embedding_map.png``: a 2-D map of the volume embeddings (UMAP when umap-learn is
  installed, PCA otherwise), one panel per abnormality, positives highlighted.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from sigvlp.fileperm import apply_umask


def _figure(w, h):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover
        raise ImportError("plots need matplotlib: pip install -e '.[eval]'") from e
    fig = Figure(figsize=(w, h), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    """Lay out and write the figure atomically (a temporary file beside path, then os.replace;
    the file gets the usual 0o666 & ~umask mode). tight_layout's warning for a figure it cannot
    fit is kept out of the user's console (the figure is written as laid out)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        fig.tight_layout()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".png.tmp")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png")
        apply_umask(tmp)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)  # the temporary file this call created
        raise
    return path


def plot_auroc_bars(zero_shot: dict, path) -> Path:
    per = zero_shot["per_label"]
    names = list(per)
    auc = np.array([per[n]["auroc"] for n in names])
    ci = np.array([per[n].get("auroc_ci") or [np.nan, np.nan] for n in names], dtype=float)
    lo = np.clip(auc - np.nan_to_num(ci[:, 0], nan=auc), 0, None)
    hi = np.clip(np.nan_to_num(ci[:, 1], nan=auc) - auc, 0, None)
    fig = _figure(max(6, 0.45 * len(names) + 2), 4.5)
    ax = fig.add_subplot()
    x = np.arange(len(names))
    ax.bar(x, auc, color="#4C72B0", yerr=np.stack([lo, hi]), capsize=3, ecolor="#333333")
    ax.axhline(0.5, color="grey", ls="--", lw=1, label="chance")
    ax.axhline(zero_shot["mean"]["auroc"], color="#C44E52", lw=1.2, label=f"mean {zero_shot['mean']['auroc']:.3f}")
    ax.set_xticks(x, [f"{n} ({per[n]['n_pos']})" for n in names], rotation=60, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("AUROC (95% bootstrap CI)")
    ax.set_title("Zero-shot abnormality classification")
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, Path(path))


def plot_organ_radar(organs: dict, path) -> Path:
    names = list(organs["organs_used"])
    if len(names) < 3:  # a radar needs three axes; pad with blanks
        names = names + [""] * (3 - len(names))
    angles = np.linspace(0, 2 * np.pi, len(names), endpoint=False)
    fig = _figure(6, 6)
    ax = fig.add_subplot(projection="polar")
    styles = {("zero_shot", "f1"): ("#4C72B0", "-"), ("zero_shot", "auroc"): ("#4C72B0", ":"),
              ("linear_probe", "f1"): ("#DD8452", "-"), ("linear_probe", "auroc"): ("#DD8452", ":")}
    for (part, key), (color, ls) in styles.items():
        sec = organs.get(part, {})
        if "per_organ" not in sec:
            continue
        vals = np.array([sec["per_organ"].get(n, {}).get(key, np.nan) if n else np.nan for n in names], dtype=float)
        vals = np.nan_to_num(vals, nan=0.0)
        ax.plot(np.r_[angles, angles[:1]], np.r_[vals, vals[:1]], color=color, ls=ls, lw=1.5,
                label=f"{part.replace('_', ' ')} {key.upper()}")
        if key == "f1":
            ax.fill(np.r_[angles, angles[:1]], np.r_[vals, vals[:1]], color=color, alpha=0.1)
    ax.set_xticks(angles, names, fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_title("Organ presence per chunk")
    ax.legend(loc="upper right", bbox_to_anchor=(1.25, 1.1), fontsize=7)
    return _save(fig, Path(path))


def plot_f1_vs_slices(sweep: dict, path) -> Path:
    pts = sweep["points"]
    s = np.array([p["slices"] for p in pts], dtype=float)
    f1 = np.array([np.nan if p["mean_f1_weighted"] is None else p["mean_f1_weighted"] for p in pts], dtype=float)
    auc = np.array([np.nan if p["mean_auroc"] is None else p["mean_auroc"] for p in pts], dtype=float)
    flops = np.array([p["encoder_flops"] for p in pts], dtype=float)
    size = 30 + 400 * flops / max(flops.max(), 1.0)
    fig = _figure(6.5, 4.5)
    ax = fig.add_subplot()
    ax.plot(s, f1, color="#4C72B0", lw=1)
    ax.scatter(s, f1, s=size, color="#4C72B0", alpha=0.7, label="weighted F1 (area = encoder FLOPs)")
    ax.plot(s, auc, color="#55A868", lw=1, ls="--", marker="o", ms=3, label="AUROC")
    for si, fi, fl in zip(s, f1, flops):
        if np.isfinite(fi):
            ax.annotate(f"{fl / 1e9:.3g} GF", (si, fi), textcoords="offset points", xytext=(0, 9), ha="center",
                        fontsize=7)
    ax.set_xscale("log", base=2)
    ax.set_xticks(s, [str(int(v)) for v in s])
    ax.minorticks_off()
    ax.set_xlabel("slices seen by the encoder")
    ax.set_ylabel("zero-shot score (label mean)")
    ax.set_ylim(0, 1)
    ax.set_title("F1 vs number of slices")
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, Path(path))


def plot_embedding_map(coords: np.ndarray, labels: np.ndarray, names: Sequence[str], method: str, path,
                       max_panels: int = 6) -> Path:
    coords = np.asarray(coords)
    labels = np.asarray(labels)
    k = min(max(len(names), 1), max_panels)
    cols = min(3, k)
    rows = -(-k // cols)
    fig = _figure(3.2 * cols, 3.0 * rows)
    for i in range(k):
        ax = fig.add_subplot(rows, cols, i + 1)
        if len(names):
            on = labels[:, i].astype(bool)
            ax.scatter(coords[~on, 0], coords[~on, 1], s=8, c="#BBBBBB", label="absent")
            ax.scatter(coords[on, 0], coords[on, 1], s=10, c="#C44E52", label="present")
            ax.set_title(names[i], fontsize=9)
        else:
            ax.scatter(coords[:, 0], coords[:, 1], s=8)
        ax.set_xticks([])
        ax.set_yticks([])
        if i == 0:
            ax.legend(fontsize=7)
    fig.suptitle(f"Volume embeddings ({method.upper()})")
    return _save(fig, Path(path))


def embedding_map(emb: np.ndarray, seed: int = 0) -> tuple[np.ndarray, str]:
    """(N, D) embeddings -> ((N, 2) coordinates, "umap" | "pca")."""
    emb = np.asarray(emb, dtype=np.float64)
    if emb.shape[0] >= 5:
        try:
            import umap  # noqa: F401

            reducer = umap.UMAP(n_components=2, random_state=seed, n_neighbors=min(15, emb.shape[0] - 1))
            return np.asarray(reducer.fit_transform(emb)), "umap"
        except ImportError:
            pass
    from sklearn.decomposition import PCA

    n = min(2, emb.shape[0], emb.shape[1])
    xy = PCA(n_components=n, random_state=seed).fit_transform(emb)
    if xy.shape[1] < 2:
        xy = np.pad(xy, ((0, 0), (0, 2 - xy.shape[1])))
    return xy, "pca"


def write_plots(report: dict, out_dir, *, map_coords: Optional[np.ndarray] = None,
                map_labels: Optional[np.ndarray] = None, map_names: Sequence[str] = ()) -> dict:
    """Write every plot the report has data for under out_dir; returns {name: path}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}

    def ok(key):
        sec = report.get(key)
        return isinstance(sec, dict) and sec and set(sec) != {"skipped"}

    if ok("zero_shot"):
        paths["zero_shot_auroc"] = str(plot_auroc_bars(report["zero_shot"], out / "zero_shot_auroc.png"))
    if ok("organs") and report["organs"].get("organs_used"):
        paths["organ_radar"] = str(plot_organ_radar(report["organs"], out / "organ_radar.png"))
    if ok("depth_sweep") and report["depth_sweep"]["points"]:
        paths["f1_vs_slices"] = str(plot_f1_vs_slices(report["depth_sweep"], out / "f1_vs_slices.png"))
    if map_coords is not None:
        method = report.get("embedding_map", {}).get("method", "pca")
        labels = map_labels if map_labels is not None else np.zeros((len(map_coords), 0))
        paths["embedding_map"] = str(plot_embedding_map(map_coords, labels, list(map_names), method,
                                                        out / "embedding_map.png"))
    return paths
