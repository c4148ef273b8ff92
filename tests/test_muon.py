"""sigvlp.optim: parity with torch.optim.Muon, flattening, batching, state_dict, bf16 grads,
distributed (2 gloo processes), MuonWithAdamW, split_params and argument checks."""

from __future__ import annotations

import io
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import sigvlp.optim.muon as muon_module
from sigvlp.optim import (POLAR_EXPRESS_COEFFICIENTS, Muon, MuonWithAdamW, adjusted_lr, explain_split, split_params)

HAS_CUDA = torch.cuda.is_available()
SHAPES = [(64, 32), (32, 64), (48, 48), (48, 48)]


def _problem(seed=0, shapes=SHAPES):
    """Initial weights and a least-squares objective per weight (gradients depend on the weights)."""
    g = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=g) * 0.2 for s in shapes]
    data = [(torch.randn(128, s[1], generator=g), torch.randn(128, s[0], generator=g)) for s in shapes]
    return init, data


def _train(make_opt, init, data, steps=20, dtype=torch.float32):
    params = [nn.Parameter(w.clone().to(dtype)) for w in init]
    opt = make_opt(params)
    for _ in range(steps):
        opt.zero_grad()
        loss = sum(((x.to(dtype) @ p.T - y.to(dtype)) ** 2).mean() for p, (x, y) in zip(params, data))
        loss.backward()
        opt.step()
    return [p.detach().double() for p in params]


def _max(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("settings", [
    dict(lr=0.02),
    dict(lr=0.05, weight_decay=0.01, nesterov=False, adjust_lr_fn="match_rms_adamw", momentum=0.9),
], ids=["defaults", "variant"])
def test_parity_with_torch_muon_20_steps(settings):
    """Against an fp64-NS run of the same 20 steps (the oracle): torch.optim.Muon runs NS in bf16
    (unit roundoff 2^-8), so its trajectory is off by e_t, the bf16 precision floor (~0.5% of the
    displacement here). Ours in fp32 must be within fp32 error of the oracle, ours in bf16 within
    2 e_t; and a wrong update (a slightly different step: lr off by 2%) must break that bound, so
    the bound can fail."""
    init, data = _problem()
    theirs = _train(lambda ps: torch.optim.Muon(ps, **settings), init, data)
    exact = _train(lambda ps: Muon(ps, ns_dtype=torch.float64, **settings), init, data, dtype=torch.float64)
    ours = _train(lambda ps: Muon(ps, **settings), init, data)
    ours_bf16 = _train(lambda ps: Muon(ps, ns_dtype=torch.bfloat16, **settings), init, data)
    wrong = dict(settings, lr=settings["lr"] * 1.02)
    wrong_bf16 = _train(lambda ps: Muon(ps, ns_dtype=torch.bfloat16, **wrong), init, data)
    displacement = max((e - w.double()).abs().max().item() for e, w in zip(exact, init))
    e_torch = _max(theirs, exact)
    assert displacement > 0.05  # the run moved the weights: the comparison means something
    assert e_torch < 0.02 * displacement  # torch's bf16 error: a few bf16 ulps of the motion
    assert _max(ours, exact) < 1e-4 * displacement  # fp32 NS: fp32 error of the oracle's path
    assert _max(ours_bf16, exact) <= 2 * e_torch  # bf16 NS: as accurate as torch's own bf16
    assert _max(wrong_bf16, exact) > 2 * e_torch  # ...and the bound rejects a wrong step


def test_adjusted_lr():
    assert adjusted_lr(0.1, None, 64, 16) == pytest.approx(0.2)
    assert adjusted_lr(0.1, "original", 16, 64) == pytest.approx(0.1)
    assert adjusted_lr(0.1, "match_rms_adamw", 16, 64) == pytest.approx(0.1 * 0.2 * 8)
    assert adjusted_lr(0.1, "spectral_unclamped", 16, 64) == pytest.approx(0.05)


# ----------------------------------------------------------------------------- >2-D and batching


@pytest.mark.parametrize("adjust", [None, "match_rms_adamw"])
def test_conv_filters_are_flattened(adjust):
    """A (8, 4, 3, 3) filter steps exactly as its (8, 36) flattening (lr adjusted on (8, 36))."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(8, 4, 3, 3, generator=g)
    conv = nn.Parameter(w.clone())
    flat = nn.Parameter(w.reshape(8, 36).clone())
    oc = Muon([conv], lr=0.03, adjust_lr_fn=adjust)
    of = Muon([flat], lr=0.03, adjust_lr_fn=adjust)
    for _ in range(3):
        grad = torch.randn(8, 4, 3, 3, generator=g)
        conv.grad, flat.grad = grad.clone(), grad.reshape(8, 36).clone()
        oc.step()
        of.step()
    assert torch.equal(conv.detach().reshape(8, 36), flat.detach())
    assert oc.state[conv]["momentum_buffer"].shape == (8, 4, 3, 3)
    # And the flattened step is Muon's: it matches torch.optim.Muon on the 2-D parameter.
    ref = nn.Parameter(w.reshape(8, 36).clone())
    ot = torch.optim.Muon([ref], lr=0.03, adjust_lr_fn=adjust)
    g = torch.Generator().manual_seed(1)
    torch.randn(8, 4, 3, 3, generator=g)
    for _ in range(3):
        ref.grad = torch.randn(8, 4, 3, 3, generator=g).reshape(8, 36)
        ot.step()
    assert (ref.detach() - flat.detach()).abs().max() < 0.02 * (ref.detach() - w.reshape(8, 36)).abs().max()


def test_same_shape_params_share_one_batched_call(monkeypatch):
    calls = []
    real = muon_module.newton_schulz

    def spy(G, *args, **kwargs):
        calls.append(tuple(G.shape))
        return real(G, *args, **kwargs)

    g = torch.Generator().manual_seed(2)
    shapes = [(32, 64)] * 3 + [(64, 32)] * 2 + [(16, 2, 4, 4)] + [(24, 24)]
    weights = [torch.randn(s, generator=g) for s in shapes]
    grads = [torch.randn(s, generator=g) for s in shapes]
    batched = [nn.Parameter(w.clone()) for w in weights]
    alone = [nn.Parameter(w.clone()) for w in weights]
    monkeypatch.setattr(muon_module, "newton_schulz", spy)
    opt = Muon(batched, lr=0.02)
    for p, gr in zip(batched, grads):
        p.grad = gr.clone()
    opt.step()
    # tall (64, 32) ride with the wide (32, 64) ones; (16, 32) and (24, 24) alone.
    assert sorted(calls) == sorted([(5, 32, 64), (1, 16, 32), (1, 24, 24)])
    calls.clear()
    for p, gr in zip(alone, grads):  # one optimizer per parameter: nothing to batch
        p.grad = gr.clone()
        Muon([p], lr=0.02).step()
    assert len(calls) == len(shapes)
    for a, b in zip(batched, alone):
        assert (a - b).abs().max() < 1e-6


def test_polar_express_schedule_runs_and_differs():
    init, data = _problem(3, [(32, 48)])
    keller = _train(lambda ps: Muon(ps, lr=0.02), init, data, steps=3)
    polar = _train(lambda ps: Muon(ps, lr=0.02, ns_coefficients=POLAR_EXPRESS_COEFFICIENTS), init, data, steps=3)
    assert _max(keller, polar) > 1e-4
    # Polar Express updates are closer to orthogonal: singular values of one update near 1.
    p = nn.Parameter(torch.zeros(32, 48))
    p.grad = torch.randn(32, 48, generator=torch.Generator().manual_seed(4))
    Muon([p], lr=1.0, weight_decay=0.0, momentum=0.0, nesterov=False, ns_coefficients=POLAR_EXPRESS_COEFFICIENTS).step()
    sv = torch.linalg.svdvals(-p.detach().double())
    assert sv.min() > 0.8 and sv.max() < 1.2


# ----------------------------------------------------------------------------- state and dtypes


def _steps(opt, params, seed, n):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(p.dtype)
        opt.step()


def test_state_dict_round_trip():
    g = torch.Generator().manual_seed(5)
    weights = [torch.randn(s, generator=g) for s in [(16, 24), (24, 16), (8, 2, 3, 3)]]
    a = [nn.Parameter(w.clone()) for w in weights]
    opt_a = Muon(a, lr=0.02, ns_coefficients=POLAR_EXPRESS_COEFFICIENTS, adjust_lr_fn="match_rms_adamw")
    _steps(opt_a, a, 6, 3)
    buffer = io.BytesIO()
    torch.save(opt_a.state_dict(), buffer)
    b = [nn.Parameter(p.detach().clone()) for p in a]
    opt_b = Muon(b, lr=0.5)  # different settings: loading restores the saved ones
    opt_b.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=False))
    assert opt_b.param_groups[0]["lr"] == 0.02
    assert opt_b.param_groups[0]["adjust_lr_fn"] == "match_rms_adamw"
    for pa, pb in zip(a, b):
        assert torch.equal(opt_a.state[pa]["momentum_buffer"], opt_b.state[pb]["momentum_buffer"])
    _steps(opt_a, a, 7, 3)
    _steps(opt_b, b, 7, 3)
    for pa, pb in zip(a, b):
        assert torch.equal(pa, pb)


@pytest.mark.parametrize("nesterov", [True, False])
def test_bf16_grad_and_buffer_never_modified_in_place(nesterov):
    """torch.optim.Muon normalises a bf16 update in place; with nesterov=False that update is
    the momentum buffer itself (REFERENCES.md). Ours copies before NS."""
    g = torch.Generator().manual_seed(8)
    p = nn.Parameter(torch.randn(24, 40, generator=g).bfloat16())
    opt = Muon([p], lr=0.02, momentum=0.9, nesterov=nesterov, ns_dtype=torch.bfloat16)
    expected_buf = torch.zeros(24, 40, dtype=torch.bfloat16)
    for _ in range(3):
        grad = torch.randn(24, 40, generator=g).bfloat16()
        p.grad = grad.clone()
        opt.step()
        assert torch.equal(p.grad, grad)
        expected_buf = expected_buf.lerp(grad, 0.1)
        assert torch.equal(opt.state[p]["momentum_buffer"], expected_buf)


def test_bf16_params_step_matches_fp32_params():
    init, data = _problem(9, [(32, 48)])
    f32 = _train(lambda ps: Muon(ps, lr=0.02), init, data, steps=5)
    b16 = _train(lambda ps: Muon(ps, lr=0.02), init, data, steps=5, dtype=torch.bfloat16)
    assert _max(f32, b16) < 0.02


# ----------------------------------------------------------------------------- distributed


def test_plan_balances_and_is_deterministic():
    costs = [100, 100, 50, 50, 50, 50, 10, 10]
    owner = Muon.plan(costs, 2)
    loads = [sum(c for c, r in zip(costs, owner) if r == k) for k in range(2)]
    assert loads == [210, 210]
    assert Muon.plan(costs, 2) == owner
    assert Muon.plan([5], 3) == [0]


def _dist_worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        calls = []
        real = muon_module.newton_schulz

        def spy(G, *args, **kwargs):
            calls.append(G.shape[0])
            return real(G, *args, **kwargs)

        muon_module.newton_schulz = spy
        params, opt = _dist_setup(process_group=dist.group.WORLD)
        _steps(opt, params, 11, 3)
        torch.save({"params": [p.detach() for p in params], "matrices": sum(calls),
                    "state": [opt.state[p]["momentum_buffer"] for p in params]},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _dist_setup(process_group=None):
    g = torch.Generator().manual_seed(10)
    shapes = [(48, 64), (64, 48), (48, 64), (32, 32), (32, 32), (16, 8, 2, 2), (40, 24)]
    params = [nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    # A second group with bf16 NS and odd sizes: results of mixed dtypes share the gather buffer.
    odd = [nn.Parameter(torch.randn(s, generator=g)) for s in [(5, 7), (3, 5)]]
    groups = [{"params": params}, {"params": odd, "ns_dtype": torch.bfloat16, "lr": 0.05}]
    return params + odd, Muon(groups, lr=0.02, process_group=process_group)


def test_distributed_two_gloo_ranks_match_single_process(tmp_path):
    world = 2
    mp.spawn(_dist_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    params, opt = _dist_setup()
    _steps(opt, params, 11, 3)
    for r in range(1, world):  # identical on every rank
        for a, b in zip(results[0]["params"], results[r]["params"]):
            assert torch.equal(a, b)
        for a, b in zip(results[0]["state"], results[r]["state"]):
            assert torch.equal(a, b)
    for a, b in zip(results[0]["params"], params):  # equal to one process doing all the work
        assert (a - b.detach()).abs().max() < 1e-6
    # The work was split: each rank orthogonalised only its share of the 9 matrices per step.
    counts = [res["matrices"] for res in results]
    assert sum(counts) == 9 * 3 and all(0 < c < 9 * 3 for c in counts)


# ----------------------------------------------------------------------------- Muon + AdamW


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.patch_embed = nn.Conv3d(1, 16, kernel_size=4, stride=4)
        self.token_embedding = nn.Embedding(50, 16)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 16))
        self.blocks = nn.ModuleList()
        for _ in range(2):
            blk = nn.Module()
            blk.norm1 = nn.LayerNorm(16)
            blk.qkv = nn.Linear(16, 48)
            blk.proj = nn.Linear(16, 16)
            blk.fc1 = nn.Linear(16, 64)
            blk.fc2 = nn.Linear(64, 16)
            blk.conv = nn.Conv1d(16, 16, 3)
            self.blocks.append(blk)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 10)
        self.text_projection = nn.Linear(16, 8, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(2.3))
        self.frozen = nn.Parameter(torch.zeros(4, 4), requires_grad=False)


def _kinds(rows):
    return {name: kind for name, _, kind, _ in rows}


def test_split_params_default_rules():
    kinds = _kinds(explain_split(_Tiny()))
    muon = {n for n, k in kinds.items() if k == "muon"}
    assert muon == {f"blocks.{i}.{m}.weight" for i in range(2) for m in ("qkv", "proj", "fc1", "fc2", "conv")}
    for name in ("patch_embed.weight", "patch_embed.bias", "token_embedding.weight", "cls_token", "head.weight",
                 "text_projection.weight", "logit_scale", "norm.weight", "blocks.0.norm1.weight", "blocks.1.fc1.bias"):
        assert kinds[name] == "adamw", name
    assert kinds["frozen"] == "frozen"
    groups = split_params(_Tiny())
    assert [g["use_muon"] for g in groups] == [True, False]
    assert len(groups[0]["params"]) == 10 and all(isinstance(p, tuple) for p in groups[0]["params"])


def test_split_params_overrides_by_name_pattern():
    kinds = _kinds(explain_split(_Tiny(), adamw=[r"\.fc2\."], muon=[r"^head\.weight$", r"^patch_embed\.weight"]))
    assert kinds["blocks.0.fc2.weight"] == "adamw" and kinds["head.weight"] == "muon"
    assert kinds["patch_embed.weight"] == "muon"
    kinds = _kinds(explain_split(_Tiny(), default_adamw_patterns=()))
    assert kinds["head.weight"] == "muon" and kinds["token_embedding.weight"] == "adamw"  # module rule stays
    with pytest.raises(ValueError, match="adamw, muon"):
        explain_split(_Tiny(), adamw=[r"fc1"], muon=[r"blocks\.0\.fc1\.weight"])
    with pytest.raises(ValueError, match="^muon:.*2-D"):
        explain_split(_Tiny(), muon=[r"bias"])
    with pytest.raises(ValueError, match="^adamw: invalid"):
        explain_split(_Tiny(), adamw=["("])


class _Unconventional(nn.Module):
    """Names the default rules cannot read: the output layer is `out` and a head sits at the end
    of an nn.Sequential."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
        self.out = nn.Linear(16, 4)


def test_split_default_is_name_based_and_muon_filter_decides():
    rows = explain_split(_Unconventional())
    assert [r[0] for r in rows] == [n for n, _ in _Unconventional().named_parameters()]  # one row each
    kinds = _kinds(rows)
    # Name-based default (documented): `out.weight` and the Sequential's last Linear go to Muon.
    assert kinds["out.weight"] == "muon" and kinds["body.2.weight"] == "muon"
    model = _Unconventional()
    last = {id(model.out), id(model.body[2])}

    def hidden_only(name, param, module):
        return param.dim() >= 2 and id(module) not in last

    rows = explain_split(model, muon_filter=hidden_only)
    kinds = _kinds(rows)
    assert kinds == {"body.0.weight": "muon", "body.0.bias": "adamw", "body.2.weight": "adamw",
                     "body.2.bias": "adamw", "out.weight": "adamw", "out.bias": "adamw"}
    assert all("muon_filter" in reason for *_, reason in rows)
    groups = split_params(model, muon_filter=hidden_only)
    assert [[n for n, _ in g["params"]] for g in groups] == [
        ["body.0.weight"], ["body.0.bias", "body.2.weight", "body.2.bias", "out.weight", "out.bias"]]
    # Caller patterns still come first; bad filters and bad answers are named.
    assert _kinds(explain_split(model, muon=[r"^out\.weight$"], muon_filter=hidden_only))["out.weight"] == "muon"
    with pytest.raises(ValueError, match="^muon_filter:.*2-D"):
        explain_split(model, muon_filter=lambda name, p, m: True)
    with pytest.raises(TypeError, match="^muon_filter:"):
        explain_split(model, muon_filter=lambda name, p, m: 1)
    with pytest.raises(TypeError, match="^muon_filter:"):
        split_params(model, muon_filter="hidden")


def test_adamw_defaults_are_torch_adamw_defaults():
    import inspect

    torch_defaults = {k: v.default for k, v in inspect.signature(torch.optim.AdamW.__init__).parameters.items()
                      if k in ("lr", "betas", "eps", "weight_decay")}
    opt = MuonWithAdamW(_Tiny())
    adamw_group = next(g for g in opt.param_groups if not g["use_muon"])
    for key, value in torch_defaults.items():
        assert adamw_group[key] == value, key
    # ...and the AdamW half steps exactly as torch.optim.AdamW with its defaults.
    torch.manual_seed(3)
    model_a, model_b = _Tiny(), _Tiny()
    model_b.load_state_dict(model_a.state_dict())
    opt_a = MuonWithAdamW(model_a)
    ref = torch.optim.AdamW([p for _, p in split_params(model_b)[1]["params"]])
    names = {n for n, _ in split_params(model_b)[1]["params"]}
    for _ in range(3):
        g = torch.Generator().manual_seed(4)
        for (n, pa), pb in zip(model_a.named_parameters(), model_b.parameters()):
            if pa.requires_grad:
                grad = torch.randn(pa.shape, generator=g)
                pa.grad, pb.grad = grad.clone(), grad.clone()
        opt_a.step()
        ref.step()
    for (n, pa), pb in zip(model_a.named_parameters(), model_b.parameters()):
        if n in names:
            assert (pa - pb).abs().max() < 1e-6, n


def test_muon_with_adamw_matches_separate_optimizers():
    torch.manual_seed(12)
    model_a, model_b = _Tiny(), _Tiny()
    model_b.load_state_dict(model_a.state_dict())
    opt = MuonWithAdamW(model_a, lr=0.02, adamw_lr=1e-3, adamw_betas=(0.9, 0.95), adamw_weight_decay=0.01)
    groups_b = split_params(model_b)
    ref_muon = Muon([p for _, p in groups_b[0]["params"]], lr=0.02)
    ref_adamw = torch.optim.AdamW([p for _, p in groups_b[1]["params"]], lr=1e-3, betas=(0.9, 0.95),
                                  eps=1e-8, weight_decay=0.01)
    g = torch.Generator().manual_seed(13)
    for _ in range(4):
        for pa, pb in zip(model_a.parameters(), model_b.parameters()):
            if pa.requires_grad:
                grad = torch.randn(pa.shape, generator=g)
                pa.grad, pb.grad = grad.clone(), grad.clone()
        opt.step()
        ref_muon.step()
        ref_adamw.step()
    for (name, pa), pb in zip(model_a.named_parameters(), model_b.parameters()):
        assert (pa - pb).abs().max() < 1e-6, name
    # One object, one state_dict, holding both kinds of state; it round-trips.
    sd = opt.state_dict()
    assert len(sd["param_groups"]) == 2 and sd["param_groups"][1]["betas"] == (0.9, 0.95)
    kinds = {frozenset(s) for s in sd["state"].values()}
    assert kinds == {frozenset({"momentum_buffer"}), frozenset({"step", "exp_avg", "exp_avg_sq"})}
    model_c = _Tiny()
    model_c.load_state_dict(model_a.state_dict())
    opt_c = MuonWithAdamW(model_c)
    buffer = io.BytesIO()
    torch.save(sd, buffer)
    opt_c.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=False))
    assert opt_c.param_groups[1]["lr"] == 1e-3
    for model, o in ((model_a, opt), (model_c, opt_c)):
        g = torch.Generator().manual_seed(14)
        for p in model.parameters():
            if p.requires_grad:
                p.grad = torch.randn(p.shape, generator=g)
        o.step()
    for pa, pc in zip(model_a.parameters(), model_c.parameters()):
        assert torch.equal(pa, pc)


# ----------------------------------------------------------------------------- bad input


def test_bad_input_names_the_argument():
    w = nn.Parameter(torch.randn(8, 8))
    with pytest.raises(ValueError, match="^params:.*>= 2 dims"):
        Muon([nn.Parameter(torch.randn(8))])
    with pytest.raises(TypeError, match="^params:.*complex"):
        Muon([nn.Parameter(torch.randn(4, 4, dtype=torch.complex64))])
    with pytest.raises(ValueError, match="^ns_coefficients: empty"):
        Muon([w], ns_coefficients=[])
    with pytest.raises(ValueError, match="^ns_coefficients:.*ns_steps=5"):
        Muon([w], ns_coefficients=POLAR_EXPRESS_COEFFICIENTS, ns_steps=3)
    with pytest.raises(ValueError, match="^adjust_lr_fn:"):
        Muon([w], adjust_lr_fn="sqrt")
    with pytest.raises(ValueError, match="^lr:"):
        Muon([w], lr=-1.0)
    with pytest.raises(ValueError, match="^momentum:"):
        Muon([w], momentum=1.0)
    with pytest.raises(ValueError, match="^eps:"):
        Muon([w], eps=0.0)
    with pytest.raises(TypeError, match="^ns_steps:"):
        Muon([w], ns_steps=2.5)
    with pytest.raises(ValueError, match="^backend:"):
        Muon([w], backend="cublas")
    with pytest.raises(ValueError, match="^use_muon:"):
        Muon([{"params": [w], "use_muon": False}])
    with pytest.raises(ValueError, match="use_muon"):
        MuonWithAdamW([{"params": [w]}])
    with pytest.raises(ValueError, match="^adjust_lr_fn:"):  # per-group options are checked too
        Muon([{"params": [w], "adjust_lr_fn": "nope"}])
    with pytest.raises(ValueError, match="^adamw_betas"):
        MuonWithAdamW(_Tiny(), adamw_betas=(0.9, 1.5))
    opt = Muon([w])
    with pytest.raises(ValueError, match="^params:"):
        opt.add_param_group({"params": [nn.Parameter(torch.randn(3))]})
    assert len(opt.param_groups) == 1  # a refused group is not left behind


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_parity_with_torch_muon(backend):
    init, data = _problem(15, [(256, 128), (128, 512), (256, 256)])
    data = [(x.cuda(), y.cuda()) for x, y in data]
    init = [w.cuda() for w in init]
    theirs = _train(lambda ps: torch.optim.Muon(ps, lr=0.02), init, data)
    exact = _train(lambda ps: Muon(ps, lr=0.02, ns_dtype=torch.float64, backend="torch"), init, data,
                   dtype=torch.float64)
    ours = _train(lambda ps: Muon(ps, lr=0.02, backend=backend), init, data)  # bf16 NS on GPU
    wrong = _train(lambda ps: Muon(ps, lr=0.02 * 1.02, backend=backend), init, data)
    displacement = max((e - w.double()).abs().max().item() for e, w in zip(exact, init))
    e_torch = _max(theirs, exact)
    assert e_torch < 0.02 * displacement
    assert _max(ours, exact) <= 2 * e_torch  # bf16 NS at torch's bf16 precision floor
    assert _max(wrong, exact) > 2 * e_torch  # the bound rejects a wrong step
