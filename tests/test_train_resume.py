"""`sigvlp train` end to end on a tiny phantom set (with prompt supervision and the word
tokenizer): the 20-step smoke run, and a run killed with SIGKILL mid-training then resumed with --resume gives exactly the
uninterrupted run's losses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from _data_helpers import tiny_dataset
from _train_helpers import TEST_MODEL

STEPS = 20


def _cmd(data, cache, out, *extra):
    sets = [f"--set=model.{k}={v}" for k, v in {**TEST_MODEL, "tokenizer": "word"}.items()]
    return [sys.executable, "-m", "sigvlp", "train", "--data", str(data), "--cache", str(cache), "--out", str(out),
            "--model", "tiny", *sets, "--steps", str(STEPS), "--warmup-steps", "3", "--ckpt-every", "4",
            "--keep-last", "2", "--token-budget", "512", "--num-workers", "0", "--threads", "1",
            "--prompt-weight", "1.0", "--prompt-decorrelation", "0.5", "--no-progress", "--no-tensorboard", *extra]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # one thread each: tests run side by side
    return env


def _losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in rows}


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    return tiny_dataset(tmp_path_factory, n_train=6, n_valid=2)


@pytest.fixture(scope="module")
def smoke_run(phantoms, tmp_path_factory):
    """The uninterrupted 20-step run (the smoke run)."""
    root = tmp_path_factory.mktemp("train")
    out = root / "full"
    proc = subprocess.run(_cmd(phantoms, root / "cache", out), capture_output=True, text=True, env=_env(),
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, out, proc


def test_smoke_run_writes_a_complete_run_folder(smoke_run):
    from sigvlp.model import SigVLP
    from sigvlp.checkpoint import list_checkpoints

    _, out, proc = smoke_run
    losses = _losses(out)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    ckpts = list_checkpoints(out / "checkpoints")
    assert [s for s, _ in ckpts] == [16, 20]  # keep_last 2
    model = SigVLP.from_pretrained(ckpts[-1][1])
    assert model.config.width == TEST_MODEL["width"]
    # the word list was built from the reports and the prompt statements and saved with the weights
    assert model.config.tokenizer == "word" and {"present", "not", "visible", "nodule"} <= set(model.config.vocab)
    assert "word tokenizer:" in proc.stdout
    import yaml

    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["steps"] == STEPS and saved["model_overrides"]["width"] == TEST_MODEL["width"]
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["tokens"] > 0 and row["slices"] > 0 and row["tokens_per_s"] > 0
    assert row["loss_prompt"] > 0 and 0 < row["loss_decorrelation"] <= 1
    assert row["loss"] == row["loss_main"] + 1.0 * row["loss_prompt"] + 0.5 * row["loss_decorrelation"]
    assert "checkpoint" in proc.stdout


def test_resume_after_sigkill_gives_the_same_losses(smoke_run, phantoms):
    root, full, _ = smoke_run
    out = root / "killed"
    cmd = _cmd(phantoms, root / "cache", out)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env())
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline:
            m = out / "metrics.jsonl"
            if m.exists() and len(_losses(out)) >= 10 or proc.poll() is not None:
                break
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before the kill: {proc.stderr.read()[-2000:]}"
    seen = _losses(out)
    assert 10 <= max(seen) < STEPS
    resumed = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, env=_env(), timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    expected, got = _losses(full), _losses(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert got == expected  # bitwise: same weights, optimizer state, schedule and data position
