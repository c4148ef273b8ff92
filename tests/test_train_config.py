"""TrainConfig loading and overrides, the schedule, clear errors, the NaN stop and checkpoint files."""

from __future__ import annotations

import json
import math

import pytest
import torch

from _train_helpers import TEST_MODEL, collate, samples


def _args(argv):
    from sigvlp.cli import build_parser

    return build_parser().parse_args(["train", *argv])


def test_file_then_set_then_flags(tmp_path):
    from sigvlp.train import TrainConfig
    from sigvlp.train.cli import config_from_args

    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text("steps: 50\nlr: 0.05\nadamw_lr: 0.004\nmodel: {preset: tiny, width: 128, heads: 4}\n"
                        "precision: fp32\n")
    cfg = config_from_args(_args(["--config", str(cfg_file), "--set", "lr=0.01", "--set", "model.layers=3",
                                  "--steps", "7", "--set", "steps=9", "--no-progress"]))
    default = TrainConfig()
    assert cfg.steps == 7  # flag beats --set beats the file
    assert cfg.lr == 0.01  # --set beats the file
    assert cfg.adamw_lr == 0.004  # the file beats the default
    assert cfg.model == "tiny" and cfg.model_overrides == {"width": 128, "heads": 4, "layers": 3}
    assert cfg.progress is False and cfg.warmup_steps == default.warmup_steps
    # JSON works too, and the resolved config round-trips through the run folder's YAML
    json_file = tmp_path / "run.json"
    json_file.write_text(json.dumps({"steps": 11, "model_overrides": {"width": 128}}))
    cfg2 = config_from_args(_args(["--config", str(json_file)]))
    assert cfg2.steps == 11 and cfg2.model_overrides == {"width": 128}
    from sigvlp.train import load_config, save_config

    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg


def test_bad_key_names_itself_and_lists_valid_keys(tmp_path, capsys):
    from sigvlp.cli import main
    from sigvlp.train import load_config

    bad = tmp_path / "bad.yaml"
    bad.write_text("stepz: 3\n")
    with pytest.raises(ValueError, match=r"'stepz'.*valid keys: .*steps.*grad_accum"):
        load_config(bad)
    with pytest.raises(ValueError, match="'warmup'"):
        load_config(None, [("warmup", 3)])
    with pytest.raises(ValueError, match=r"steps: expected an integer"):
        load_config(None, [("steps", "many")])
    assert main(["train", "--set", "lerning_rate=0.1", "--data", str(tmp_path)]) == 2
    assert "unknown config key 'lerning_rate'" in capsys.readouterr().err


def test_unknown_preset_and_model_field(tmp_path, capsys):
    from sigvlp.cli import main

    assert main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--model", "huge"]) == 2
    err = capsys.readouterr().err
    assert "unknown SigVLP preset 'huge'" in err and "tiny" in err
    assert main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--set", "model.widht=3"]) == 2
    assert "widht" in capsys.readouterr().err


def test_missing_data_folder(tmp_path, capsys):
    from sigvlp.cli import main

    missing = tmp_path / "no-such-ct-rate"
    assert main(["train", "--data", str(missing), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "no such dataset folder" in err and str(missing) in err
    assert main(["train", "--out", str(tmp_path / "o")]) == 2
    assert "no dataset folder given" in capsys.readouterr().err


def test_lr_schedule():
    from sigvlp.train import lr_factor

    total, warm, floor = 100, 10, 0.1
    f = [lr_factor(s, total, warm, floor) for s in range(total)]
    assert f[0] == pytest.approx(0.1) and f[warm - 1] == pytest.approx(1.0)
    assert f[warm] == pytest.approx(1.0) and f[-1] == pytest.approx(floor)
    mid = warm + (total - warm - 1) // 2
    assert f[mid] == pytest.approx(floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * (mid - warm) / (total - warm - 1))))
    assert all(a >= b for a, b in zip(f[warm:], f[warm + 1:]))


def _trainer(tmp_path, steps=6, **kw):
    from sigvlp.train import TrainConfig, Trainer

    batches = [collate(samples(s, 4)) for s in range(steps)]
    cfg = TrainConfig(out=str(tmp_path / "run"), model="tiny", model_overrides=dict(TEST_MODEL), steps=steps,
                      warmup_steps=1, ckpt_every=2, keep_last=5, progress=False, tensorboard=False,
                      max_text_tokens=TEST_MODEL["max_text_tokens"], **kw)
    return Trainer(cfg, batch_source=lambda rank, world: iter(batches))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    from safetensors.torch import load_file

    from sigvlp.train import TrainingDiverged
    from sigvlp.train.checkpoint import list_checkpoints

    trainer = _trainer(tmp_path)
    trainer.run(max_steps=4)
    good = load_file(str(tmp_path / "run" / "checkpoints" / "step_00000004" / "model.safetensors"))
    with torch.no_grad():
        trainer.model.logit_bias.fill_(float("nan"))
    with pytest.raises(TrainingDiverged, match=r"step 5: the loss is nan.*step_00000004"):
        trainer.run()
    assert trainer.step == 4
    ckpts = list_checkpoints(tmp_path / "run" / "checkpoints")
    assert [s for s, _ in ckpts] == [2, 4]
    kept = load_file(str(ckpts[-1][1] / "model.safetensors"))
    assert all(torch.equal(kept[k], good[k]) for k in good)
    assert all(torch.isfinite(v).all() for v in kept.values())


def test_checkpoint_is_atomic_and_keeps_last_k(tmp_path):
    from sigvlp.train.checkpoint import latest_checkpoint, list_checkpoints, save_checkpoint

    def write(folder):
        (folder / "model.safetensors").write_bytes(b"w")

    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, write, {"step": step}, keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 4]

    def crash(folder):
        (folder / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt  # killed while writing

    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 5, crash, {"step": 5}, keep_last=2)
    assert latest_checkpoint(tmp_path).name == "step_00000004"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]
    # a torn folder left by SIGKILL (no state file) is never taken as a checkpoint
    (tmp_path / "step_00000009").mkdir()
    assert latest_checkpoint(tmp_path).name == "step_00000004"


def test_run_folder_with_checkpoints_needs_resume(tmp_path):
    trainer = _trainer(tmp_path, steps=2)
    trainer.run()
    with pytest.raises(FileExistsError, match="--resume"):
        _trainer(tmp_path, steps=2)
