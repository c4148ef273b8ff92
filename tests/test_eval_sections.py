"""Each evaluation section (sigvlp.eval.suite.SECTIONS) run alone on a small context built by
`prepare` from tiny phantoms and an untrained tiny model, checked against an independent
computation: scores from the model's own text embeddings and a float64 softmax, AUROCs from
scikit-learn's roc_auc_score, Dice from its per-class F1, recall@k from an argsort, the map from
numpy's SVD."""

import csv

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn", reason="the eval extra (scikit-learn) is not installed")

from sklearn.metrics import f1_score, roc_auc_score  # noqa: E402

from sigvlp.data.chunks import organs_in_chunk  # noqa: E402
from sigvlp.data.organs import ORGANS  # noqa: E402
from sigvlp.demo.synth import SYNTH_PRESETS, write_dataset  # noqa: E402
from sigvlp.eval import report as R  # noqa: E402
from sigvlp.eval import suite as S  # noqa: E402
from sigvlp.model import SigVLP, SigVLPConfig, volume_batch  # noqa: E402

N_TRAIN, N_VALID, SEG_VOLUMES = 8, 16, 4


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("section_phantoms")
    return write_dataset(root, n_train=N_TRAIN, n_valid=N_VALID, seed=3, config=SYNTH_PRESETS["tiny"], workers=2)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return SigVLP(SigVLPConfig.preset("tiny")).eval()


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("section_cache")


def _context(model, data, cache, sections, **kw):
    cfg = S.EvalConfig(sections=sections, n_bootstrap=50, min_positives=2, min_negatives=2, chunks_per_volume=2,
                       depths=(4, 16), seg_volumes=SEG_VOLUMES, progress=False, plots=False, cache=str(cache), **kw)
    return S.prepare(model, data, cfg, "sections-test", torch.device("cpu"))


def _present_prob(model, emb, templates, key, values) -> np.ndarray:
    """(N, V) float64 probability of the positive prompt: softmax over the two logits."""
    with torch.no_grad():
        t = [torch.nn.functional.normalize(model.encode_texts([tpl.format(**{key: v}) for v in values]).double(),
                                           dim=-1) for tpl in templates]
        scale, bias = model.log_logit_scale.double().exp(), model.logit_bias.double()
    e = torch.as_tensor(emb, dtype=torch.float64)
    logits = torch.stack([scale * e @ t[0].T + bias, scale * e @ t[1].T + bias])
    return torch.softmax(logits, 0)[0].numpy()


def _csv_labels(split) -> dict:
    path = next((split.root / "dataset" / "multi_abnormality_labels").glob("valid_*.csv"))
    return {r["VolumeName"]: r for r in csv.DictReader(open(path, newline=""))}


def test_registry_is_the_report_sections_in_order():
    assert list(S.SECTIONS) == list(R.SECTIONS)
    assert all(callable(f) for f in S.SECTIONS.values())


def test_zero_shot_alone(model, data, cache):
    ctx = _context(model, data, cache, ("zero_shot",))
    valid = ctx.valid
    # the pooled embeddings are the model's own embeddings of the whole volumes
    batch = volume_batch([cv.read().astype(np.float32) for _, cv in valid.entries], model.config.patch_size)
    with torch.no_grad():
        direct = model.encode_volume(batch["patches"], batch["cu_seqlens"], batch["max_seqlen"], batch["grid_thw"])[0]
    emb = ctx.rows(ctx.spans)
    np.testing.assert_allclose(emb, direct.numpy(), atol=1e-5)
    sec = S.SECTIONS["zero_shot"](ctx)
    rows = _csv_labels(valid)
    y = np.array([[int(float(rows[rec.name][n])) for n in valid.label_names] for rec, _ in valid.entries])
    expect = [n for j, n in enumerate(valid.label_names) if 2 <= y[:, j].sum() <= len(y) - 2]
    assert sec["labels_used"] == expect and len(expect) >= 3 and ctx.labels_used == expect
    p = _present_prob(model, emb, ctx.config.prompts, "label", valid.label_names)
    for n in expect:
        j = valid.label_names.index(n)
        assert sec["per_label"][n]["auroc"] == pytest.approx(roc_auc_score(y[:, j], p[:, j]), abs=1e-12)
        assert sec["per_label"][n]["n_pos"] == y[:, j].sum()
    assert sec["n_volumes"] == N_VALID and sec["bootstrap"]["n_resamples"] == 50
    # the driver runs the same function over the same context
    r = S.evaluate(None, data, ctx.config, model=model)
    assert r["zero_shot"] == sec and r["organs"] == {"skipped": "not requested"}


def test_organs_alone(model, data, cache):
    ctx = _context(model, data, cache, ("organs",))
    assert len(ctx.chunk_spans) == 2 * N_VALID and ctx.train is not None and not ctx.depth_spans
    sec = S.SECTIONS["organs"](ctx)
    y = np.zeros((len(ctx.chunk_spans), len(ORGANS)), int)
    for i, (v, z0, z1) in enumerate(ctx.chunk_spans):
        for o in organs_in_chunk(ctx.valid.entries[v][1].organ_profile, z0, z1, model.config.chunk_config()):
            y[i, ORGANS.index(o)] = 1
    p = _present_prob(model, ctx.rows(ctx.chunk_spans), ctx.config.organ_prompts, "organ", ORGANS)
    assert sec["n_chunks"] == len(y) and len(sec["organs_used"]) >= 3
    for o in sec["organs_used"]:
        j = ORGANS.index(o)
        m = sec["zero_shot"]["per_organ"][o]
        assert m["n_pos"] == y[:, j].sum() and m["auroc"] == pytest.approx(roc_auc_score(y[:, j], p[:, j]), abs=1e-12)
    assert sec["linear_probe"]["n_train"] == 2 * N_TRAIN  # the train split's chunks
    assert 0 <= sec["linear_probe"]["mean"]["auroc"] <= 1


def test_retrieval_alone(model, data, cache):
    ctx = _context(model, data, cache, ("retrieval",))
    sec = S.SECTIONS["retrieval"](ctx)
    texts = [S.volume_text(rec, cv.organ_profile, ctx.chunk_config) for rec, cv in ctx.valid.entries]
    keep = [i for i, t in enumerate(texts) if t]
    texts = np.array([texts[i] for i in keep], dtype=object)
    with torch.no_grad():
        t = torch.nn.functional.normalize(model.encode_texts(list(texts)).double(), dim=-1).numpy()
    sim = ctx.rows(ctx.spans)[keep].astype(np.float64) @ t.T
    for name, s in (("volume_to_report", sim), ("report_to_volume", sim.T)):
        top = np.argsort(-s, axis=1)
        for k in (1, 5):
            hit = [(texts[top[q, :k]] == texts[q]).any() for q in range(len(texts))]
            assert sec[name][f"R@{k}"] == pytest.approx(np.mean(hit), abs=1e-12), (name, k)
        assert sec[name]["n_queries"] == len(keep)
    assert sec["n_volumes_without_text"] == N_VALID - len(keep)
    assert sec["chunk_to_organ_text"]["n_queries"] + sec["chunk_to_organ_text"]["n_without_text"] == 2 * N_VALID


def test_segmentation_alone(model, data, cache, monkeypatch):
    fitted, real = [], S.fit_segmentation_probe

    def keep(*a, **k):  # the probe the section fits, to predict with independently
        fitted.append(real(*a, **k))
        return fitted[-1]

    monkeypatch.setattr(S, "fit_segmentation_probe", keep)
    ctx = _context(model, data, cache, ("segmentation",))
    assert len(ctx.tokens) == SEG_VOLUMES
    sec = S.SECTIONS["segmentation"](ctx)
    patch = model.config.patch_size
    n_tokens = sum(-(-cv.shape[0] // patch[0]) * (cv.shape[1] // patch[1]) * (cv.shape[2] // patch[2])
                   for _, cv in ctx.train.entries[:SEG_VOLUMES])
    assert sec["n_train_volumes"] == SEG_VOLUMES and sec["n_valid_volumes"] == SEG_VOLUMES
    assert sec["n_train_tokens"] == min(n_tokens, ctx.config.seg_max_tokens)
    # Dice per organ = per-class F1 over the evaluated volumes' patches / voxels
    probe, n_classes = fitted[0], len(ORGANS) + 1
    pat_p, pat_t, vox_p, vox_t = [], [], [], []
    for v in range(SEG_VOLUMES):
        tok, grid = ctx.tokens[ctx.index[ctx.spans[v]]]
        cv = ctx.valid.entries[v][1]
        pat_p.append(probe.predict(tok.astype(np.float32)))
        pat_t.append(cv.organ_labels(patch).reshape(-1))
        vox_p.append(S.predict_voxels(probe, tok, grid, patch, cv.shape[0], n_classes).reshape(-1))
        vox_t.append(cv.organ_map().reshape(-1))
    for key, p, t in (("per_organ_dice_patch", pat_p, pat_t), ("per_organ_dice", vox_p, vox_t)):
        f1 = f1_score(np.concatenate(t), np.concatenate(p), labels=range(n_classes), average=None, zero_division=0)
        assert sec[key] and {o: f1[ORGANS.index(o) + 1] for o in sec[key]} == pytest.approx(sec[key], abs=1e-12)
    assert sec["mean_dice"] == pytest.approx(np.mean(list(sec["per_organ_dice"].values())), abs=1e-12)
    assert sec["per_organ_dice"]["lung"] > 0


def test_depth_sweep_alone(model, data, cache):
    ctx = _context(model, data, cache, ("depth_sweep",))
    valid = ctx.valid
    y = valid.labels
    # zero-shot did not run: the labels with --min-count (2) positive and negative volumes
    counted = [j for j in range(y.shape[1]) if 2 <= y[:, j].sum() <= len(y) - 2]
    assert 0 < len(counted) < y.shape[1]  # the rule keeps some labels and drops others here
    assert ctx.labels_used == [valid.label_names[j] for j in counted]
    sec = S.SECTIONS["depth_sweep"](ctx)
    pt, ph, pw = model.config.patch_size
    assert [p["slices"] for p in sec["points"]] == [4, 16]
    for p in sec["points"]:
        d = p["slices"]
        crops = [(v, max(0, (cv.shape[0] - d) // 2), max(0, (cv.shape[0] - d) // 2) + min(d, cv.shape[0]))
                 for v, (_, cv) in enumerate(valid.entries)]
        s = _present_prob(model, ctx.rows(crops), ctx.config.prompts, "label", valid.label_names)
        assert p["n_labels"] == len(counted)
        assert p["mean_auroc"] == pytest.approx(np.mean([roc_auc_score(y[:, j], s[:, j]) for j in counted]),
                                                abs=1e-12)
        h, w = valid.entries[0][1].shape[1:]
        assert p["tokens"] == -(-d // pt) * (h // ph) * (w // pw)
        assert p["volumes_shorter"] == sum(cv.shape[0] < d for _, cv in valid.entries)
    assert sec["points"][0]["encoder_flops"] < sec["points"][1]["encoder_flops"]


def test_embedding_map_alone(model, data, cache):
    ctx = _context(model, data, cache, ("embedding_map",))
    sec = S.SECTIONS["embedding_map"](ctx)
    assert sec["n"] == N_VALID and ctx.map_coords.shape == (N_VALID, 2)
    if sec["method"] == "pca":  # the projection on the top two principal axes (signs free)
        x = ctx.rows(ctx.spans).astype(np.float64)
        x = x - x.mean(0)
        want = x @ np.linalg.svd(x, full_matrices=False)[2][:2].T
        got = ctx.map_coords * np.sign(np.sum(ctx.map_coords * want, 0))
        np.testing.assert_allclose(got, want, atol=1e-9)
    else:
        assert sec["method"] == "umap" and np.isfinite(ctx.map_coords).all()
