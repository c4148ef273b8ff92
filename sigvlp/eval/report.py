"""The evaluation report: its JSON schema, a checker, the stdout table and the writer.

Top-level keys of a report (``SCHEMA`` = "sigvlp.eval/2"). A section (or part of one) that was
not run or cannot be computed holds {"skipped": reason, ...}: the reason is one line of text (at
most SKIP_REASON_MAX characters, never a dict's repr), beside structured details where there are
some (e.g. a skipped zero_shot keeps "labels_skipped"). Each label or organ that is not scored is
{"positives", "negatives", "skipped": reason} under labels_skipped / organs_skipped.

- ``schema``, ``seconds``, ``device``
- ``checkpoint``: {"path", "sha256" (of model.safetensors + config.json), "config"}
- ``dataset``: {"root", "split", "train_split", "n_volumes", "n_chunks", "skipped"}, and when the
  probes' train split failed to open "train_error" (one line) and "train_error_detail" (the
  error's further lines, e.g. the scan's unusable files)
- ``config``: the EvalConfig used (prompts, labels, thresholds of the protocol, seeds, ...)
- ``zero_shot``: {"protocol", "prompts", "labels_used", "labels_skipped": {label: {"positives",
  "negatives", "skipped"}}, "per_label": {label:
  {auroc, f1_weighted, accuracy, precision, threshold, n_pos, n_neg, auroc_ci}}, "mean":
  {auroc, f1_weighted, accuracy, precision}, "bootstrap": bootstrap_ci(...)}
- ``organs``: {"organs_used", "organs_skipped", "zero_shot": {"prompts", "per_organ": {organ:
  {auroc, precision, recall, f1, threshold, n_pos, n_neg}}, "mean"}, "linear_probe": {...same,
  "n_train"}}
- ``retrieval``: {"volume_to_report", "report_to_volume", "chunk_to_organ_text"}: each
  {"R@1", "R@5", "R@10", "R@50", "median_rank", "mean_rank", "n_queries", "n_candidates"}; an
  R@k with k >= n_candidates is {"skipped": "k >= C candidates: trivially 1"}, never a number
- ``segmentation``: {"per_organ_dice": {organ: dice}, "mean_dice", "n_train_tokens", ...}
- ``depth_sweep``: {"points": [{"slices", "tokens", "encoder_flops", "flops_counted",
  "flops_attention_analytic", "mean_auroc", "mean_f1_weighted", "n_volumes"}]}
- ``embedding_map``: {"method": "umap" | "pca", "n"}
- ``plots``: {name: path}; ``plots_skipped`` (when plots were requested): {name: reason} for each
  plot not written because its data is missing or too thin (sigvlp.eval.plots.unplottable)
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

from sigvlp.fileperm import apply_umask

SCHEMA = "sigvlp.eval/2"
SKIP_REASON_MAX = 200
SECTIONS = ("zero_shot", "organs", "retrieval", "segmentation", "depth_sweep", "embedding_map")
_TOP = {"schema": str, "seconds": (int, float), "device": str, "checkpoint": dict, "dataset": dict, "config": dict,
        "plots": dict, **{s: dict for s in SECTIONS}}
_ZS_LABEL_KEYS = ("auroc", "f1_weighted", "accuracy", "precision", "threshold", "n_pos", "n_neg")
_RETRIEVAL_KEYS = ("R@1", "R@5", "R@10", "R@50", "median_rank", "mean_rank", "n_queries", "n_candidates")
_ORGAN_KEYS = ("auroc", "precision", "recall", "f1", "threshold", "n_pos", "n_neg")


def _need(obj: dict, keys, where: str):
    missing = [k for k in keys if k not in obj]
    if missing:
        raise ValueError(f"report: {where} lacks {missing}")


def _num(x, where: str):
    if not isinstance(x, (int, float)) or isinstance(x, bool):
        raise ValueError(f"report: {where} must be a number, got {type(x).__name__}")


def _skipped(section) -> bool:
    return isinstance(section, dict) and "skipped" in section


def check_skipped(entry, where: str) -> None:
    """ValueError unless entry is {"skipped": reason, ...} with reason one line of text of at most
    SKIP_REASON_MAX characters that is not a dict's repr (structured details go beside it)."""
    reason = entry.get("skipped") if isinstance(entry, dict) else None
    if not isinstance(reason, str) or not reason.strip():
        raise ValueError(f"report: {where}.skipped must be a non-empty string, got {type(reason).__name__}")
    if "\n" in reason or len(reason) > SKIP_REASON_MAX or "{'" in reason or '{"' in reason:
        raise ValueError(f"report: {where}.skipped must be one line of at most {SKIP_REASON_MAX} characters "
                         f"without a dict in it, got {reason[:80]!r}...")


def _check_skips(report: dict) -> None:
    """check_skipped on every skipped section, part, label, organ and plot of the report."""
    for key in SECTIONS:
        sec = report[key]
        if _skipped(sec):
            check_skipped(sec, key)
        for part, value in sec.items():
            if isinstance(value, dict) and _skipped(value):
                check_skipped(value, f"{key}.{part}")
        for group in ("labels_skipped", "organs_skipped"):
            for name, entry in sec.get(group, {}).items():
                check_skipped(entry, f"{key}.{group}[{name!r}]")
                _need(entry, ("positives", "negatives"), f"{key}.{group}[{name!r}]")
    plots_skipped = report.get("plots_skipped", {})
    if not isinstance(plots_skipped, dict):
        raise ValueError(f"report: 'plots_skipped' has type {type(plots_skipped).__name__}")
    for name, reason in plots_skipped.items():
        check_skipped({"skipped": reason}, f"plots_skipped[{name!r}]")


def _check_recalls(m: dict, where: str) -> None:
    """Each R@k of a retrieval part is a number for k < n_candidates and {"skipped": reason} for
    k >= n_candidates (every candidate is within the first k: trivially 1)."""
    n = m["n_candidates"]
    _num(n, f"{where}.n_candidates")
    for key, value in m.items():
        if not (key.startswith("R@") and key[2:].isdigit()):
            continue
        if int(key[2:]) >= n:
            if not _skipped(value):
                raise ValueError(f"report: {where}.{key} with {n} candidates is trivially 1; expected "
                                 f"{{'skipped': reason}}, got {value!r}")
            check_skipped(value, f"{where}.{key}")
        else:
            _num(value, f"{where}.{key}")


def validate_report(report: dict) -> dict:
    """Check a report (dict or the JSON text's parse) against the schema in this module's
    docstring; returns it. ValueError names the first missing key or wrong type."""
    if not isinstance(report, dict):
        raise ValueError(f"report: expected a dict, got {type(report).__name__}")
    for key, typ in _TOP.items():
        if key not in report:
            raise ValueError(f"report: missing top-level key {key!r}")
        if not isinstance(report[key], typ):
            raise ValueError(f"report: {key!r} has type {type(report[key]).__name__}")
    if report["schema"] != SCHEMA:
        raise ValueError(f"report: schema {report['schema']!r}, expected {SCHEMA!r}")
    _need(report["checkpoint"], ("path", "sha256", "config"), "checkpoint")
    _need(report["dataset"], ("root", "split", "n_volumes"), "dataset")
    train_error = report["dataset"].get("train_error")
    if train_error is not None and (not isinstance(train_error, str) or "\n" in train_error):
        raise ValueError("report: dataset.train_error must be one line of text (details go in "
                         "dataset.train_error_detail)")
    _check_skips(report)
    zs = report["zero_shot"]
    if not _skipped(zs):
        _need(zs, ("prompts", "labels_used", "labels_skipped", "per_label", "mean", "bootstrap"), "zero_shot")
        if sorted(zs["per_label"]) != sorted(zs["labels_used"]):
            raise ValueError("report: zero_shot per_label and labels_used disagree")
        for name, m in zs["per_label"].items():
            _need(m, _ZS_LABEL_KEYS, f"zero_shot.per_label[{name!r}]")
            for k in _ZS_LABEL_KEYS:
                _num(m[k], f"zero_shot.per_label[{name!r}].{k}")
        _need(zs["mean"], ("auroc", "f1_weighted", "accuracy", "precision"), "zero_shot.mean")
        _need(zs["bootstrap"], ("n_resamples", "seed", "mean_auroc", "mean_f1_weighted"), "zero_shot.bootstrap")
    org = report["organs"]
    if not _skipped(org):
        for part in ("zero_shot", "linear_probe"):
            sec = org.get(part)
            if sec is None:
                raise ValueError(f"report: organs lacks {part!r}")
            if _skipped(sec):
                continue
            _need(sec, ("per_organ", "mean"), f"organs.{part}")
            for name, m in sec["per_organ"].items():
                _need(m, _ORGAN_KEYS, f"organs.{part}.per_organ[{name!r}]")
    ret = report["retrieval"]
    if not _skipped(ret):
        for part in ("volume_to_report", "report_to_volume", "chunk_to_organ_text"):
            if part not in ret:
                raise ValueError(f"report: retrieval lacks {part!r}")
            if not _skipped(ret[part]):
                _need(ret[part], _RETRIEVAL_KEYS, f"retrieval.{part}")
                _check_recalls(ret[part], f"retrieval.{part}")
    seg = report["segmentation"]
    if not _skipped(seg):
        _need(seg, ("per_organ_dice", "mean_dice"), "segmentation")
    sweep = report["depth_sweep"]
    if not _skipped(sweep):
        _need(sweep, ("points",), "depth_sweep")
        for i, p in enumerate(sweep["points"]):
            _need(p, ("slices", "tokens", "encoder_flops", "mean_auroc", "mean_f1_weighted"),
                  f"depth_sweep.points[{i}]")
    return report


def _clean(obj):
    """JSON-safe copy: numpy scalars to Python, NaN/inf to None."""
    import numpy as np

    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _clean(obj.tolist())
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_report(report: dict, path) -> Path:
    """Write the report as JSON (atomically; NaN written as null). Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_clean(report), indent=1, allow_nan=False)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    apply_umask(tmp)  # mkstemp creates 0600; give the report the usual 0o666 & ~umask
    os.replace(tmp, path)
    return path


def _f(x, nd=3) -> str:
    """x to nd decimals; "-" for None, NaN/inf and a skipped entry."""
    if x is None or _skipped(x) or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:.{nd}f}" if isinstance(x, float) else str(x)


def _table(header, rows) -> list[str]:
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(header)]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    out += ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    return out


def _trivial_recall_lines(ret: dict) -> list[str]:
    """One line per retrieval part whose R@k are skipped as trivial (k >= its candidates)."""
    lines = []
    for name, m in ret.items():
        if not isinstance(m, dict) or _skipped(m):
            continue
        keys = [k for k, v in m.items() if k.startswith("R@") and _skipped(v)]
        if keys:
            lines.append(f"{name}: {', '.join(keys)} not reported (k >= {m['n_candidates']} candidates: "
                         "trivially 1)")
    return lines


def _not_scored(what: str, skipped, config: dict, unit: str) -> list[str]:
    """One line naming the labels/organs left out for too few positive or negative `unit`s
    (positives/negatives each), or none when nothing was left out."""
    if not skipped:
        return []
    rule = f"< {config.get('min_positives', '?')} positive or < {config.get('min_negatives', '?')} negative {unit}"
    return [f"{what} not scored ({rule}; positives/negatives): "
            + ", ".join(f"{k} ({v['positives']}/{v['negatives']})" for k, v in skipped.items())]


def _organ_lines(org: dict) -> list[str]:
    """The organ section's table (zero-shot | linear probe) and a line per skipped part."""
    lines = ["", "Organ classification (chunks): zero-shot | linear probe"]
    zso, lp = org.get("zero_shot", {}), org.get("linear_probe", {})
    rows = []
    for name in org.get("organs_used", []):
        a = zso.get("per_organ", {}).get(name, {})
        b = lp.get("per_organ", {}).get(name, {})
        rows.append([name, a.get("n_pos", b.get("n_pos", "")), _f(a.get("auroc")), _f(a.get("f1")),
                     _f(b.get("auroc")), _f(b.get("precision")), _f(b.get("recall")), _f(b.get("f1"))])
    rows.append(["MEAN", "", _f(zso.get("mean", {}).get("auroc")), _f(zso.get("mean", {}).get("f1")),
                 _f(lp.get("mean", {}).get("auroc")), _f(lp.get("mean", {}).get("precision")),
                 _f(lp.get("mean", {}).get("recall")), _f(lp.get("mean", {}).get("f1"))])
    lines += _table(["organ", "pos", "zs AUROC", "zs F1", "lp AUROC", "lp prec", "lp rec", "lp F1"], rows)
    lines += [f"organs.{part}: skipped ({org[part]['skipped']})" for part in ("zero_shot", "linear_probe")
              if _skipped(org.get(part))]
    return lines


def _retrieval_lines(ret: dict) -> list[str]:
    """The retrieval table ("-" for a trivial R@k) and a line per part with trivial R@k skipped."""
    lines = ["", "Retrieval"]
    rows = []
    for name, m in ret.items():
        if not isinstance(m, dict):
            continue
        if _skipped(m):
            rows.append([name, "skipped: " + m["skipped"], "", "", "", "", ""])
            continue
        rows.append([name, m["n_queries"], _f(m["R@1"]), _f(m["R@5"]), _f(m["R@10"]), _f(m["R@50"]),
                     _f(m["median_rank"], 1)])
    lines += _table(["direction", "queries", "R@1", "R@5", "R@10", "R@50", "median rank"], rows)
    lines += _trivial_recall_lines(ret)
    return lines


def format_table(report: dict) -> str:
    """A readable multi-section text table of a report."""
    lines = []
    ds, ck = report.get("dataset", {}), report.get("checkpoint", {})
    lines.append(f"checkpoint {ck.get('path')} (sha256 {str(ck.get('sha256'))[:12]}), data {ds.get('root')} "
                 f"split {ds.get('split')}: {ds.get('n_volumes')} volumes")
    if ds.get("train_error"):
        lines.append(f"probe split {ds.get('train_split')!r} not opened: {ds['train_error']}")
    zs = report.get("zero_shot", {})
    if zs and not _skipped(zs):
        lines.append("")
        lines.append(f"Zero-shot abnormality classification (prompts {zs['prompts'][0]!r} / {zs['prompts'][1]!r})")
        rows = []
        for name, m in zs["per_label"].items():
            ci = m.get("auroc_ci") or [None, None]
            rows.append([name, m["n_pos"], m["n_neg"], _f(m["auroc"]), f"[{_f(ci[0])}, {_f(ci[1])}]",
                         _f(m["f1_weighted"]), _f(m["accuracy"]), _f(m["precision"]), _f(m["threshold"], 2)])
        mean = zs["mean"]
        bs = zs.get("bootstrap", {}).get("mean_auroc", {})
        rows.append(["MEAN", "", "", _f(mean["auroc"]), f"[{_f(bs.get('low'))}, {_f(bs.get('high'))}]",
                     _f(mean["f1_weighted"]), _f(mean["accuracy"]), _f(mean["precision"]), ""])
        lines += _table(["label", "pos", "neg", "AUROC", "95% CI", "F1(w)", "acc", "prec", "thr"], rows)
        lines += _not_scored("labels", zs.get("labels_skipped"), report.get("config", {}), "volumes")
    org = report.get("organs", {})
    if org and not _skipped(org):
        lines += _organ_lines(org)
        lines += _not_scored("organs", org.get("organs_skipped"), report.get("config", {}), "chunks")
    ret = report.get("retrieval", {})
    if ret and not _skipped(ret):
        lines += _retrieval_lines(ret)
    seg = report.get("segmentation", {})
    if seg and not _skipped(seg):
        lines.append("")
        lines.append(f"Segmentation probe (Dice per organ, voxels): mean {_f(seg['mean_dice'])}")
        lines += _table(["organ", "Dice"], [[k, _f(v)] for k, v in seg["per_organ_dice"].items()])
    sweep = report.get("depth_sweep", {})
    if sweep and not _skipped(sweep):
        lines.append("")
        lines.append("Variable depth (slices the encoder sees)")
        rows = [[p["slices"], p["tokens"], f"{p['encoder_flops'] / 1e9:.3g}", _f(p["mean_auroc"]),
                 _f(p["mean_f1_weighted"])] for p in sweep["points"]]
        lines += _table(["slices", "tokens", "GFLOPs", "AUROC", "F1(w)"], rows)
    for key in SECTIONS:
        sec = report.get(key)
        if isinstance(sec, dict) and _skipped(sec):
            lines.append(f"{key}: skipped ({sec['skipped']})")
    if report.get("plots") or report.get("plots_skipped"):
        lines.append("")
    if report.get("plots"):
        lines.append("plots: " + ", ".join(str(p) for p in report["plots"].values()))
    if report.get("plots_skipped"):
        lines.append("plots not written: " + "; ".join(f"{k} ({v})" for k, v in report["plots_skipped"].items()))
    return "\n".join(lines)
