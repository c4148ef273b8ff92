"""SigVLP.from_siglip: Hugging Face SigLIP weights -> SigVLP, checked against transformers' own
SiglipModel (a small random one saved with save_pretrained; transformers is a test dependency:
these tests fail, not skip, without it), and transformers importing beside our kernels/ folder."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest
import torch

from sigvlp.model import SigVLP, SigVLPConfig, volume_batch
from sigvlp.model.siglip import siglip_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
WIDTH, LAYERS, HEADS, MLP, VOCAB, TABLE = 64, 2, 2, 128, 300, 16
WORDS = ["lung", "nodule", "liver", "cyst", "no", "effusion", "the", "is", "a", "right", "left", "."]


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def _hf_model(seed=0):
    from transformers import SiglipConfig, SiglipModel

    torch.manual_seed(seed)
    tower = dict(hidden_size=WIDTH, intermediate_size=MLP, num_hidden_layers=LAYERS, num_attention_heads=HEADS)
    cfg = SiglipConfig(text_config=dict(tower, vocab_size=VOCAB, max_position_embeddings=TABLE, bos_token_id=1,
                                        eos_token_id=2, pad_token_id=0),
                       vision_config=dict(tower, image_size=16, patch_size=16))
    model = SiglipModel(cfg).eval()
    with torch.no_grad():  # SigLIP's init leaves some of these at 0 / 1: make every weight count
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def _write_tokenizer(folder: pathlib.Path, lowercase: bool = True) -> None:
    """A word-level tokenizer.json ([BOS] words [EOS], padding to 16 saved in the file) and a
    tokenizer_config.json declaring do_lower_case."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {w: i for i, w in enumerate(["[PAD]", "[BOS]", "[EOS]", "[UNK]", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[BOS] $A [EOS]",
                                                       special_tokens=[("[BOS]", 1), ("[EOS]", 2)])
    tok.enable_padding(length=16, pad_id=0, pad_token="[PAD]")
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": lowercase}))


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """(transformers model, its save_pretrained folder with a tokenizer)."""
    model = _hf_model()
    folder = tmp_path_factory.mktemp("siglip")
    model.save_pretrained(folder)
    _write_tokenizer(folder)
    return model, folder


def _copy(folder, dest):
    dest.mkdir()
    for f in folder.iterdir():
        (dest / f.name).write_bytes(f.read_bytes())
    return dest


# ----------------------------------------------------------------------------- transformers beside kernels/
def test_transformers_imports_from_the_repository_root():
    code = ("import sys; sys.path.insert(0, '.'); from transformers import SiglipModel; import kernels; "
            "print('KERNELS', kernels.__file__)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "KERNELS" in result.stdout and str(ROOT / "kernels") not in result.stdout, result.stdout


def test_transformers_imports_under_pytest():
    assert any(pathlib.Path(p or ".").resolve() == ROOT for p in sys.path)  # pytest put the rootdir there
    from transformers import SiglipModel  # noqa: F401

    assert not str(pathlib.Path(sys.modules["kernels"].__file__).resolve()).startswith(str(ROOT))


# ----------------------------------------------------------------------------- equivalence with transformers
@pytest.fixture(scope="module")
def learned(hf):
    return SigVLP.from_siglip(hf[1], text_positions="learned", attn_backend="torch").eval()


def test_text_tower_equals_transformers_with_learned_positions(hf, learned):
    model, _ = hf
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (3, TABLE), generator=gen)
    with torch.no_grad():
        out = model.get_text_features(input_ids=ids)
        want = out if isinstance(out, torch.Tensor) else out.pooler_output
        cu = torch.arange(4, dtype=torch.int32) * TABLE
        got = learned.text(ids.reshape(-1), cu, TABLE)
        assert _rel(got, want) < 1e-5
        # unpadded texts of other lengths, packed: each equals SigLIP on that text alone
        lengths = [5, TABLE, 9]
        rows = [torch.randint(0, VOCAB, (n,), generator=gen) for n in lengths]
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
        got = learned.text(torch.cat(rows), cu, max(lengths))
        for i, r in enumerate(rows):
            out = model.get_text_features(input_ids=r[None])
            assert _rel(got[i], (out if isinstance(out, torch.Tensor) else out.pooler_output)[0]) < 1e-5
    assert learned.log_logit_scale.item() == model.logit_scale.item() and learned.logit_bias.item() == (
        model.logit_bias.item())


@pytest.mark.parametrize("tower", ["vision", "text"])
def test_every_encoder_layer_equals_transformers(hf, learned, tower):
    model, _ = hf
    theirs = (model.vision_model if tower == "vision" else model.text_model).encoder.layers
    ours = (learned.visual if tower == "vision" else learned.text).blocks
    assert len(ours) == len(theirs) == LAYERS
    x = torch.randn(1, 7, WIDTH, generator=torch.Generator().manual_seed(2))
    cu = torch.tensor([0, 7], dtype=torch.int32)
    with torch.no_grad():
        for i, (a, b) in enumerate(zip(ours, theirs)):
            out = b(x, attention_mask=None)
            want = out[0] if isinstance(out, tuple) else out
            assert _rel(a(x[0], cu, 7, None), want[0]) < 1e-5, i  # grid None: no rotation


def _grey_vision(model, image):
    """transformers' vision tower (encoder, post-layernorm, MAP head) on a grey image, 2-D
    position table zeroed (SigVLP drops it)."""
    with torch.no_grad():
        model.vision_model.embeddings.position_embedding.weight.zero_()
        pixels = image[None, None].expand(1, 3, -1, -1)
        return model.vision_model(pixel_values=pixels).pooler_output[0]


@pytest.mark.parametrize("hu", [None, (-500.0, 100.0)])
def test_inflated_patch_embeds_a_z_constant_volume_as_siglip_embeds_the_slice(hf, hu):
    model, folder = hf
    ours = SigVLP.from_siglip(folder, attn_backend="torch", hu=hu and {"thresholds": hu}).eval()
    assert ours.config.patch_size == (16, 16, 16) and ours.config.text_positions == "rope"
    assert torch.equal(ours.visual.head.weight, torch.eye(WIDTH)) and not ours.visual.head.bias.any()
    image = torch.rand(16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    batch = volume_batch([image[None].expand(16, -1, -1)], (16, 16, 16))
    with torch.no_grad():
        pooled, tokens = ours.visual(batch["patches"], batch["cu_seqlens"], batch["max_seqlen"], batch["grid_thw"])
    assert tokens.shape == (1, WIDTH)
    assert _rel(pooled[0], _grey_vision(_hf_model(), image)) < 1e-5
    # many tokens: 2 x 3 x 2, finite features
    vol = torch.rand(32, 48, 32, generator=torch.Generator().manual_seed(4)) * 2 - 1
    batch = volume_batch([vol], (16, 16, 16))
    with torch.no_grad():
        out = ours(batch)
    assert out.tokens.shape == (12, WIDTH) and torch.isfinite(out.tokens).all() and torch.isfinite(out.image_emb).all()


def test_random_patch_init_and_rope_text(hf):
    _, folder = hf
    a = SigVLP.from_siglip(folder, patch_init="random", patch_size=(4, 16, 16), attn_backend="torch")
    b = SigVLP.from_siglip(folder, patch_size=(4, 16, 16), attn_backend="torch")
    assert a.visual.patch_embed.weight.shape == (WIDTH, 4 * 16 * 16)
    assert not torch.equal(a.visual.patch_embed.weight, b.visual.patch_embed.weight)
    assert torch.equal(a.text.token_embedding.weight, b.text.token_embedding.weight)
    assert a.text.position_embedding is None and a.config.max_text_tokens == TABLE
    emb = a.encode_texts(["the lung nodule", "no effusion ."])
    assert emb.shape == (2, WIDTH) and torch.isfinite(emb).all()


# ----------------------------------------------------------------------------- config, tokenizer, save/load
def test_config_derived_from_the_checkpoint(hf, tmp_path):
    _, folder = hf
    cfg = siglip_config(folder)
    assert (cfg.width, cfg.layers, cfg.heads, cfg.mlp_dim, cfg.text_width, cfg.text_layers, cfg.text_heads,
            cfg.text_mlp_dim, cfg.vocab_size, cfg.embed_dim, cfg.max_text_tokens, cfg.norm_eps, cfg.pool,
            cfg.text_pool, cfg.hu) == (WIDTH, LAYERS, HEADS, MLP, WIDTH, LAYERS, HEADS, MLP, VOCAB, WIDTH,
                                                  TABLE, 1e-6, "map", "last", None)
    assert pathlib.Path(cfg.tokenizer) == folder.resolve()
    # google/siglip2-large-patch16-256's config.json geometry gives the "siglip2-large" preset
    tower = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                 hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["SiglipModel"], "model_type": "siglip",
        "text_config": dict(tower, vocab_size=256000, max_position_embeddings=64, projection_size=1024),
        "vision_config": dict(tower, image_size=256, patch_size=16, num_channels=3)}))
    derived = siglip_config(tmp_path)
    assert derived.diff(SigVLPConfig.preset("siglip2-large")) == {"tokenizer": (str(tmp_path.resolve()), "byte")}


def test_tokenizer_is_the_folders_own_lowercased_and_unpadded(hf, learned):
    ids = learned.tokenize(["The LUNG nodule", "no"])
    assert ids["text_ids"].tolist() == [1, 10, 4, 5, 2, 1, 8, 2]  # [BOS] the lung nodule [EOS] [BOS] no [EOS]
    assert ids["text_cu_seqlens"].tolist() == [0, 5, 8]
    long = learned.tokenize([" ".join(["lung"] * 40)])
    assert long["text_max_seqlen"] == TABLE and long["text_ids"][-1] == 2  # capped at the table, EOS kept


def test_tokenizer_lowercase_declarations(tmp_path):
    from sigvlp.data.tokenizers import HFTokenizer

    cases = [({"do_lower_case": True}, {}, True), ({"tokenizer_class": "Siglip2Tokenizer"}, {}, True),
             ({"tokenizer_class": "GemmaTokenizer"}, {"model_type": "siglip"}, True),  # SigLIP-2's files
             ({"tokenizer_class": "GemmaTokenizerFast"}, {"model_type": "llama"}, False), ({}, {}, False)]
    for i, (tok_cfg, model_cfg, want) in enumerate(cases):
        d = tmp_path / str(i)
        d.mkdir()
        (d / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
        (d / "config.json").write_text(json.dumps(model_cfg))
        assert HFTokenizer.declares_lowercase(d) is want, (tok_cfg, model_cfg)


def test_text_positions_is_saved_with_the_model(learned, tmp_path):
    learned.save_pretrained(tmp_path)
    again = SigVLP.from_pretrained(tmp_path, attn_backend="torch").eval()
    assert again.config.text_positions == "learned"
    t = learned.tokenize(["left cyst"])
    with torch.no_grad():
        assert torch.equal(again.encode_text(t["text_ids"], t["text_cu_seqlens"], t["text_max_seqlen"]),
                           learned.encode_text(t["text_ids"], t["text_cu_seqlens"], t["text_max_seqlen"]))
    with pytest.raises(ValueError, match="text_positions"):
        SigVLPConfig.preset("tiny", text_positions="alibi")


def test_sharded_checkpoint_loads(hf, learned, tmp_path):
    model, folder = hf
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    _write_tokenizer(tmp_path)
    assert (tmp_path / "model.safetensors.index.json").is_file() and not (tmp_path / "model.safetensors").exists()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    sharded = SigVLP.from_siglip(tmp_path, text_positions="learned", attn_backend="torch")
    a, b = sharded.state_dict(), learned.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- errors
def _rewrite_weights(folder, edit):
    from safetensors.torch import load_file, save_file

    state = load_file(str(folder / "model.safetensors"))
    edit(state)
    save_file(state, str(folder / "model.safetensors"))


def test_missing_and_unexpected_keys_are_errors(hf, tmp_path):
    _, folder = hf
    missing = _copy(folder, tmp_path / "missing")
    _rewrite_weights(missing, lambda s: s.pop("text_model.encoder.layers.1.mlp.fc2.bias"))
    with pytest.raises(ValueError, match=r"missing checkpoint key.*text_model\.encoder\.layers\.1\.mlp\.fc2\.bias"):
        SigVLP.from_siglip(missing)
    extra = _copy(folder, tmp_path / "extra")
    _rewrite_weights(extra, lambda s: s.update({"vision_model.extra.weight": torch.zeros(3)}))
    with pytest.raises(ValueError, match=r"unexpected checkpoint key.*vision_model\.extra\.weight"):
        SigVLP.from_siglip(extra)
    shaped = _copy(folder, tmp_path / "shaped")
    _rewrite_weights(shaped, lambda s: s.update({"text_model.head.bias": torch.zeros(WIDTH + 1)}))
    with pytest.raises(ValueError, match=r"text_model\.head\.bias.*text\.head\.bias"):
        SigVLP.from_siglip(shaped)


def test_other_architectures_and_bad_options_are_errors(hf, tmp_path):
    _, folder = hf
    for model_type, match in (("siglip2", "NaFlex Siglip2Model.*supported: Hugging Face SiglipModel"),
                              ("clip", "model_type 'clip'.*supported")):
        other = _copy(folder, tmp_path / model_type)
        cfg = json.loads((other / "config.json").read_text())
        (other / "config.json").write_text(json.dumps({**cfg, "model_type": model_type}))
        with pytest.raises(ValueError, match=match):
            SigVLP.from_siglip(other)
    for kwargs, match in (({"width": 128}, "width: 128 contradicts the checkpoint's 64"),
                          ({"patch_size": (16, 8, 8)}, "patch_size"), ({"pool": "mean"}, "pool"),
                          ({"vocab_size": 400}, "vocab_size"), ({"tokenizer": "byte"}, "tokenizer"),
                          ({"logit_scale_init": 3.0}, "logit_scale_init"),
                          ({"patch_init": "zeros"}, "patch_init"),
                          ({"text_positions": "learned", "max_text_tokens": TABLE + 1}, "max_text_tokens"),
                          ({"text_positions": "alibi"}, "text_positions")):
        with pytest.raises(ValueError, match=match):
            SigVLP.from_siglip(folder, **kwargs)
    no_tok = _copy(folder, tmp_path / "no_tokenizer")
    (no_tok / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        SigVLP.from_siglip(no_tok)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        SigVLP.from_siglip(tmp_path / "nowhere")


# ----------------------------------------------------------------------------- training from SigLIP
def test_sigvlp_train_init_siglip_saves_and_resumes(hf, tmp_path_factory, capsys):
    from _data_helpers import tiny_dataset

    from sigvlp.cli import main
    from sigvlp.train import TrainConfig
    from sigvlp.checkpoint import latest_checkpoint

    _, folder = hf
    data, root = tiny_dataset(tmp_path_factory, n_train=4, n_valid=0), tmp_path_factory.mktemp("train_siglip")
    out = root / "run"
    args = ["train", "--data", str(data), "--cache", str(root / "cache"), "--out", str(out), "--init-siglip",
            str(folder), "--set", "model.patch_size=[4, 16, 16]", "--set", "model.preprocess=tiny", "--set",
            "model.chunk=tiny", "--set", "model.attn_backend=torch", "--token-budget", "512", "--num-workers", "0",
            "--threads", "1", "--warmup-steps", "1", "--ckpt-every", "1",
            "--no-progress", "--no-tensorboard"]
    assert main([*args, "--steps", "2"]) == 0, capsys.readouterr().err
    first = latest_checkpoint(out / "checkpoints")
    assert first.name.endswith("2")
    converted = SigVLP.from_siglip(folder, patch_size=(4, 16, 16), preprocess="tiny", chunk="tiny")
    assert SigVLP.load_config(first).diff(converted.config) == {}
    assert main(["train", "--resume", "--out", str(out), "--steps", "3"]) == 0, capsys.readouterr().err
    last = latest_checkpoint(out / "checkpoints")
    assert last.name.endswith("3") and f"resumed from {first}" in (out / "log.txt").read_text()
    trained = SigVLP.from_pretrained(last)
    moved = [k for k, v in trained.state_dict().items() if not torch.equal(v, converted.state_dict()[k])]
    assert "text.token_embedding.weight" in moved and "visual.blocks.0.attn.qkv.weight" in moved
    # init_from and init_siglip exclude each other; TrainConfig's model defaults to "base"
    assert main([*args, "--out", str(root / "both"), "--init-from", str(last), "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "init_from" in err and "init_siglip" in err and "give one" in err, err
    assert TrainConfig().model == "base"
