"""The evaluation suite end to end on tiny phantoms: chance-level AUROC untrained, better after a
brief training, the CLI's report and plots, the embedding cache, encoder FLOPs, bad input."""

import argparse
import csv
import json
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn", reason="the eval extra (scikit-learn) is not installed")
pytest.importorskip("matplotlib", reason="the eval extra (matplotlib) is not installed")

from sigvlp.checkpoint import checkpoint_hash  # noqa: E402
from sigvlp.demo.synth import SYNTH_PRESETS, write_dataset  # noqa: E402
from sigvlp.eval import suite as S  # noqa: E402
from sigvlp.eval.report import validate_report  # noqa: E402
from sigvlp.model import SigVLP, SigVLPConfig, volume_batch  # noqa: E402

FAST = S.EvalConfig(n_bootstrap=200, min_positives=3, min_negatives=3, progress=False, plots=False,
                    sections=("zero_shot",))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_phantoms")
    return write_dataset(root, n_train=16, n_valid=32, seed=3, config=SYNTH_PRESETS["tiny"], workers=2)


@pytest.fixture(scope="module")
def untrained(tmp_path_factory):
    torch.manual_seed(0)
    return SigVLP(SigVLPConfig.preset("tiny")).save_pretrained(tmp_path_factory.mktemp("ckpt_untrained"))


def _brief_training(data, out, steps=300):
    """A brief training of the untrained tiny model: its image head and logit scale fitted on the
    train split's chunks to the organ statements ("The {organ} is visible." / "... is not
    visible.", frozen text tower) by the cross-entropy of the two-way softmax that zero-shot
    scoring reads; the encoder stays frozen, so its features are computed once. (Abnormalities
    need the full training of `sigvlp demo`: at this size the untrained encoder's features carry
    no abnormality signal for a head to pick up.)"""
    from sigvlp.data.chunks import organs_in_chunk
    from sigvlp.data.organs import ORGANS

    torch.manual_seed(0)
    model = SigVLP(SigVLPConfig.preset("tiny"))
    cfg = model.config
    split = S.open_split(data, "train", cfg, FAST, need_labels=False)
    spans = S.chunk_plan(split, cfg.chunk_config(), 8, seed=1)
    feats = {}
    hook = model.visual.head.register_forward_hook(lambda m, i, o: feats.setdefault("x", i[0].detach()))
    with torch.no_grad():
        arrays = [split.entries[v][1].read(z0, z1).astype(np.float32) for v, z0, z1 in spans]
        b = volume_batch(arrays, cfg.patch_size)
        model.encode_volume(b["patches"], b["cu_seqlens"], b["max_seqlen"], b["grid_thw"])
        hook.remove()
        x = feats["x"]
        y = torch.zeros(len(spans), len(ORGANS))
        for i, (v, z0, z1) in enumerate(spans):
            for o in organs_in_chunk(split.entries[v][1].organ_profile, z0, z1, cfg.chunk_config()):
                y[i, ORGANS.index(o)] = 1
        cols = [j for j in range(len(ORGANS)) if 0 < int(y[:, j].sum()) < len(spans)]
        t = torch.stack([model.encode_texts([p.format(organ=ORGANS[j]) for p in S.ORGAN_PROMPTS]) for j in cols])
        direction = (t[:, 0] - t[:, 1]).T  # (embed_dim, organs): "visible" minus "not visible"
        head = model.visual.head  # start from features centred and scaled per channel
        head.weight.div_(x.std(0))
        head.bias.copy_(-head.weight @ x.mean(0))
    opt = torch.optim.AdamW(list(head.parameters()) + [model.log_logit_scale], lr=3e-2, weight_decay=0.0)
    for _ in range(steps):
        img = torch.nn.functional.normalize(head(x), dim=-1)
        logits = model.log_logit_scale.exp() * (img @ direction)  # two-way softmax = sigmoid of this
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y[:, cols])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.save_pretrained(out)


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    return _brief_training(data, tmp_path_factory.mktemp("ckpt_trained"))


def test_untrained_model_is_at_chance(data, untrained):
    r = S.evaluate(untrained, data, FAST)
    validate_report(r)
    zs = r["zero_shot"]
    assert len(zs["labels_used"]) >= 5
    ci = zs["bootstrap"]["mean_auroc"]
    assert abs(zs["mean"]["auroc"] - 0.5) < 0.12 and ci["low"] < 0.5 < ci["high"], (zs["mean"], ci)


def test_briefly_trained_model_beats_untrained(data, untrained, trained):
    cfg = S.EvalConfig(**{**FAST.to_dict(), "sections": ("organs",), "train_split": None})
    r0, r1 = S.evaluate(untrained, data, cfg), S.evaluate(trained, data, cfg)
    a0 = r0["organs"]["zero_shot"]["mean"]["auroc"]
    a1 = r1["organs"]["zero_shot"]["mean"]["auroc"]
    assert r1["organs"]["organs_used"] == r0["organs"]["organs_used"] and len(r1["organs"]["organs_used"]) >= 5
    assert a1 > 0.65 and a1 > a0 + 0.15, (a0, a1)
    assert r1["organs"]["linear_probe"] == {"skipped": "no train split embeddings"}


def _cli(argv):
    import sigvlp.eval as ev

    parser = argparse.ArgumentParser()
    ev.add_arguments(parser)
    return ev.run(parser.parse_args(argv))


def test_cli_writes_report_table_and_plots(data, trained, tmp_path, capsys):
    out = tmp_path / "eval"
    rc = _cli(["--ckpt", str(trained), "--data", str(data), "--out", str(out), "--bootstrap", "100",
               "--min-count", "3", "--depths", "4", "16", "--seg-volumes", "4", "--chunks-per-volume", "2",
               "--max-volumes", "24", "--max-train-volumes", "12", "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    for word in ("Zero-shot abnormality", "Organ classification", "volume_to_report", "Segmentation probe",
                 "Variable depth", "report.json"):
        assert word in text
    report = validate_report(json.loads((out / "report.json").read_text()))
    assert report["checkpoint"]["sha256"] == checkpoint_hash(trained)
    assert report["dataset"]["split"] == "valid" and report["dataset"]["n_volumes"] == 24
    assert report["zero_shot"]["bootstrap"]["n_resamples"] == 100
    assert report["organs"]["linear_probe"]["n_train"] == 24  # 12 volumes x 2 chunks
    assert report["retrieval"]["chunk_to_organ_text"]["n_queries"] == 48
    assert 0 < report["segmentation"]["per_organ_dice"]["lung"] <= 1
    pts = report["depth_sweep"]["points"]
    assert [p["slices"] for p in pts] == [4, 16] and pts[0]["encoder_flops"] < pts[1]["encoder_flops"]
    assert set(report["plots"]) == {"zero_shot_auroc", "organ_radar", "f1_vs_slices", "embedding_map"}
    for p in report["plots"].values():
        assert open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_embedding_cache_hit_and_invalidation(data, untrained, tmp_path, monkeypatch):
    calls = []
    real = S.Embedder.encode

    def counting(self, spans, *a, **k):
        calls.append(len(spans))
        return real(self, spans, *a, **k)

    monkeypatch.setattr(S.Embedder, "encode", counting)
    cfg = S.EvalConfig(**{**FAST.to_dict(), "cache": str(tmp_path / "cache"), "max_volumes": 12})
    a = S.evaluate(untrained, data, cfg)
    assert calls == [12]
    b = S.evaluate(untrained, data, cfg)  # same checkpoint, data and plan: served from the cache
    assert calls == [12] and a["zero_shot"]["per_label"] == b["zero_shot"]["per_label"]
    other = tmp_path / "ckpt2"
    shutil.copytree(untrained, other)
    model = SigVLP.from_pretrained(other)
    with torch.no_grad():
        model.logit_bias.add_(1.0)  # any change of the weights changes the checkpoint hash
    model.save_pretrained(other)
    S.evaluate(other, data, cfg)
    assert calls == [12, 12]


def test_encoder_flops_add_the_attention_the_counter_misses():
    from torch.utils.flop_counter import FlopCounterMode

    from sigvlp.eval.flops import encoder_flops

    cfg = SigVLPConfig.preset("tiny")
    model = SigVLP(cfg).eval()
    f = encoder_flops(model, 8, 64, 64)
    pt, ph, pw = cfg.patch_size
    n = (8 // pt) * (64 // ph) * (64 // pw)
    # self-attention in every layer (n x n) and the MAP probe (1 query x n keys), 4 * Lq * Lk * width
    want = 4 * cfg.width * (cfg.layers * n * n + (n if cfg.pool == "map" else 0))
    assert f["tokens"] == n and f["attention_analytic"] == want
    # the counter itself sees the linear layers: at least 2 * tokens * (in * out) per matmul
    linear = 2 * n * pt * ph * pw * cfg.width + cfg.layers * 2 * n * (4 * cfg.width ** 2 + 2 * cfg.width * cfg.mlp_dim)
    assert linear <= f["counted"] < 1.2 * linear + 4 * n * cfg.width ** 2
    assert f["total"] == f["counted"] + f["attention_analytic"]
    with FlopCounterMode(display=False) as fc:  # control: the counter alone misses the attention
        b = volume_batch([np.zeros((8, 64, 64), np.float32)], cfg.patch_size)
        with torch.no_grad():
            model.encode_volume(b["patches"], b["cu_seqlens"], b["max_seqlen"], b["grid_thw"])
    assert fc.get_total_flops() == f["counted"]


# ----------------------------------------------------------------------------- bad input
def _copy(data, tmp_path):
    dst = tmp_path / "data"
    shutil.copytree(data, dst, ignore=shutil.ignore_patterns(".sigvlp_cache"))
    return dst


def _rewrite_labels(root, drop=None):
    path = next((root / "dataset" / "multi_abnormality_labels").glob("valid_*.csv"))
    rows = list(csv.DictReader(open(path)))
    cols = [c for c in rows[0] if c != drop]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return path


def test_labels_csv_missing_a_column(data, untrained, tmp_path):
    root = _copy(data, tmp_path)
    _rewrite_labels(root, drop="Cardiomegaly")
    with pytest.raises(ValueError, match=r"labels CSV .*_labels.csv: missing column\(s\) \['Cardiomegaly'\]"):
        S.evaluate(untrained, root, FAST)
    # naming the labels to score works around it
    cfg = S.EvalConfig(**{**FAST.to_dict(), "labels": ("Lung nodule", "Pleural effusion")})
    r = S.evaluate(untrained, root, cfg)
    assert set(r["zero_shot"]["labels_used"]) <= {"Lung nodule", "Pleural effusion"}


def test_label_absent_from_csv(data, untrained):
    cfg = S.EvalConfig(**{**FAST.to_dict(), "labels": ("Lung nodule", "Pneumothorax")})
    with pytest.raises(ValueError, match=r"labels: \['Pneumothorax'\] absent from the labels CSV"):
        S.evaluate(untrained, data, cfg)


def test_checkpoint_of_another_config(data, untrained, tmp_path, capsys):
    cfg = S.EvalConfig(**{**FAST.to_dict(), "expect_preset": "small"})
    with pytest.raises(ValueError, match=r"ckpt: .*differs from the requested config in field\(s\): .*width"):
        S.evaluate(untrained, data, cfg)
    # a config.json that does not match the weights
    bad = tmp_path / "bad"
    shutil.copytree(untrained, bad)
    raw = json.loads((bad / "config.json").read_text())
    raw["config"]["width"] = 128
    raw["config"]["mlp_dim"] = 512
    (bad / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="ckpt: .*weights do not fit"):
        S.evaluate(bad, data, FAST)
    assert _cli(["--ckpt", str(bad), "--data", str(data), "--no-progress"]) == 2
    assert "sigvlp eval: error: ckpt:" in capsys.readouterr().err


def test_empty_split_and_missing_folders(data, untrained, tmp_path):
    root = _copy(data, tmp_path)
    shutil.rmtree(root / "dataset" / "valid")
    with pytest.raises(FileNotFoundError, match=r"no 'valid' volume folder \(looked for .*valid_fixed"):
        S.evaluate(untrained, root, FAST)
    (root / "dataset" / "valid").mkdir()
    with pytest.raises(ValueError, match="split 'valid' of .* has no usable volumes"):
        S.evaluate(untrained, root, FAST)
    with pytest.raises(FileNotFoundError, match="data: no such dataset folder"):
        S.evaluate(untrained, tmp_path / "nowhere", FAST)
    with pytest.raises(FileNotFoundError, match="ckpt: no such checkpoint folder"):
        S.evaluate(tmp_path / "nockpt", data, FAST)
    with pytest.raises(ValueError, match="prompts: expected two templates"):
        S.EvalConfig(prompts=("{label} is present.",))
    with pytest.raises(ValueError, match="sections: unknown"):
        S.EvalConfig(sections=("zero_shot", "fun"))


def test_embedding_cache_key_follows_the_data(tmp_path):
    """A changed preprocessed entry (its content-keyed file name) misses the cache."""
    from dataclasses import dataclass

    @dataclass
    class Entry:  # stands in for a CachedVolume
        file: str
        image: np.ndarray

        @property
        def shape(self):
            return self.image.shape

        def read(self, z0=0, z1=None):
            return self.image[z0:z1]

    torch.manual_seed(0)
    model = SigVLP(SigVLPConfig.preset("tiny")).eval()
    cfg = S.EvalConfig(cache=str(tmp_path), progress=False)
    emb = S.Embedder(model, torch.device("cpu"), cfg, "sha")
    rng = np.random.default_rng(0)
    vol = rng.uniform(-1, 1, (8, 64, 64)).astype(np.float16)

    def split(name):
        return S.Split("valid", tmp_path, [(None, Entry(f"/cache/{name}.safetensors", vol))], None, [], None)

    a, _ = emb.cached_encode(split("v1-aaaa"), [(0, 0, 8)], set(), "t")
    b, _ = emb.cached_encode(split("v1-aaaa"), [(0, 0, 8)], set(), "t")
    files = sorted((tmp_path / "eval").glob("emb-valid-*.safetensors"))
    assert len(files) == 1 and np.array_equal(a, b)
    emb.cached_encode(split("v1-bbbb"), [(0, 0, 8)], set(), "t")  # same volume name, new content key
    emb.cached_encode(split("v1-aaaa"), [(0, 0, 4)], set(), "t")  # another span plan
    assert len(sorted((tmp_path / "eval").glob("emb-valid-*.safetensors"))) == 3
