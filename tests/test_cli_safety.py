"""Run folders that never lose or mix work: one run per folder (a lock naming its holder; stale
locks of dead local holders taken over, other machines' never), a folder holding another run's
checkpoints refused without --resume, --resume only on a run folder."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from _train_helpers import TEST_MODEL, collate, samples

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(out, steps=2, **kw):
    from sigvlp.train import TrainConfig

    return TrainConfig(**{"out": str(out), "model": "tiny", "model_overrides": dict(TEST_MODEL), "steps": steps,
                          "warmup_steps": 1, "ckpt_every": 1, "keep_last": 5, "progress": False, "tensorboard": False,
                          **kw})


def _trainer(out, resume=False, steps=2, **kw):
    from sigvlp.train import Trainer

    batches = [collate(samples(s, 4)) for s in range(steps)]
    return Trainer(_config(out, steps, **kw), resume=resume, batch_source=lambda rank, world: iter(batches))


def _snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


@pytest.fixture
def holder(tmp_path):
    """A live process holding the lock of tmp_path/run (as a running `sigvlp train` would)."""
    run = tmp_path / "run"
    run.mkdir()
    code = ("import sys, time; from sigvlp.train.runfolder import RunLock; lock = RunLock(sys.argv[1]); lock.acquire(); "
            "print('held', flush=True); time.sleep(120)")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable, "-c", code, str(run)], stdout=subprocess.PIPE, text=True, env=env)
    assert p.stdout.readline().strip() == "held"
    yield run, p.pid
    p.kill()
    p.wait()


def test_second_run_into_a_locked_folder_is_refused(holder, capsys, monkeypatch):
    import sigvlp.train.trainer as trainer_mod
    from sigvlp.cli import main

    run, pid = holder
    before = _snapshot(run)
    with pytest.raises(FileExistsError, match=rf"in use by another run \(host={socket.gethostname()} pid={pid} "):
        _trainer(run)
    real = trainer_mod.Trainer
    batches = [collate(samples(0, 4))]
    monkeypatch.setattr(trainer_mod, "Trainer",
                        lambda cfg, **kw: real(cfg, batch_source=lambda rank, world: iter(batches), **kw))
    assert main(["train", "--out", str(run), "--model", "tiny", "--steps", "1", "--warmup-steps", "1", "--threads", "1",
                 *[f"--set=model.{k}={v}" for k, v in TEST_MODEL.items()]]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sigvlp train: error: out:") and f"pid={pid}" in err and "\n" not in err
    assert _snapshot(run) == before  # nothing written by the refused runs


def test_stale_lock_of_a_dead_local_holder_is_taken_over(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run / ".sigvlp-lock").write_text(f"host={socket.gethostname()} pid={dead.pid} since=2026-01-01T00:00:00\n")
    trainer = _trainer(run)
    trainer.run()
    log = (run / "log.txt").read_text()
    assert f"took over the stale lock of pid {dead.pid} on {socket.gethostname()}" in log
    assert (run / ".sigvlp-lock").read_text() == ""  # released at the end of the run


def test_lock_of_another_host_is_never_taken_over(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".sigvlp-lock").write_text("host=gpu-node-7 pid=4242 since=2026-01-01T00:00:00\n")
    with pytest.raises(FileExistsError, match=r"locked by pid 4242 on host gpu-node-7 .*delete .*\.sigvlp-lock"):
        _trainer(run)
    assert sorted(p.name for p in run.iterdir()) == [".sigvlp-lock"]


def test_lock_is_released_after_a_run_and_a_failed_start(tmp_path):
    run = tmp_path / "run"
    _trainer(run).run()
    resumed = _trainer(run, resume=True, steps=3)  # the first run's lock is gone
    with pytest.raises(FileExistsError, match="in use by another run"):
        _trainer(run, resume=True, steps=3)  # while `resumed` holds it
    resumed.run()
    with pytest.raises(ValueError, match="trained with optimizer 'muon'"):
        _trainer(run, resume=True, steps=4, optimizer="adamw")
    _trainer(run, resume=True, steps=4).close()  # the failed start released its lock


def test_folder_with_old_checkpoints_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    _trainer(run).run()
    (run / "metrics.jsonl").unlink()  # an old run's checkpoints without its metrics file
    before = _snapshot(run)
    with pytest.raises(FileExistsError) as e:
        _trainer(run, steps=3)
    msg = str(e.value)
    assert "step_00000002" in msg and "--resume" in msg and "another --out" in msg
    assert _snapshot(run) == before  # no checkpoint rotated away, no log line, no config written


def test_resume_needs_a_run_folder(tmp_path, capsys):
    from sigvlp.cli import main

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    for out in (notes, tmp_path / "absent"):
        assert main(["train", "--resume", "--out", str(out), "--threads", "1"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("sigvlp train: error: --resume:") and "\n" not in err, err
        assert "no dataset folder given" not in err
        assert ("todo.txt" in err and "not a run folder" in err) if out == notes else "no run folder" in err
    assert sorted(p.name for p in notes.iterdir()) == ["todo.txt"] and not (tmp_path / "absent").exists()


@pytest.mark.parametrize("extra", [[], ["--data", "nonexistent"], ["--data", ".", "--init-from", "nonexistent"]])
def test_a_start_that_fails_validation_leaves_the_disk_as_it_was(tmp_path, capsys, monkeypatch, extra):
    """No data, a missing dataset, a missing --init-from: exit 2 with one line, and the run folder
    this command created (parents included) is gone again; an existing folder keeps exactly what it held."""
    from sigvlp.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["train", "--out", str(tmp_path / "runs" / "nodata"), "--model", "tiny", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sigvlp train: error:") and "\n" not in err, err
    assert not (tmp_path / "runs").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    assert main(["train", "--out", str(mine), "--model", "tiny", *extra]) == 2
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_nan_stop_then_resume_leaves_one_metrics_row_per_step(tmp_path):
    import json

    from sigvlp.train import Trainer, TrainingDiverged

    run = tmp_path / "run"
    batches = [collate(samples(s, 4)) for s in range(6)]
    bad = list(batches)
    bad[3] = dict(bad[3], patches=bad[3]["patches"] * float("nan"))  # step 4's batch: the loss is NaN
    first = Trainer(_config(run, 6, ckpt_every=5), batch_source=lambda rank, world: iter(bad))
    with pytest.raises(TrainingDiverged):
        first.run()  # steps 1-3 logged, no checkpoint written before the stop
    assert "stopped: step 4: the loss is nan" in (run / "log.txt").read_text()
    assert not (run / "checkpoints").exists() or not list((run / "checkpoints").iterdir())
    Trainer(_config(run, 6, ckpt_every=5), resume=True, batch_source=lambda rank, world: iter(batches)).run()
    steps = [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_nan_stop_is_reported_once_on_stderr(tmp_path, capsys, monkeypatch):
    """The NaN stop: one line on stderr (the error), none on stdout; log.txt keeps it; exit status 3."""
    import sigvlp.train.trainer as trainer_mod
    from sigvlp.cli import main

    run = tmp_path / "run"
    bad = [collate(samples(s, 4)) for s in range(3)]
    bad[1] = dict(bad[1], patches=bad[1]["patches"] * float("nan"))  # step 2's batch: the loss is NaN
    real = trainer_mod.Trainer
    monkeypatch.setattr(trainer_mod, "Trainer",
                        lambda cfg, **kw: real(_config(run, 3), batch_source=lambda rank, world: iter(bad), **kw))
    assert main(["train", "--out", str(run), "--steps", "3"]) == 3
    cap = capsys.readouterr()
    said = [ln for ln in (cap.out + cap.err).splitlines() if "the loss is nan" in ln]
    assert len(said) == 1 and said[0] in cap.err.splitlines() and said[0].startswith("sigvlp train: step 2:"), cap
    assert "stopped: step 2: the loss is nan" in (run / "log.txt").read_text()


def _train_cmd(data, out, *extra):
    sets = [f"--set=model.{k}={v}" for k, v in TEST_MODEL.items()]
    return [sys.executable, "-m", "sigvlp", "train", "--data", str(data), "--cache", str(out.parent / "cache"),
            "--out", str(out), "--model", "tiny", *sets, "--warmup-steps", "1", "--token-budget", "512",
            "--num-workers", "0", "--threads", "1", "--no-progress", "--no-tensorboard", *extra]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(ROOT, "tests"), env.get("PYTHONPATH", "")])
    return env


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupt_saves_a_checkpoint_prints_one_line_and_resumes(tmp_path_factory, tmp_path, sig):
    import json

    from _data_helpers import tiny_dataset

    data = tiny_dataset(tmp_path_factory, n_train=6, n_valid=2)
    run = tmp_path / "run"
    proc = subprocess.Popen(_train_cmd(data, run, "--steps", "500", "--ckpt-every", "1000"), env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.is_file() and metrics.read_text().strip()) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "Traceback" not in out, err[-3000:]
    lines = [ln for ln in out.splitlines() if "interrupted" in ln]
    assert len(lines) == 1 and f"resume with: sigvlp train --resume --out {run}" in lines[0], out
    step = int(lines[0].split("after step ")[1].split(":")[0])
    assert f"saved {run / 'checkpoints' / f'step_{step:08d}'}" in lines[0]
    assert f"({sig.name})" in lines[0]
    assert lines[0] in (run / "log.txt").read_text().splitlines()
    assert (run / "checkpoints" / f"step_{step:08d}" / "trainer.pt").is_file()
    assert not (run / ".sigvlp-lock").read_text()  # released
    # the resume continues from the saved step, one metrics row per step
    done = subprocess.run([sys.executable, "-m", "sigvlp", "train", "--resume", "--out", str(run),
                           "--steps", str(step + 2), "--threads", "1"], env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed from {run / 'checkpoints' / f'step_{step:08d}'} (step {step}," in done.stdout
    steps = [json.loads(ln)["step"] for ln in metrics.read_text().splitlines()]
    assert steps == list(range(1, step + 3))


def test_resume_applies_changed_optimisation_settings_and_lists_them(tmp_path):
    import json

    import yaml

    from sigvlp.train.builders import lr_factor

    run = tmp_path / "run"
    _trainer(run, steps=2, lr=0.02, adamw_lr=0.003, weight_decay=0.1, warmup_steps=1).run()
    new = dict(lr=0.005, adamw_lr=0.001, weight_decay=0.05, adamw_weight_decay=0.2, momentum=0.9, warmup_steps=1,
               min_lr_ratio=0.2, seed=7)
    t = _trainer(run, resume=True, steps=5, **new)
    f = lr_factor(2, 5, 1, 0.2)  # the schedule of the new settings at the resumed step
    for g in t.optimizer.param_groups:  # the lr and decays of the next step follow the new config
        if g["use_muon"]:
            assert g["lr"] == pytest.approx(0.005 * f, rel=1e-12)
            assert g["weight_decay"] == 0.05 and g["momentum"] == 0.9
        else:
            assert g["lr"] == pytest.approx(0.001 * f, rel=1e-12) and g["weight_decay"] == 0.2
    t.run()
    rows = {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}
    for step in (3, 4, 5):
        assert rows[step]["lr"] == pytest.approx(0.005 * lr_factor(step - 1, 5, 1, 0.2), rel=1e-12)
        assert rows[step]["adamw_lr"] == pytest.approx(0.001 * lr_factor(step - 1, 5, 1, 0.2), rel=1e-12)
    log = (run / "log.txt").read_text()
    line = next(ln for ln in log.splitlines() if ln.startswith("resume: settings changed"))
    for change in ("lr 0.02 -> 0.005 (applied", "adamw_lr 0.003 -> 0.001 (applied", "steps 2 -> 5 (applied",
                   "weight_decay 0.1 -> 0.05 (applied", "min_lr_ratio", "seed 0 -> 7"):
        assert change in line, line
    assert "seed 0 -> 7 (applied" not in line
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["lr"] == 0.005 and saved["adamw_lr"] == 0.001 and saved["steps"] == 5


def test_resume_refuses_settings_that_change_what_the_weights_mean(tmp_path):
    run = tmp_path / "run"
    _trainer(run, steps=2).run()
    before = _snapshot(run)
    for over in ({"patch_size": [2, 16, 16]}, {"width": 128}, {"preprocess": "ctclip"},
                 {"tokenizer": "word", "vocab": ["lung", "nodule"]}):
        with pytest.raises(ValueError, match=rf"resume: checkpoint .*cannot change.*{list(over)[0]}"):
            _trainer(run, resume=True, steps=3, model_overrides={**TEST_MODEL, **over})
    assert _snapshot(run) == before


def test_demo_checks_options_first_and_never_removes_user_files(tmp_path, monkeypatch, capsys):
    import sigvlp.demo.run as demo
    import sigvlp.train.trainer as trainer_mod
    from sigvlp.cli import main

    def must_not_run(*a, **k):
        raise AssertionError("the demo went on to generate data or train")

    monkeypatch.setattr(demo, "ensure_default_dataset", must_not_run)
    monkeypatch.setattr(trainer_mod, "train", must_not_run)
    out = tmp_path / "demo"
    (out / "run").mkdir(parents=True)
    (out / "run" / "notes.txt").write_text("mine")
    data_file = tmp_path / "data.txt"
    data_file.write_text("not a folder")
    before = _snapshot(tmp_path)
    with pytest.raises(SystemExit) as e:  # a bad option: the parser's one line
        main(["demo", "--out", str(out), "--steps", "0"])
    assert e.value.code == 2
    with pytest.raises(ValueError, match="steps"):  # the same through the Python API
        demo.run_demo(out / "fresh", steps=0)
    assert main(["demo", "--out", str(tmp_path / "fresh"), "--data-dir", str(data_file), "--steps", "1"]) == 2
    assert "--data-dir:" in capsys.readouterr().err
    assert main(["demo", "--out", str(out), "--steps", "1"]) == 2  # the folder holds a run: refused
    err = capsys.readouterr().err.strip()
    assert err.startswith("sigvlp demo: error: --out:") and "run" in err and "another --out" in err and "\n" not in err
    assert _snapshot(tmp_path) == before  # nothing removed, nothing created


def test_train_and_synth_refuse_an_unwritable_out_before_work(tmp_path, capsys):
    from sigvlp.cli import main

    blocker = tmp_path / "file.txt"  # root ignores permission bits; a path under a regular file fails for anyone
    blocker.write_text("mine")
    out = blocker / "run"
    data = tmp_path / "empty-data"  # no dataset: an error about it would mean the data was read first
    data.mkdir()
    assert main(["train", "--data", str(data), "--out", str(out), "--model", "tiny", "--threads", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sigvlp train: error: out:") and "is a file, not a folder" in err and "\n" not in err, err
    assert main(["synth", "--out", str(out), "--n-train", "1", "--n-valid", "0", "--preset", "tiny"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sigvlp synth: error: argument --out:") and "is a file" in err and "\n" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty-data", "file.txt"] and blocker.read_text() == "mine"


def test_findings_and_preprocess_refuse_an_unwritable_output_before_work(tmp_path, capsys):
    """A bank or cache path under a regular file is a one-line error (exit 2), not a traceback."""
    from sigvlp.cli import main

    blocker = tmp_path / "file.txt"
    blocker.write_text("mine")
    data = tmp_path / "empty-data"
    data.mkdir()
    assert main(["findings", str(data), "--out", str(blocker / "bank.jsonl")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sigvlp findings: error: argument --out:") and "is a file" in err and "\n" not in err, err
    assert main(["preprocess", str(data), "--cache", str(blocker / "cache"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sigvlp preprocess: error: --cache:") and "is a file" in err and "\n" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty-data", "file.txt"] and blocker.read_text() == "mine"
