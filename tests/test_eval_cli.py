"""`sigvlp eval` argument checks and defaults that need no model run: the default output folder
lies outside the rotated checkpoints/step_* folders, bad flags exit 2 up front, the depth sweep's
last point is capped at the longest volume, written files follow the umask."""

import argparse
import os
import stat
from pathlib import Path

import numpy as np
import pytest

from sigvlp.data.chunks import ChunkConfig


def _cli(argv):
    import sigvlp.eval as ev

    parser = argparse.ArgumentParser()
    ev.add_arguments(parser)
    return ev.run(parser.parse_args(argv))


def _step(run, n):
    d = run / "checkpoints" / f"step_{n:08d}"
    d.mkdir(parents=True)
    (d / "config.json").write_text("{}")
    return d


def test_default_out_is_outside_rotated_checkpoints(tmp_path):
    from sigvlp.eval.cli import default_out

    run = tmp_path / "run"
    _step(run, 100)
    last = _step(run, 200)
    want = run.resolve() / "eval-valid-step_00000200"
    assert default_out(run, "valid") == want
    assert default_out(run / "checkpoints", "valid") == want
    assert default_out(last, "valid") == want
    assert default_out(run / "checkpoints" / "step_00000100", "train") == run.resolve() / "eval-train-step_00000100"
    for out in (default_out(run, "valid"), default_out(last, "train")):
        assert "checkpoints" not in out.relative_to(run.resolve()).parts
    plain = tmp_path / "exported"
    plain.mkdir()
    (plain / "config.json").write_text("{}")
    assert default_out(plain, "valid") == tmp_path.resolve() / "eval-valid-exported"


def _main(argv, capsys):
    from sigvlp.cli import main

    try:
        rc = main(["eval", *argv])
    except SystemExit as e:
        rc = e.code
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("argv, flag", [
    (["--max-volumes", "0"], "--max-volumes"),
    (["--max-volumes", "-3"], "--max-volumes"),
    (["--max-train-volumes", "0"], "--max-train-volumes"),
    (["--min-count", "-1"], "--min-count"),
    (["--bootstrap", "0"], "--bootstrap"),
    (["--seg-volumes", "0"], "--seg-volumes"),
    (["--depths", "8", "0"], "--depths"),
])
def test_bad_counts_exit_2_naming_the_flag(tmp_path, capsys, argv, flag):
    rc, err = _main(["--ckpt", str(tmp_path / "nockpt"), "--data", str(tmp_path / "nodata"), *argv], capsys)
    assert rc == 2
    assert err.strip().splitlines()[-1].startswith(f"sigvlp eval: error: argument {flag}:") and "Traceback" not in err


def test_out_existing_file_exits_2_up_front(tmp_path, capsys):
    f = tmp_path / "report.txt"
    f.write_text("x")
    # ckpt/data do not exist: the --out check must come first, before anything is loaded
    rc = _cli(["--ckpt", str(tmp_path / "nockpt"), "--data", str(tmp_path / "nodata"), "--out", str(f)])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("sigvlp eval: error: --out:") and "not a folder" in err
    assert f.read_text() == "x"


def test_out_with_an_earlier_run_is_refused(tmp_path, capsys):
    # a second eval into the folder of a first one would replace report.json and leave old plots beside it
    out = tmp_path / "eval"
    out.mkdir()
    (out / "report.json").write_text("{}")
    (out / "f1_vs_slices.png").write_bytes(b"png")
    rc = _cli(["--ckpt", str(tmp_path / "nockpt"), "--data", str(tmp_path / "nodata"), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "not empty" in err and "f1_vs_slices.png" in err and "report.json" in err
    assert sorted(p.name for p in out.iterdir()) == ["f1_vs_slices.png", "report.json"]
    assert (out / "report.json").read_text() == "{}"


def test_default_out_is_a_new_timestamped_folder(tmp_path):
    from sigvlp.eval.cli import output_folder

    run = tmp_path / "run"
    _step(run, 100)
    args = argparse.Namespace(out=None, ckpt=str(run), split="valid")
    first = output_folder(args)
    assert first.parent == run.resolve() and first.name.startswith("eval-valid-step_00000100-")
    assert not first.exists()  # nothing is created before the work is done
    first.mkdir()
    (first / "report.json").write_text("{}")
    second = output_folder(args)
    assert second != first and not second.exists() and second.name.startswith("eval-valid-step_00000100-")
    # an absent or empty --out is used as given
    assert output_folder(argparse.Namespace(out=str(tmp_path / "new"), ckpt=None, split="valid")) == tmp_path / "new"
    (tmp_path / "empty").mkdir()
    assert output_folder(argparse.Namespace(out=str(tmp_path / "empty"), ckpt=None, split="valid")).is_dir()


def readonly_folder(tmp_path):
    """A folder nothing can be written into: chmod 0555, or (as root, who ignores modes) a path
    under /sys, which is read-only for everyone."""
    if os.geteuid() == 0:
        return Path("/sys/sigvlp-readonly-test")
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o555)
    return d


def test_read_only_out_exits_2_before_work(tmp_path, capsys):
    out = readonly_folder(tmp_path) / "eval"
    rc = _cli(["--ckpt", str(tmp_path / "nockpt"), "--data", str(tmp_path / "nodata"), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("sigvlp eval: error: --out:") and "cannot write" in err


def test_read_only_default_out_suggests_out(tmp_path, monkeypatch):
    import sigvlp.eval.cli as C

    base = readonly_folder(tmp_path) / "eval-valid-step_00000002"
    monkeypatch.setattr(C, "default_out", lambda ckpt, split: base)
    with pytest.raises(ValueError) as e:
        C.output_folder(argparse.Namespace(out=None, ckpt=str(tmp_path / "run"), split="valid"))
    msg = str(e.value)
    assert "cannot write" in msg and "give --out DIR" in msg and "\n" not in msg, msg


def test_default_depths_capped_at_longest_volume():
    from sigvlp.eval.suite import default_depths

    cc = ChunkConfig(patch=(4, 16, 16), min_slices=4, max_slices=32)
    assert default_depths(cc, 40) == (4, 8, 16, 32, 40)
    assert default_depths(cc, 32) == (4, 8, 16, 32)
    assert default_depths(cc, 33) == (4, 8, 16, 32, 33)
    assert default_depths(cc, 5) == (4, 5)
    assert max(default_depths(cc, 3)) == 3


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(p):
    return stat.S_IMODE(os.stat(p).st_mode)


def test_written_files_follow_umask(tmp_path, umask_022):
    from sigvlp.eval.report import write_report
    from sigvlp.eval.suite import _save_embeddings

    p = write_report({"a": 1.0}, tmp_path / "r" / "report.json")
    assert _mode(p) == 0o644
    e = tmp_path / "emb.safetensors"
    _save_embeddings(e, np.zeros((2, 3), np.float32), {}, "k")
    assert _mode(e) == 0o644
    os.umask(0o077)
    p2 = write_report({"a": 1.0}, tmp_path / "r2.json")
    assert _mode(p2) == 0o600


def test_save_pretrained_follows_umask(tmp_path, umask_022):
    from sigvlp.model import SigVLP, SigVLPConfig

    d = SigVLP(SigVLPConfig.preset("tiny")).save_pretrained(tmp_path / "m")
    assert _mode(d / "model.safetensors") == 0o644
    assert _mode(d / "config.json") == 0o644
