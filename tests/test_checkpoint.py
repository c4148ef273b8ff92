"""sigvlp.checkpoint: one rule for the three path forms (run folder, its checkpoints folder, a
step folder) in train, eval and embed; the completeness rule per reader; the content hash."""

from __future__ import annotations

import pytest


def _run(tmp_path, steps=(10, 200), state=True):
    run = tmp_path / "run"
    for n in steps:
        d = run / "checkpoints" / f"step_{n:08d}"
        d.mkdir(parents=True)
        (d / "config.json").write_text("{}")
        (d / "model.safetensors").write_bytes(b"w%d" % n)
        if state:
            (d / "trainer.pt").write_bytes(b"")
    return run


def test_three_path_forms_resolve_alike_in_train_eval_and_embed(tmp_path):
    from sigvlp import checkpoint as ckpt_io
    from sigvlp import embed
    from sigvlp.eval import suite

    run = _run(tmp_path)
    last = run / "checkpoints" / "step_00000200"
    first = run / "checkpoints" / "step_00000010"
    for resolve in (ckpt_io.resolve_checkpoint, suite.resolve_checkpoint, embed.resolve_checkpoint):
        assert resolve(run) == last
        assert resolve(run / "checkpoints") == last  # embed refused this form before
        assert resolve(first) == first  # a step folder is itself
    assert ckpt_io.latest_checkpoint(run / "checkpoints") == last


def test_a_step_folder_counts_only_with_what_its_reader_needs(tmp_path):
    from sigvlp import checkpoint as ckpt_io

    run = _run(tmp_path, steps=(10,))
    torn = run / "checkpoints" / "step_00000300"
    torn.mkdir()  # no config.json, no trainer.pt
    weights_only = run / "checkpoints" / "step_00000400"
    weights_only.mkdir()
    (weights_only / "config.json").write_text("{}")  # loadable, but no trainer state
    assert ckpt_io.resolve_checkpoint(run) == weights_only  # eval / embed: config.json suffices
    assert ckpt_io.latest_checkpoint(run / "checkpoints") == run / "checkpoints" / "step_00000010"  # resume
    assert [s for s, _ in ckpt_io.list_checkpoints(run / "checkpoints", need=())] == [10, 300, 400]


@pytest.mark.parametrize("case", ["missing", "empty_run", "no_checkpoint"])
def test_resolve_errors_name_the_argument(tmp_path, case):
    from sigvlp import checkpoint as ckpt_io

    path = {"missing": tmp_path / "nowhere", "empty_run": tmp_path / "run", "no_checkpoint": tmp_path}[case]
    if case == "empty_run":
        (path / "checkpoints").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"^--ckpt: "):
        ckpt_io.resolve_checkpoint(path, what="--ckpt")


def test_checkpoint_hash_covers_config_and_weights(tmp_path):
    from sigvlp import checkpoint as ckpt_io

    run = _run(tmp_path)
    a, b = sorted((run / "checkpoints").iterdir())
    assert ckpt_io.checkpoint_hash(a) != ckpt_io.checkpoint_hash(b)  # weights differ
    (b / "model.safetensors").write_bytes(b"w10")
    assert ckpt_io.checkpoint_hash(a) == ckpt_io.checkpoint_hash(b)
    (b / "config.json").write_text('{"x": 1}')
    assert ckpt_io.checkpoint_hash(a) != ckpt_io.checkpoint_hash(b)
    (a / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        ckpt_io.checkpoint_hash(a)


def test_load_model_and_eval_load_checkpoint_share_the_rule(tmp_path):
    from sigvlp import checkpoint as ckpt_io
    from sigvlp.eval import load_checkpoint
    from sigvlp.model import SigVLP, SigVLPConfig

    cfg = SigVLPConfig.preset("tiny", width=64, layers=1, heads=2, mlp_dim=128, text_width=64, text_layers=1,
                              text_heads=2, text_mlp_dim=128, embed_dim=32)
    step = tmp_path / "run" / "checkpoints" / "step_00000005"
    SigVLP(cfg).save_pretrained(step)
    model, folder = ckpt_io.load_model(tmp_path / "run" / "checkpoints")
    assert folder == step and model.config == cfg
    model2, folder2, sha = load_checkpoint(tmp_path / "run")
    assert folder2 == step and sha == ckpt_io.checkpoint_hash(step) == ckpt_io.checkpoint_hash(folder)
    assert ckpt_io.state_hash(model) == ckpt_io.state_hash(model2)
    with pytest.raises(ValueError, match=r"^ckpt: .*width"):
        load_checkpoint(step, expect_preset="small")
