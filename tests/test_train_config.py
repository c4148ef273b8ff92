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


def test_warmup_longer_than_the_run(tmp_path, capsys):
    """--warmup-steps > --steps: one-line error, exit 2, nothing written; from the defaults: one warning line."""
    from sigvlp.cli import main
    from sigvlp.train.cli import config_from_args

    out = tmp_path / "w"
    for flags in (["--warmup-steps", "5", "--steps", "1"], ["--set", "warmup_steps=5", "--steps", "4"]):
        assert main(["train", "--data", str(tmp_path), "--out", str(out), *flags]) == 2
        err = capsys.readouterr().err
        assert err.startswith("sigvlp train: error: warmup_steps 5 > steps") and err.count("\n") == 1, err
    assert not out.exists()
    cfg = config_from_args(_args(["--steps", "50"]))  # default warmup 100
    err = capsys.readouterr().err
    assert cfg.warmup_steps == 100 and err.count("\n") == 1 and "warning: warmup_steps 100 > steps 50" in err, err
    config_from_args(_args(["--steps", "50", "--warmup-steps", "50"]))
    assert capsys.readouterr().err == ""


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

    with pytest.raises(SystemExit) as e:  # --model lists the presets: argparse's one-line error
        main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--model", "huge"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "invalid choice: 'huge'" in err and "tiny" in err
    assert main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--set", "model=huge"]) == 2
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
                      warmup_steps=1, ckpt_every=2, keep_last=5, progress=False, tensorboard=False, **kw)
    return Trainer(cfg, batch_source=lambda rank, world: iter(batches))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    from safetensors.torch import load_file

    from sigvlp.train import TrainingDiverged
    from sigvlp.checkpoint import list_checkpoints

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
    from sigvlp.checkpoint import latest_checkpoint, list_checkpoints, save_checkpoint

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


def test_scientific_notation_floats_on_every_path(tmp_path):
    from sigvlp.train import load_config
    from sigvlp.train.cli import config_from_args

    # PyYAML (YAML 1.1) reads 1e-3 as the string '1e-3': float fields take any text float() takes
    cfg = config_from_args(_args(["--lr", "1e-3", "--adamw-lr", "3e-4", "--set", "weight_decay=5E-2"]))
    assert (cfg.lr, cfg.adamw_lr, cfg.weight_decay) == (1e-3, 3e-4, 5e-2)
    assert config_from_args(_args(["--set", "lr=1e-3"])).lr == 1e-3
    f = tmp_path / "sci.yaml"
    f.write_text("lr: 1e-3\nadamw_lr: 3E-4\nclip_grad: 2\n")
    cfg = load_config(f)
    assert (cfg.lr, cfg.adamw_lr, cfg.clip_grad) == (1e-3, 3e-4, 2.0) and isinstance(cfg.clip_grad, float)
    # ints and bools stay strict; non-numbers and non-finite values are still refused
    with pytest.raises(ValueError, match=r"steps: expected an integer, got '1e3'"):
        load_config(None, [("steps", "1e3")])
    with pytest.raises(ValueError, match=r"progress: expected true or false"):
        load_config(None, [("progress", "1e-3")])
    with pytest.raises(ValueError, match=r"lr: expected a number, got 'fast'"):
        load_config(None, [("lr", "fast")])
    with pytest.raises(ValueError, match=r"lr: expected a finite number"):
        load_config(None, [("lr", "inf")])
    with pytest.raises(ValueError, match=r"lr: expected a number"):
        load_config(None, [("lr", True)])


def test_broken_config_file_is_one_line_naming_the_file(tmp_path, capsys):
    from sigvlp.cli import main

    for name, text, kind in (("bad.yaml", "model: [1,\n", "YAML"), ("bad.json", '{"steps": 3,', "JSON")):
        path = tmp_path / name
        path.write_text(text)
        assert main(["train", "--config", str(path), "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"sigvlp train: error: {path}: invalid {kind}: ") and "\n" not in err, err


def test_negative_threads_is_refused_before_any_work(tmp_path, capsys):
    from sigvlp.cli import main
    from sigvlp.train import TrainConfig

    out = tmp_path / "o"
    assert main(["train", "--threads", "-1", "--out", str(out)]) == 2
    assert "threads: expected an integer >= 0" in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(ValueError, match="threads"):
        TrainConfig(threads=-2)
    assert TrainConfig(threads=0).threads == 0


def test_whole_fraction_is_checked_and_set_on_the_command_line(tmp_path):
    from sigvlp.train import TrainConfig
    from sigvlp.train.config import apply_overrides, parse_override

    for bad in (-0.1, 1.01, True, "x"):
        with pytest.raises(ValueError, match="whole_fraction"):
            TrainConfig(whole_fraction=bad)
    cfg = apply_overrides(TrainConfig(), [parse_override("whole_fraction=0.25")])
    assert cfg.whole_fraction == 0.25 and TrainConfig().whole_fraction is None


def test_prompt_decorrelation_is_checked(tmp_path):
    from sigvlp.train import TrainConfig

    for bad in (-1.0, float("nan"), True, "x"):
        with pytest.raises(ValueError, match="prompt_decorrelation"):
            TrainConfig(prompt_weight=1.0, prompt_decorrelation=bad)
    with pytest.raises(ValueError, match="prompt_decorrelation.*prompt_weight"):
        TrainConfig(prompt_decorrelation=1.0)  # no prompt statements to act on
    assert TrainConfig(prompt_weight=2.0, prompt_decorrelation=8.0).prompt_decorrelation == 8.0
    import numpy as np

    assert TrainConfig(prompt_weight=np.int64(2), prompt_decorrelation=np.int64(1)).prompt_decorrelation == 1.0


def test_optimizer_adamw_puts_every_parameter_on_adamw(tmp_path):
    from sigvlp.train import TrainConfig

    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="sgd")
    muon = _trainer(tmp_path / "m", steps=1)
    assert {g["use_muon"] for g in muon.optimizer.param_groups} == {True, False}
    adamw = _trainer(tmp_path / "a", steps=1, optimizer="adamw", adamw_lr=3e-3)
    groups = adamw.optimizer.param_groups
    assert [g["use_muon"] for g in groups] == [False]
    assert sum(len(g["params"]) for g in groups) == len(list(adamw.model.parameters()))
    before = [p.detach().clone() for p in adamw.model.parameters()]
    adamw.train_step(adamw._batches())
    # AdamW's first step moves no element by more than lr (its bias-corrected m / sqrt(v) is +-1)
    moved = [float((p.detach() - b).abs().max()) for p, b in zip(adamw.model.parameters(), before)]
    assert max(moved) <= 3e-3 * 1.01 and max(moved) > 0


def test_resume_with_another_optimizer_names_both(tmp_path):
    from sigvlp.train import TrainConfig, Trainer

    first = _trainer(tmp_path, steps=1)
    first.run()
    cfg = TrainConfig(**{**first.config.to_dict(), "optimizer": "adamw"})
    batches = [collate(samples(0, 4))]
    with pytest.raises(ValueError, match="trained with optimizer 'muon', this run asks for 'adamw'"):
        Trainer(cfg, resume=True, batch_source=lambda rank, world: iter(batches))


def _saved_test_model(tmp_path, **changes):
    from sigvlp.model import SigVLP, SigVLPConfig

    model = SigVLP(SigVLPConfig.preset("tiny", **{**TEST_MODEL, **changes}))
    model.save_pretrained(tmp_path / "init")
    return model, tmp_path / "init"


def test_init_from_refuses_a_different_model_config(tmp_path):
    from sigvlp.train import TrainConfig, Trainer

    model, init = _saved_test_model(tmp_path)
    batches = [collate(samples(0, 4))]

    def make(**overrides):
        cfg = TrainConfig(out=str(tmp_path / "run"), init_from=str(init), model="tiny",
                          model_overrides={**TEST_MODEL, **overrides},
                          steps=1, progress=False, tensorboard=False)
        return Trainer(cfg, batch_source=lambda rank, world: iter(batches))

    with pytest.raises(ValueError, match=r"init_from .*width \(checkpoint 64, requested 128\).*layers"):
        make(width=128, layers=2)
    trainer = make(grad_checkpointing=True)  # runtime fields may differ
    assert trainer.model.config.grad_checkpointing is True
    assert all(torch.equal(a, b) for a, b in zip(trainer.model.state_dict().values(), model.state_dict().values()))


def test_resume_checks_the_model_config_and_a_finished_run_has_nothing_to_do(tmp_path, capsys, monkeypatch):
    import sigvlp.train.trainer as trainer_mod
    from sigvlp.cli import main

    trainer = _trainer(tmp_path, steps=2)
    trainer.run()
    batches = [collate(samples(s, 4)) for s in range(4)]
    real = trainer_mod.Trainer
    monkeypatch.setattr(trainer_mod, "Trainer",
                        lambda cfg, **kw: real(cfg, batch_source=lambda rank, world: iter(batches), **kw))
    run = str(tmp_path / "run")
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert main(["train", "--resume", "--out", run, "--set", "model.width=128"]) == 2
    err = capsys.readouterr().err.strip()
    assert "resume: checkpoint" in err and "width (checkpoint 64, requested 128)" in err and "\n" not in err, err
    assert (tmp_path / "run" / "config.yaml").read_text() == saved  # the run folder is untouched
    for steps in ("1", "2"):
        assert main(["train", "--resume", "--out", run, "--steps", steps]) == 0
        out = capsys.readouterr().out
        assert f"run already at step 2 >= steps {steps}; nothing to do" in out, out
        assert "None" not in out and "nan" not in out
        assert (tmp_path / "run" / "config.yaml").read_text() == saved  # a finished run keeps its config
        assert (tmp_path / "run" / ".sigvlp-lock").read_text() == ""  # released: the next run sees no stale lock
    assert main(["train", "--resume", "--out", run, "--steps", "2"]) == 0
    assert "stale lock" not in capsys.readouterr().out


def test_resume_without_config_yaml_starts_from_the_checkpoint_config(tmp_path, capsys, monkeypatch):
    """A folder holding a run's checkpoints/ but no config.yaml resumes with the checkpoint's
    own settings: only flags given on the command line count as changes (the built-in defaults
    are never "applied" as if asked for)."""
    import shutil

    import sigvlp.train.trainer as trainer_mod
    from sigvlp.cli import main

    _trainer(tmp_path, steps=2, lr=0.005, adamw_lr=0.0007, weight_decay=0.03).run()
    copy = tmp_path / "copy"
    shutil.copytree(tmp_path / "run" / "checkpoints", copy / "checkpoints")
    batches = [collate(samples(s, 4)) for s in range(4)]
    real = trainer_mod.Trainer
    monkeypatch.setattr(trainer_mod, "Trainer",
                        lambda cfg, **kw: real(cfg, batch_source=lambda rank, world: iter(batches), **kw))
    assert main(["train", "--resume", "--out", str(copy), "--steps", "3", "--adamw-lr", "0.001"]) == 0
    out = capsys.readouterr().out
    changed = [ln for ln in out.splitlines() if "settings changed" in ln]
    assert len(changed) == 1, out
    assert "steps 2 -> 3" in changed[0] and "adamw_lr 0.0007 -> 0.001" in changed[0], changed
    for key in ("lr 0.005", "weight_decay", "warmup_steps", "model"):
        assert f" {key}" not in changed[0].replace("adamw_lr", ""), changed
    import yaml

    saved = yaml.safe_load((copy / "config.yaml").read_text())
    assert (saved["lr"], saved["weight_decay"], saved["warmup_steps"], saved["adamw_lr"]) == (0.005, 0.03, 1, 0.001)
    assert saved["out"] == str(copy)


def test_word_tokenizer_checks_init_from_before_reading_reports(tmp_path):
    from sigvlp.train import TrainConfig
    from sigvlp.train.trainer import Trainer

    cfg = TrainConfig(data=str(tmp_path / "no-data"), out=str(tmp_path / "run"), init_from=str(tmp_path / "none"),
                      model="tiny", model_overrides={**TEST_MODEL, "tokenizer": "word"}, progress=False, tensorboard=False)
    with pytest.raises(FileNotFoundError, match="init_from"):  # not a data error: the reports are never read
        Trainer(cfg)


def test_model_settings_have_one_owner(tmp_path, capsys):
    from sigvlp.cli import main
    from sigvlp.train import TrainConfig, load_config

    for key in ("preprocess", "chunk", "max_text_tokens"):
        assert key not in TrainConfig.__dataclass_fields__
        with pytest.raises(ValueError, match=rf"{key}: the model config owns it now; set model.{key}="):
            load_config(None, [(key, 1)])
    with pytest.raises(SystemExit):  # no such flag any more (argparse exits 2)
        main(["train", "--max-text-tokens", "48", "--out", str(tmp_path / "o")])
    assert "unrecognized arguments: --max-text-tokens" in capsys.readouterr().err


def test_legacy_config_file_maps_model_keys_with_one_log_line(tmp_path, caplog):
    from sigvlp.train import load_config

    old = tmp_path / "config.yaml"
    old.write_text("steps: 3\npreprocess: null\nchunk: tiny\nmax_text_tokens: 48\n"
                   "model_overrides: {width: 64, chunk: sigvlp}\n")
    with caplog.at_level("WARNING", logger="sigvlp.train"):
        cfg = load_config(old)
    assert cfg.model_overrides == {"width": 64, "chunk": "sigvlp", "max_text_tokens": 48}
    lines = [r.getMessage() for r in caplog.records if r.name == "sigvlp.train"]
    assert len(lines) == 1 and "max_text_tokens=48" in lines[0] and "chunk (model_overrides 'sigvlp'" in lines[0]
    caplog.clear()
    new = tmp_path / "new.yaml"
    new.write_text("steps: 3\nmodel_overrides: {max_text_tokens: 48}\n")
    with caplog.at_level("WARNING", logger="sigvlp.train"):
        assert load_config(new).model_overrides == {"max_text_tokens": 48}
    assert not caplog.records


def test_run_folder_with_a_legacy_config_yaml_resumes(tmp_path, capsys, caplog, monkeypatch):
    """A run folder written before the model config owned max_text_tokens / preprocess / chunk
    (config.yaml has them at the top level) resumes from its checkpoint, the keys mapped into
    model_overrides; without the mapping the model would get max_text_tokens 256 and differ from
    the checkpoint's 48."""
    import yaml

    import sigvlp.train.trainer as trainer_mod
    from sigvlp.cli import main

    trainer = _trainer(tmp_path, steps=2)
    trainer.run()
    path = tmp_path / "run" / "config.yaml"
    saved = yaml.safe_load(path.read_text())
    legacy = {**saved, "preprocess": None, "chunk": None, "max_text_tokens": saved["model_overrides"]["max_text_tokens"],
              "model_overrides": {k: v for k, v in saved["model_overrides"].items() if k != "max_text_tokens"}}
    path.write_text(yaml.safe_dump(legacy, sort_keys=False))
    batches = [collate(samples(s, 4)) for s in range(4)]
    real = trainer_mod.Trainer
    monkeypatch.setattr(trainer_mod, "Trainer",
                        lambda cfg, **kw: real(cfg, batch_source=lambda rank, world: iter(batches), **kw))
    with caplog.at_level("WARNING", logger="sigvlp.train"):
        assert main(["train", "--resume", "--out", str(tmp_path / "run"), "--steps", "3"]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert sum("top-level preprocess, chunk, max_text_tokens" in r.getMessage() for r in caplog.records) == 1
    rewritten = yaml.safe_load(path.read_text())  # the run folder now holds the new form
    assert rewritten["model_overrides"] == saved["model_overrides"] and "max_text_tokens" not in rewritten
    assert rewritten["steps"] == 3
