"""The evaluation suite: zero-shot abnormality classification (CT-CLIP's protocol), organ
classification (zero-shot and linear probe), retrieval, a segmentation probe, the variable
depth sweep with encoder FLOPs, a JSON report, a table and plots. ``sigvlp eval`` runs it.

Needs the ``eval`` extra (scikit-learn, matplotlib). Names are imported on first use, so the
CLI parser stays cheap and ``import sigvlp.eval`` needs neither.
"""

import importlib

_EXPORTS = {
    "sigvlp.eval.metrics": ["binary_metrics", "bootstrap_ci", "ctclip_threshold", "detection_metrics",
                            "dice_scores", "InsufficientData", "multilabel_metrics", "retrieval_metrics"],
    "sigvlp.eval.suite": ["EvalConfig", "evaluate", "load_checkpoint"],
    "sigvlp.eval.report": ["format_table", "validate_report", "write_report"],
    "sigvlp.eval.plots": ["write_plots"],
    "sigvlp.eval.flops": ["encoder_flops"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE) + ["add_arguments", "run"]


def __getattr__(name):
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'sigvlp.eval' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))


def add_arguments(parser):
    """`sigvlp eval` options (see sigvlp.eval.cli)."""
    from sigvlp.eval.cli import add_arguments as _add

    _add(parser)


def run(args) -> int:
    from sigvlp.eval.cli import run as _run

    return _run(args)
