"""The `sigvlp` command: subcommands, --version, `python -m sigvlp`, placeholders."""

from __future__ import annotations

import subprocess
import sys

import pytest

import sigvlp

COMMANDS = ("synth", "train", "demo", "eval", "embed", "info")


def test_python_m_sigvlp_help_lists_every_subcommand():
    proc = subprocess.run([sys.executable, "-m", "sigvlp", "--help"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for name in COMMANDS:
        assert f"\n    {name} " in proc.stdout, (name, proc.stdout)


def test_version(capsys):
    from sigvlp.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"sigvlp {sigvlp.__version__}"


def test_train_help_offers_config_set_resume_and_a_flag_per_key(capsys):
    from sigvlp.cli import main
    from sigvlp.train.config import config_fields

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for flag in ("--config", "--set", "--resume", "--steps", "--lr", "--grad-accum", "--prompt-weight"):
        assert flag in out, flag
    scalar = [n for n in config_fields() if n != "model_overrides"]
    assert all("--" + n.replace("_", "-") in out for n in scalar)


def test_demo_help(capsys):
    from sigvlp.cli import main

    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    out = capsys.readouterr().out
    assert "--out" in out and "--steps" in out


def test_missing_module_becomes_a_placeholder(monkeypatch, capsys):
    from sigvlp import cli

    real = cli._available
    monkeypatch.setattr(cli, "_available", lambda m: False if m == "sigvlp.eval" else real(m))
    parser = cli.build_parser()
    assert "evaluation issue" in parser.format_help()
    assert cli.main(["eval"]) == 2
    assert "evaluation issue" in capsys.readouterr().err


def test_demo_negative_threads_is_an_argparse_error(tmp_path, capsys):
    from sigvlp.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["demo", "--threads", "-1", "--out", str(tmp_path / "demo")])
    assert exc.value.code == 2
    assert "--threads: expected an integer >= 0" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()


def test_demo_end_to_end_on_a_small_set(tmp_path, monkeypatch, capsys):
    """`sigvlp demo` with the demo's model and recipe on 24 training / 30 held-out phantoms of its
    preset and 3 steps: the metrics file holds what docs/demo.md lists, per-label counts agree with
    the held-out labels CSV, and labels with fewer than MIN_COUNT positives are listed as skipped."""
    import csv
    import json

    import sigvlp.demo.run as demo
    from sigvlp.cli import main

    monkeypatch.setitem(demo.DEMO_DATA, "train", {**demo.DEMO_DATA["train"], "n_train": 24})
    monkeypatch.setitem(demo.DEMO_DATA, "heldout", {**demo.DEMO_DATA["heldout"], "n_valid": 30})
    monkeypatch.setitem(demo.DEMO_DATA, "heldout_chunks_per_volume", 1)
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--data-dir", str(tmp_path / "data"), "--steps", "3",
                 "--no-progress"]) == 0
    m = json.loads((out / "demo_metrics.json").read_text())
    for key in ("zero_shot_mean_auroc", "organ_presence_mean_auroc", "per_label", "per_organ", "counts", "seconds",
                "checkpoint", "skipped"):
        assert key in m, key
    assert m["steps"] == 3 and m["heldout_volumes"] == 30 and (tmp_path / "data" / "phantoms-demo-train").is_dir()
    assert (out / "run" / "checkpoints").is_dir() and m["checkpoint"].startswith(str(out / "run"))
    with open(tmp_path / "data" / "phantoms-demo-heldout" / "dataset" / "multi_abnormality_labels"
              / "valid_predicted_labels.csv") as f:
        rows = list(csv.DictReader(f))
    for label in list(m["per_label"]) + list(m["skipped"]["zero_shot"]):
        pos = sum(int(r[label]) for r in rows)
        got = m["counts"].get(label) or m["skipped"]["zero_shot"][label]
        assert (got["positives"], got["negatives"]) == (pos, len(rows) - pos), label
        assert (label in m["per_label"]) == (min(pos, len(rows) - pos) >= demo.MIN_COUNT), label
    assert "zero-shot mean AUROC" in capsys.readouterr().out
