"""PNG plots of an evaluation report (matplotlib, Agg canvas: no display, no global backend).

- ``zero_shot_auroc.png``: per-label AUROC bars with bootstrap CIs and the mean;
- ``organ_radar.png``: per-organ F1 and AUROC, zero-shot and linear probe (radar chart);
- ``f1_vs_slices.png``: weighted F1 (and AUROC) against the number of slices the encoder
  sees, point area proportional to the encoder FLOPs;
- ``embedding_map.png``: a 2-D map of the volume embeddings (UMAP when umap-learn is
  installed, PCA otherwise), one panel per abnormality, positives highlighted (one uncoloured
  panel when no abnormality was scored).

A plot whose data is missing or too thin to draw (a skipped section, fewer than two depths with a
score, fewer than three organs for a radar, no map) is not written; `unplottable` says why, and
the report keeps it under ``plots_skipped``.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from sigvlp.eval.metrics import InsufficientData, count_of
from sigvlp.fileperm import apply_umask

#: the fewest volumes a 2-D embedding map is drawn for
MIN_MAP_POINTS = 3


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
    """The organ section's per-organ F1 and AUROC on a radar (a marker on every organ; a series
    that is 0 for every organ says so in its legend entry); ValueError with fewer than 3 organs
    (a radar needs three axes)."""
    names = list(organs["organs_used"])
    if len(names) < 3:
        raise ValueError(f"organs: a radar needs >= 3 organs_used, got {len(names)}")
    angles = np.linspace(0, 2 * np.pi, len(names), endpoint=False)
    fig = _figure(6, 6)
    ax = fig.add_subplot(projection="polar")
    styles = {("zero_shot", "f1"): ("#4C72B0", "-"), ("zero_shot", "auroc"): ("#4C72B0", ":"),
              ("linear_probe", "f1"): ("#DD8452", "-"), ("linear_probe", "auroc"): ("#DD8452", ":")}
    for (part, key), (color, ls) in styles.items():
        sec = organs.get(part, {})
        if "per_organ" not in sec:
            continue
        vals = np.array([sec["per_organ"].get(n, {}).get(key, np.nan) for n in names], dtype=float)
        vals = np.nan_to_num(vals, nan=0.0)
        # markers on every organ: a series at 0 everywhere is a visible dot at the centre, and
        # its legend entry says so (a line along the centre alone would be invisible)
        zero = " (0 for every organ)" if not vals.any() else ""
        ax.plot(np.r_[angles, angles[:1]], np.r_[vals, vals[:1]], color=color, ls=ls, lw=1.5, marker="o",
                ms=3, label=f"{part.replace('_', ' ')} {key.upper()}{zero}")
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
    """One panel per name (labels (N, len(names)) 0/1: positives in red, with a legend), or one
    uncoloured panel without a legend when names is empty."""
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
        if i == 0 and len(names):
            ax.legend(fontsize=7)
    fig.suptitle(f"Volume embeddings ({method.upper()})")
    return _save(fig, Path(path))


def embedding_map(emb: np.ndarray, seed: int = 0) -> tuple[np.ndarray, str]:
    """(N, D) embeddings -> ((N, 2) coordinates, "umap" | "pca"). InsufficientData with fewer
    than MIN_MAP_POINTS rows. Zero-variance embeddings (a collapsed model) map to zeros, without
    numpy's divide warnings."""
    emb = np.asarray(emb, dtype=np.float64)
    if emb.shape[0] < MIN_MAP_POINTS:
        raise InsufficientData(f"{count_of(emb.shape[0], 'volume')}: a 2-D map needs >= {MIN_MAP_POINTS}")
    if emb.shape[0] >= 5:
        try:
            import umap  # noqa: F401

            reducer = umap.UMAP(n_components=2, random_state=seed, n_neighbors=min(15, emb.shape[0] - 1))
            return np.asarray(reducer.fit_transform(emb)), "umap"
        except ImportError:
            pass
    from sklearn.decomposition import PCA

    n = min(2, emb.shape[0], emb.shape[1])
    with np.errstate(invalid="ignore", divide="ignore"):  # explained-variance ratios of zero variance
        xy = PCA(n_components=n, random_state=seed).fit_transform(emb)
    if xy.shape[1] < 2:
        xy = np.pad(xy, ((0, 0), (0, 2 - xy.shape[1])))
    return xy, "pca"


#: the plots write_plots draws: name -> the report section it draws
PLOTS = {"zero_shot_auroc": "zero_shot", "organ_radar": "organs", "f1_vs_slices": "depth_sweep",
         "embedding_map": "embedding_map"}


def unplottable(report: dict, *, map_coords: Optional[np.ndarray] = None) -> dict:
    """{plot name: one-line reason} for each plot of PLOTS that write_plots does not draw: its
    section is absent or skipped, fewer than 3 organs (radar), fewer than 2 depths with a score
    (a curve), no map coordinates."""
    why = {}
    for name, key in PLOTS.items():
        sec = report.get(key)
        if not isinstance(sec, dict) or not sec:
            why[name] = f"no {key} section"
        elif "skipped" in sec:
            why[name] = f"the {key} section was skipped"
    organs = report.get("organs") or {}
    if "organ_radar" not in why and len(organs.get("organs_used", [])) < 3:
        why["organ_radar"] = f"{count_of(len(organs.get('organs_used', [])), 'organ')} scored, a radar needs >= 3"
    if "f1_vs_slices" not in why:
        scored = [p for p in report["depth_sweep"]["points"] if p.get("mean_f1_weighted") is not None]
        if len(scored) < 2:
            why["f1_vs_slices"] = f"{count_of(len(scored), 'depth')} with a zero-shot score, a curve needs >= 2"
    if "embedding_map" not in why and map_coords is None:
        why["embedding_map"] = "no map coordinates"
    return why


def write_plots(report: dict, out_dir, *, map_coords: Optional[np.ndarray] = None,
                map_labels: Optional[np.ndarray] = None, map_names: Sequence[str] = ()) -> dict:
    """Write every plot the report has data for under out_dir (those `unplottable` names are
    not written); returns {name: path}. map_labels (N, len(map_names)) 0/1 colour the map."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    draw = [name for name in PLOTS if name not in unplottable(report, map_coords=map_coords)]
    paths = {}
    if "zero_shot_auroc" in draw:
        paths["zero_shot_auroc"] = str(plot_auroc_bars(report["zero_shot"], out / "zero_shot_auroc.png"))
    if "organ_radar" in draw:
        paths["organ_radar"] = str(plot_organ_radar(report["organs"], out / "organ_radar.png"))
    if "f1_vs_slices" in draw:
        paths["f1_vs_slices"] = str(plot_f1_vs_slices(report["depth_sweep"], out / "f1_vs_slices.png"))
    if "embedding_map" in draw:
        method = report["embedding_map"].get("method", "pca")
        labels = map_labels if map_labels is not None else np.zeros((len(map_coords), 0))
        paths["embedding_map"] = str(plot_embedding_map(map_coords, labels, list(map_names), method,
                                                        out / "embedding_map.png"))
    return paths
