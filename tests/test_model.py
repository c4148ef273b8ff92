"""sigvlp.model: config presets and errors, forward/backward, packing invariance, patch embedding =
Conv3d, MAP pooling vs an fp64 oracle, overfitting, save/load, no absolute positions."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sigvlp.model import HUEncodingConfig, SigVLP, SigVLPConfig, volume_batch
from sigvlp.ops import cu_seqlens_from_lengths, sigmoid_loss


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny shapes: one intra-op thread is ~10x faster than two on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


#: an HU encoding whose thresholds sit between integer HU (test volumes below are integer HU)
_HU = {"hu": HUEncodingConfig(thresholds=(-950.5, -600.5, -0.5, 300.5), grid=(2, 4, 2))}


def _tiny(**kw):
    return SigVLPConfig.preset("tiny", **kw)


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    return SigVLP(_tiny(**kw)).eval()


def _volumes(depths, seed=0, size=64):
    rng = np.random.default_rng(seed)
    return [rng.uniform(-1, 1, (d, size, size)).astype(np.float32) for d in depths]


def _batch(model, depths, texts=None, seed=0):
    b = volume_batch(_volumes(depths, seed), model.config.patch_size)
    if texts is not None:
        b.update(model.tokenize(texts))
    return b


# ----------------------------------------------------------------------------- config


def test_presets_geometry():
    base, large = SigVLPConfig.preset("base"), SigVLPConfig.preset("large")
    assert (base.width, base.layers, base.heads, base.mlp_dim) == (768, 12, 12, 3072)
    assert (large.width, large.layers, large.heads, large.head_dim, large.mlp_dim) == (1024, 24, 16, 64, 4096)
    assert large.patch_size == (16, 16, 16) and large.text_rope_theta == 1000.0 and large.rope_theta == 10000.0
    tiny = SigVLPConfig.preset("tiny")
    assert tiny.preprocess == "tiny" and tiny.chunk == "tiny" and tiny.patch_size == (4, 16, 16)
    assert tiny.chunk_config().patch == tiny.patch_size and tiny.preprocess_config().size == 64
    assert SigVLPConfig.preset("small", layers=3, pool="mean").layers == 3


def test_bad_key_and_unknown_preset():
    with pytest.raises(TypeError, match="unknown field.*nope.*valid fields.*width"):
        SigVLPConfig.preset("tiny", nope=1)
    with pytest.raises(TypeError, match=r"unknown field.*nope.*valid fields.*width"):
        SigVLPConfig(nope=1)
    with pytest.raises(ValueError, match="unknown SigVLP preset 'huge'.*base.*large.*small.*tiny"):
        SigVLPConfig.preset("huge")
    with pytest.raises(ValueError, match="head_dim"):
        SigVLPConfig.preset("tiny", heads=4)
    with pytest.raises(ValueError, match="multiple of heads"):
        SigVLPConfig.preset("tiny", heads=3)
    with pytest.raises(ValueError, match="pool"):
        SigVLPConfig.preset("tiny", pool="sum")
    with pytest.raises(ValueError, match="preprocess"):
        SigVLPConfig.preset("tiny", preprocess="nope")


# ----------------------------------------------------------------------------- forward / backward


@pytest.mark.parametrize("pool,text_pool,hu", [("map", "last", False), ("mean", "map", False),
                                              ("map", "mean", False), ("max", "mean", True)])
def test_forward_backward(pool, text_pool, hu):
    model = _model(pool=pool, text_pool=text_pool, **(_HU if hu else {})).train()
    b = _batch(model, [8, 13, 4], ["a lung nodule.", "normal heart.", ""])
    out = model(b)
    B, D = 3, model.config.embed_dim
    assert out.image_emb.shape == (B, D) and out.text_emb.shape == (B, D)
    assert out.image_emb.dtype == torch.float32 and out.text_emb.dtype == torch.float32
    torch.testing.assert_close(out.image_emb.norm(dim=1), torch.ones(B))
    torch.testing.assert_close(out.text_emb.norm(dim=1), torch.ones(B))
    assert out.tokens.shape == (int(b["cu_seqlens"][-1]), model.config.width)
    assert math.isclose(out.logit_scale.item(), 10.0, rel_tol=1e-6) and out.logit_bias.item() == -10.0
    assert math.isclose(model.log_logit_scale.item(), math.log(10.0), rel_tol=1e-6)
    loss = sigmoid_loss(out.image_emb, out.text_emb, out.logit_scale, out.logit_bias)
    (loss + out.tokens.square().mean()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_forward_without_texts_and_bad_input():
    model = _model()
    b = _batch(model, [8])
    out = model(b)
    assert out.text_emb is None and out.image_emb.shape == (1, model.config.embed_dim)
    with pytest.raises(TypeError, match="max_seqlen"):
        model.encode_volume(b["patches"], b["cu_seqlens"], torch.tensor(b["max_seqlen"]), b["grid_thw"])
    with pytest.raises(ValueError, match="patches"):
        model.encode_volume(b["patches"][:, :100], b["cu_seqlens"], b["max_seqlen"], b["grid_thw"])
    with pytest.raises(ValueError, match="missing"):
        model({"patches": b["patches"]})


@pytest.mark.parametrize("pool", ["map", "mean", "max"])
def test_packing_equals_alone(pool):
    """Chunks of different depths (and texts of different lengths) packed in one batch give the same
    embeddings and token features as each run alone."""
    model = _model(pool=pool, text_pool="map" if pool == "map" else "last")
    depths = [4, 17, 8, 30]
    texts = ["x", "a much longer text about the right lung.", "heart.", "no findings"]
    vols = _volumes(depths, seed=3)
    with torch.no_grad():
        packed = volume_batch(vols, model.config.patch_size)
        img, tok = model.encode_volume(**packed)
        txt = model.encode_texts(texts)
        cu = packed["cu_seqlens"].tolist()
        for i, v in enumerate(vols):
            one = volume_batch([v], model.config.patch_size)
            img1, tok1 = model.encode_volume(**one)
            torch.testing.assert_close(img[i : i + 1], img1, atol=2e-6, rtol=1e-5)
            torch.testing.assert_close(tok[cu[i] : cu[i + 1]], tok1, atol=2e-5, rtol=1e-5)
            torch.testing.assert_close(txt[i : i + 1], model.encode_texts([texts[i]]), atol=2e-6, rtol=1e-5)


def test_patch_embedding_is_conv3d():
    """The Linear on the collate's patches equals a stride = kernel Conv3d (fp64)."""
    model = _model().double()
    pt, ph, pw = model.config.patch_size
    vol = _volumes([12], seed=1)[0]
    b = volume_batch([vol], model.config.patch_size)
    lin = model.visual.patch_embed
    got = lin(b["patches"].double())
    w = lin.weight.view(-1, 1, pt, ph, pw)
    conv = F.conv3d(torch.from_numpy(vol).double()[None, None], w, lin.bias, stride=(pt, ph, pw))
    want = conv[0].flatten(1).T  # (T*H*W, width), t-major
    assert tuple(b["grid_thw"][0].tolist()) == tuple(conv.shape[2:])
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


def test_map_pooling_matches_fp64_oracle():
    """MAP pooling (one learned query per sequence, cross-attention through the op) equals per-sequence
    multi-head attention computed independently in fp64."""
    torch.manual_seed(0)
    model = _model(pool="map")
    pool = model.visual.pool
    lengths = [1, 16, 63, 65]
    x = torch.randn(sum(lengths), model.config.width)
    cu = cu_seqlens_from_lengths(lengths)
    with torch.no_grad():
        got = pool(x, cu, max(lengths))
        h, d = pool.heads, pool.head_dim
        W = {n: getattr(pool, n) for n in ("q", "kv", "proj")}
        q = F.linear(pool.probe.double(), W["q"].weight.double(), W["q"].bias.double()).view(h, 1, d)
        want = []
        for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
            kv = F.linear(x[s:e].double(), W["kv"].weight.double(), W["kv"].bias.double()).view(e - s, 2, h, d)
            k, v = kv[:, 0].transpose(0, 1), kv[:, 1].transpose(0, 1)
            a = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(d), dim=-1) @ v  # (h, 1, d)
            o = F.linear(a.reshape(-1), W["proj"].weight.double(), W["proj"].bias.double())
            o = o + pool.mlp.double()(F.layer_norm(o, (o.shape[-1],), pool.norm.weight.double(),
                                                   pool.norm.bias.double(), pool.norm.eps))
            pool.mlp.float()
            want.append(o)
        torch.testing.assert_close(got.double(), torch.stack(want), atol=1e-5, rtol=1e-5)


def test_no_absolute_positions():
    """No parameter depends on the sequence length: a chunk far deeper than any seen (and than the
    text length limit) runs; parameter count is independent of the input."""
    model = _model()
    names = [n for n, _ in model.named_parameters()]
    assert not [n for n in names if "pos" in n.lower()], names
    shapes = {tuple(p.shape) for p in model.parameters()}
    b = _batch(model, [400])  # 100 x 4 x 4 tokens
    with torch.no_grad():
        img, tok = model.encode_volume(**b)
        txt = model.encode_text(torch.randint(3, 259, (1000,)), torch.tensor([0, 1000], dtype=torch.int32), 1000)
    assert torch.isfinite(img).all() and torch.isfinite(tok).all() and tok.shape[0] == 1600
    assert torch.isfinite(txt).all()
    assert {tuple(p.shape) for p in model.parameters()} == shapes


def test_encode_texts_matches_collate():
    from sigvlp.data.collate import collate_chunks

    model = _model()
    texts = ["pleural effusion is present.", "heart"]
    samples = [{"image": v, "text": t} for v, t in zip(_volumes([4, 8]), texts)]
    b = collate_chunks(samples, patch=model.config.patch_size, max_text_tokens=model.config.max_text_tokens)
    with torch.no_grad():
        out = model(b)
        torch.testing.assert_close(out.text_emb, model.encode_texts(texts))
        torch.testing.assert_close(out.image_emb, model.encode_volume(**volume_batch(_volumes([4, 8]), (4, 16, 16)))[0])


def test_volume_batch_layout_and_errors():
    vol = np.zeros((5, 32, 48), np.float32)
    b = volume_batch([vol, np.ones((8, 32, 48))], (4, 16, 16))
    assert b["grid_thw"].tolist() == [[2, 2, 3], [2, 2, 3]] and b["cu_seqlens"].tolist() == [0, 12, 24]
    assert b["max_seqlen"] == 12 and isinstance(b["max_seqlen"], int) and b["patches"].shape == (24, 1024)
    # the padded 8th slice of the first volume is air (-1): token 6 (t = 1) holds slices 4..7
    tok = b["patches"][6].view(4, 16, 16)
    assert (tok[0] == 0).all() and (tok[1:] == -1).all()
    with pytest.raises(TypeError, match="list"):
        volume_batch(vol, (4, 16, 16))
    with pytest.raises(ValueError, match=r"volumes\[0\].*multiple"):
        volume_batch([np.zeros((4, 30, 32))], (4, 16, 16))


def test_optimizer_split():
    from sigvlp.optim import explain_split

    rows = {n: k for n, _, k, _ in explain_split(_model())}
    for name in ("visual.patch_embed.weight", "text.token_embedding.weight", "visual.head.weight",
                 "text.head.weight", "visual.pool.probe", "log_logit_scale", "logit_bias"):
        assert rows[name] == "adamw", name
    assert rows["visual.blocks.0.attn.qkv.weight"] == "muon" and rows["text.blocks.1.mlp.fc1.weight"] == "muon"


# ----------------------------------------------------------------------------- training


def test_overfits_a_handful_of_pairs():
    torch.manual_seed(0)
    model = SigVLP(_tiny()).train()
    texts = ["nodule in the right lung.", "pleural effusion.", "cardiomegaly.", "normal chest."]
    b = _batch(model, [8, 4, 4, 8], texts, seed=5)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(40):
        out = model(b)
        loss = sigmoid_loss(out.image_emb, out.text_emb, out.logit_scale, out.logit_bias)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0], losses[::10]
    with torch.no_grad():
        out = model(b)
    # each chunk's own text is its best match
    assert (out.image_emb @ out.text_emb.T).argmax(1).tolist() == [0, 1, 2, 3]


# ----------------------------------------------------------------------------- save / load


def test_save_load_round_trip(tmp_path):
    model = _model(seed=3, pool="mean")
    with torch.no_grad():
        model.logit_bias.fill_(-7.5)
    model.save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "model.safetensors").is_file()
    saved = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert saved["config"]["pool"] == "mean" and saved["config"]["patch_size"] == [4, 16, 16]
    loaded = SigVLP.from_pretrained(tmp_path / "ckpt")
    assert loaded.config == model.config
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    b = _batch(model, [8, 4], ["a", "b"])
    with torch.no_grad():
        o1, o2 = model(b), loaded.eval()(b)
    torch.testing.assert_close(o1.image_emb, o2.image_emb, atol=0, rtol=0)
    torch.testing.assert_close(o1.text_emb, o2.text_emb, atol=0, rtol=0)
    assert float(o2.logit_bias) == -7.5
    # runtime fields may differ
    assert SigVLP.from_pretrained(tmp_path / "ckpt", attn_backend="torch").config.attn_backend == "torch"


def test_mismatched_config_names_fields(tmp_path):
    _model().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"width \(checkpoint 64, requested 128\).*layers"):
        SigVLP.from_pretrained(tmp_path, config=_tiny(width=128, layers=3))
    with pytest.raises(ValueError, match="pool"):
        SigVLP.from_pretrained(tmp_path, pool="mean")
    with pytest.raises(ValueError, match="embed_dim"):
        SigVLP(_tiny(embed_dim=32)).load_weights(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        SigVLP.from_pretrained(tmp_path / "missing")


def test_grad_checkpointing_same_gradients():
    torch.manual_seed(0)
    plain = SigVLP(_tiny()).train()
    ckpt = SigVLP(_tiny(grad_checkpointing=True)).train()
    ckpt.load_state_dict(plain.state_dict())
    b = _batch(plain, [8, 4], ["nodule.", "effusion."])
    grads = []
    for model in (plain, ckpt):
        out = model(b)
        sigmoid_loss(out.image_emb, out.text_emb, out.logit_scale, out.logit_bias).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-6, rtol=1e-5, msg=n)


def test_bf16_autocast_outputs_fp32():
    model = _model()
    b = _batch(model, [8, 4], ["nodule.", "effusion."])
    with torch.no_grad():
        ref = model(b)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(b)
    assert out.image_emb.dtype == torch.float32 and out.text_emb.dtype == torch.float32
    assert out.tokens.dtype == torch.bfloat16
    # bf16 rounding (eps 2**-8 = 3.9e-3) through two layers: about one eps observed, bound at four
    for got, want in ((out.image_emb, ref.image_emb), (out.text_emb, ref.text_emb)):
        assert (got - want).abs().max() < 4 * 2.0 ** -8


# ----------------------------------------------------------------------------- fp64 oracle of both towers


def _rope64(x, pos, sections, theta):
    """Independent 3D RoPE (rotate-half pairs (i, i + d/2); pair j of an axis with n pairs turns by
    pos * theta ** (-j / n); t, h, w sections in that order, the rest unrotated), fp64."""
    half = x.shape[-1] // 2
    ang = [pos[:, a : a + 1] * theta ** (-torch.arange(n, dtype=torch.float64) / n) for a, n in enumerate(sections)]
    ang.append(torch.zeros(x.shape[0], half - sum(sections), dtype=torch.float64))
    ang = torch.cat(ang, 1)[:, None, :]
    cos, sin = torch.cos(ang), torch.sin(ang)
    a, b = x[..., :half], x[..., half:]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], -1)


def _tower64(tower, x, pos, sections, theta):
    for blk in tower.blocks:
        heads, d = blk.attn.heads, blk.attn.head_dim
        h = blk.norm1(x)
        q, k, v = blk.attn.qkv(h).view(len(x), 3, heads, d).unbind(1)
        q, k = _rope64(q, pos, sections, theta), _rope64(k, pos, sections, theta)
        p = torch.softmax(torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(d), dim=-1)
        x = x + blk.attn.proj(torch.einsum("hqk,khd->qhd", p, v).reshape(len(x), -1))
        x = x + blk.mlp(blk.norm2(x))
    return tower.norm(x)


def _map64(pool, x):
    h, d = pool.heads, pool.head_dim
    q = pool.q(pool.probe).view(h, 1, d)
    k, v = pool.kv(x).view(len(x), 2, h, d).unbind(1)
    a = torch.softmax(q @ k.permute(1, 2, 0) / math.sqrt(d), dim=-1) @ v.transpose(0, 1)
    o = pool.proj(a.reshape(-1))
    return o + pool.mlp(pool.norm(o))


def _hu_features64(patches, patch, grid, thresholds, window):
    """The HU encoding, written out: voxels back to HU, then per sub-block (t, h, w order) the fraction
    of its voxels in each interval (-inf, t0], (t0, t1], ..., (t_last, inf). (N, pt*ph*pw) ->
    (N, G * (K + 1)) float64."""
    lo, hi = window
    hu = (patches.double() + 1) * (hi - lo) / 2 + lo
    (pt, ph, pw), (gt, gh, gw) = patch, grid
    vox = hu.view(-1, pt, ph, pw)
    st, sh, sw = pt // gt, ph // gh, pw // gw
    cols = []
    for a in range(gt):
        for b in range(gh):
            for c in range(gw):
                blk = vox[:, a * st:(a + 1) * st, b * sh:(b + 1) * sh, c * sw:(c + 1) * sw].reshape(len(vox), -1)
                bounds = [-math.inf, *thresholds, math.inf]
                cols.extend(((blk > a) & (blk <= b)).double().mean(1) for a, b in zip(bounds[:-1], bounds[1:]))
    return torch.stack(cols, 1)


@pytest.mark.parametrize("pool,text_pool,backend,hu", [("map", "last", None, False), ("mean", "map", None, False),
                                                       ("max", "last", None, True), ("map", "map", "triton", False)])
def test_towers_match_fp64_oracle(pool, text_pool, backend, hu):
    """Both towers (fp32, packed, through the op) against a per-sequence fp64 re-implementation with its
    own 3D RoPE: volume positions (t, h, w) from the t-major grid (non-square in-plane grid, so h and w
    are told apart), text positions (n, 0, 0) with all rotary pairs on t and theta 1000. backend
    "triton": the Triton kernels (interpreted on the CPU), self and cross (MAP) forms."""
    import copy

    if backend == "triton":
        pytest.importorskip("triton")
    model = _model(seed=2, pool=pool, text_pool=text_pool, attn_backend=backend, **(_HU if hu else {}))
    ref = copy.deepcopy(model).double()
    cfg = model.config
    rng = np.random.default_rng(7)
    vols = [rng.uniform(-1, 1, (d, 32, 48)).astype(np.float32) for d in (12, 5)]
    if hu:  # integer HU over the whole window, so no voxel sits on a threshold
        vols = [((np.round(v * 1000) + 1000) / 1000 - 1).astype(np.float32) for v in vols]
    texts = ["pleural effusion.", "a much longer text, about the heart and the lungs."]
    b = volume_batch(vols, cfg.patch_size)
    b.update(model.tokenize(texts))
    with torch.no_grad():
        out = model(b)
        cu = b["cu_seqlens"].tolist()
        sec3 = (4, 6, 6)  # default_sections(32): 16 pairs, 2:3:3 with the remainder to t
        for i, (T, H, W) in enumerate(b["grid_thw"].tolist()):
            n = torch.arange(T * H * W)
            pos = torch.stack([n // (H * W), (n // W) % H, n % W], 1).double()
            x = ref.visual.patch_embed(b["patches"][cu[i] : cu[i + 1]].double())
            if hu:
                f = _hu_features64(b["patches"][cu[i] : cu[i + 1]], cfg.patch_size, cfg.hu.grid, cfg.hu.thresholds,
                                   (-1000.0, 1000.0))
                x = x + ref.visual.hu_encoding.embed(f)
            tok = _tower64(ref.visual, x, pos, sec3, cfg.rope_theta)
            torch.testing.assert_close(out.tokens[cu[i] : cu[i + 1]].double(), tok, atol=2e-5, rtol=1e-5)
            pooled = {"map": lambda: _map64(ref.visual.pool, tok), "mean": lambda: tok.mean(0),
                      "max": lambda: tok.max(0).values}[pool]()
            emb = F.normalize(ref.visual.head(pooled), dim=-1)
            torch.testing.assert_close(out.image_emb[i].double(), emb, atol=2e-6, rtol=1e-5)
        tcu = b["text_cu_seqlens"].tolist()
        for i in range(len(texts)):
            ids = b["text_ids"][tcu[i] : tcu[i + 1]]
            pos = torch.stack([torch.arange(len(ids)), torch.zeros(len(ids)), torch.zeros(len(ids))], 1).double()
            x = _tower64(ref.text, ref.text.token_embedding(ids), pos, (16, 0, 0), 1000.0)
            pooled = _map64(ref.text.pool, x) if text_pool == "map" else x[-1]
            emb = F.normalize(ref.text.head(pooled), dim=-1)
            torch.testing.assert_close(out.text_emb[i].double(), emb, atol=2e-6, rtol=1e-5)


def test_max_pool_matches_loop_and_gradient():
    """max_pool against a per-sequence loop in fp64, values and gradients, with an empty sequence (zeros)."""
    from sigvlp.model.layers import max_pool

    torch.manual_seed(0)
    lengths = [3, 0, 1, 7]
    x = torch.randn(sum(lengths), 5, dtype=torch.float64, requires_grad=True)
    cu = cu_seqlens_from_lengths(lengths)
    out = max_pool(x, cu)
    x2 = x.detach().clone().requires_grad_(True)
    ref = torch.stack([x2[a:b].max(0).values if b > a else torch.zeros(5, dtype=torch.float64)
                       for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())])
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    w = torch.randn_like(ref)
    (out * w).sum().backward()
    (ref * w).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=0, atol=0)


def test_hu_encoding_config_errors_and_round_trip(tmp_path):
    for bad in ((), (0.0, -100.0), (1.0, 1.0), ("a",), (float("nan"),), "300", 5, {0: 1, 300: 2}, {0, 300},
                (x for x in (0, 300)), (True, 2)):
        with pytest.raises(ValueError, match="hu.thresholds"):
            _tiny(hu={"thresholds": bad})
    for bad in ((-3000.0, 0.0), (0.0, 1000.0)):  # outside (or on the edge of) the tiny preset's window
        with pytest.raises(ValueError, match="hu.thresholds.*window"):
            _tiny(hu={"thresholds": bad})
    for bad in ((1, 3, 4), 4, None, (4, 4), (2.5, 4, 4), "abc"):  # 3 does not divide 16
        with pytest.raises(ValueError, match="hu.grid"):
            _tiny(hu={"thresholds": (0.0,), "grid": bad})
    for bad in (5, (0.0, 300.0), {"grid": (1, 4, 4)}, {"thresholds": (0.0,), "bins": 3}):
        with pytest.raises(TypeError, match="hu"):
            _tiny(hu=bad)
    assert _tiny(hu={"thresholds": np.array([0, 300])}).hu.thresholds == (0.0, 300.0)  # numpy integers are numbers
    assert _tiny(hu=HUEncodingConfig([np.int64(-950), 300])).hu == HUEncodingConfig((-950.0, 300.0), (1, 4, 4))
    with pytest.raises(ValueError, match="pool"):
        _tiny(pool="sum")
    model = _model(pool="max", **_HU)
    assert model.visual.hu_encoding.embed.in_features == (4 + 1) * 16  # 4 thresholds: 5 bins, 16 sub-blocks
    model.save_pretrained(tmp_path / "m")
    loaded = SigVLP.from_pretrained(tmp_path / "m")
    assert loaded.config == model.config and loaded.config.hu == _HU["hu"]
    b = _batch(model, [8, 5])
    with torch.no_grad():
        torch.testing.assert_close(loaded(b).image_emb, model(b).image_emb, rtol=0, atol=0)
    assert "visual.hu_encoding.embed.weight" in model.state_dict()
    without = _model(pool="max")
    assert without.visual.hu_encoding is None
    # any input is binned safely: NaN as the window's bottom, +-inf and out-of-window values at its ends
    enc = model.visual.hu_encoding
    x = torch.full((3, enc.per_sub * enc.n_sub), 0.5)
    x[0] = float("nan")
    x[1] = float("inf")
    x[2] = -7.0
    f = enc.features(x)
    bottom, top = torch.zeros_like(f[0]), torch.zeros_like(f[0])
    bottom[:, 0] = 1
    top[:, -1] = 1
    assert torch.equal(f[0], bottom) and torch.equal(f[1], top) and torch.equal(f[2], bottom)



def test_hu_encoding_is_stored_only_when_set_and_old_config_files_load(tmp_path):
    """A model without the HU encoding stores no hu* key; config.json files written before the ``hu``
    sub-config (top-level hu_thresholds / hu_grid, hu_grid always present) load as the same model."""
    without = _model(pool="max")
    assert not [k for k in without.config.to_dict() if k.startswith("hu")]
    without.save_pretrained(tmp_path / "plain")
    assert '"hu' not in (tmp_path / "plain" / "config.json").read_text()
    model = _model(pool="max", **_HU)
    assert model.config.to_dict()["hu"] == {"thresholds": [-950.5, -600.5, -0.5, 300.5], "grid": [2, 4, 2]}
    assert set(without.config.diff(model.config)) == {"hu"} and set(model.config.diff(without.config)) == {"hu"}
    model.save_pretrained(tmp_path / "hu")
    b = _batch(model, [8, 5])
    for name, m, old in (("plain", without, {"hu_thresholds": None, "hu_grid": [1, 4, 4]}),
                         ("hu", model, {"hu_thresholds": [-950.5, -600.5, -0.5, 300.5], "hu_grid": [2, 4, 2]})):
        path = tmp_path / name / "config.json"
        raw = json.loads(path.read_text())
        raw["config"].pop("hu", None)
        raw["config"].update(old)  # the layout of an older config.json
        path.write_text(json.dumps(raw))
        loaded = SigVLP.from_pretrained(tmp_path / name)
        assert loaded.config == m.config
        with torch.no_grad():
            torch.testing.assert_close(loaded(b).image_emb, m(b).image_emb, rtol=0, atol=0)
    # the older keys (and the dotted ones of `--set model.hu.thresholds=...`) as overrides map the same way
    assert _tiny(hu_thresholds=(-950.5, -600.5, -0.5, 300.5), hu_grid=(2, 4, 2)).hu == _HU["hu"]
    assert _tiny(**{"hu.thresholds": [-950.5, -600.5, -0.5, 300.5], "hu.grid": [2, 4, 2]}).hu == _HU["hu"]
    assert _tiny(hu_grid=(2, 4, 2)).hu is None  # no thresholds: the encoding is off
    assert model.config.replace(hu=None) == without.config and without.config.replace(**_HU) == model.config
    with pytest.raises(ValueError, match="given twice"):
        _tiny(hu_thresholds=(0.0,), **_HU)


def test_word_tokenizer_config_round_trip_and_errors(tmp_path):
    from sigvlp.data.tokenizers import WordTokenizer

    vocab = WordTokenizer.build_vocab(["Emphysema is present.", "Emphysema is not present.", "The heart is visible."])
    model = _model(tokenizer="word", vocab=list(vocab))
    assert model.config.vocab == vocab and isinstance(model.tokenizer, WordTokenizer)
    assert model.text.token_embedding.num_embeddings == len(vocab) + 4
    model.save_pretrained(tmp_path / "m")
    loaded = SigVLP.from_pretrained(tmp_path / "m")
    assert loaded.config == model.config and loaded.tokenizer.vocab == vocab
    texts = ["Emphysema is not present.", "the heart is visible, unknown words."]
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_texts(texts), model.encode_texts(texts), rtol=0, atol=0)
    other = _tiny(tokenizer="word", vocab=vocab[::-1])
    with pytest.raises(ValueError, match="vocab"):
        SigVLP.from_pretrained(tmp_path / "m", config=other)
    with pytest.raises(ValueError, match="vocab"):
        SigVLP(_tiny(tokenizer="word"))  # no word list to build the embedding from
    for bad in ("abc", ["a", "a"], ["a", ""], [], [1, 2]):
        with pytest.raises(ValueError, match="vocab"):
            _tiny(tokenizer="word", vocab=bad)
    with pytest.raises(ValueError, match="vocab"):
        _tiny(vocab=["a"])  # the byte tokenizer has no word list
    with pytest.raises(ValueError, match="vocab"):
        _tiny(tokenizer="word", vocab=["a", "[UNK]"])
    long = tuple(f"w{i}" for i in range(3000))
    _model(tokenizer="word", vocab=long).save_pretrained(tmp_path / "long")
    with pytest.raises(ValueError, match="vocab") as err:
        SigVLP.from_pretrained(tmp_path / "long", config=_tiny(tokenizer="word", vocab=long[:-1]))
    assert len(str(err.value)) < 600 and "items" in str(err.value)  # long values are shortened
    for tok, kw in (("word", {"vocab": vocab}), ("byte", {})):
        with pytest.raises(ValueError, match="vocab_size"):
            SigVLP(_tiny(tokenizer=tok, vocab_size=5, **kw))  # fewer ids than the tokenizer makes
