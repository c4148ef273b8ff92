"""The training step's parts: the typed Batch (every tensor moved to the device once, metadata
left on the host), the loss-term objects (present only with a weight > 0, checked against fp64
formulas written out here) and train_step's gradients."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from _train_helpers import TEST_MODEL, collate, samples


def test_batch_moves_every_tensor_once_and_keeps_metadata_on_the_host():
    from sigvlp.train.step import Batch

    raw = collate(samples(0, 4))
    # every tensor of the collate's batch is a device field of Batch (no hand-kept key list to forget one)
    assert {k for k, v in raw.items() if isinstance(v, torch.Tensor)} == set(Batch.TENSOR_FIELDS)
    batch = Batch.from_collate(raw)
    assert batch.device is None and batch.num_chunks == 4 and batch.num_tokens == raw["patches"].shape[0]
    moved = batch.to("meta")
    for k in Batch.TENSOR_FIELDS:
        assert getattr(moved, k).device.type == "meta" and getattr(batch, k).device.type == "cpu"
    assert moved.device == torch.device("meta")
    for k in ("max_seqlen", "text_max_seqlen", "empty_texts", "names", "organs", "z_ranges", "texts"):
        assert getattr(moved, k) == getattr(batch, k) and not isinstance(getattr(moved, k), torch.Tensor)
    assert list(moved.names) == raw["names"] and moved.max_seqlen == raw["max_seqlen"]
    with pytest.raises(RuntimeError, match="moved to the device once"):
        moved.to("meta")
    with pytest.raises(ValueError, match=r"missing key\(s\) \['text_ids'"):
        Batch.from_collate({k: v for k, v in raw.items() if k != "text_ids"})


def test_the_trainer_moves_each_micro_batch_once(tmp_path, monkeypatch):
    from sigvlp.train import TrainConfig, Trainer
    from sigvlp.train.step import Batch

    batches = [collate(samples(s, 4)) for s in range(4)]
    cfg = TrainConfig(model="tiny", out=str(tmp_path / "run"), model_overrides=dict(TEST_MODEL), steps=2, grad_accum=2,
                      warmup_steps=1, progress=False, tensorboard=False)
    trainer = Trainer(cfg, batch_source=lambda rank, world: iter(batches))
    moves = []
    real = Batch.to
    monkeypatch.setattr(Batch, "to", lambda self, device: moves.append(device) or real(self, device))
    trainer.train_step(trainer._batches())
    assert moves == [trainer.device, trainer.device]  # grad_accum micro-batches, one move each


def _statements_setup():
    from sigvlp.data.tokenizers import ByteTokenizer
    from sigvlp.train.losses import PromptStatements
    from sigvlp.prompts import PromptTopics

    records = [SimpleNamespace(name="a", labels={"Lung nodule": 1, "Cardiomegaly": 0}),
               SimpleNamespace(name="b", labels={"Lung nodule": 0, "Cardiomegaly": 1})]
    data = SimpleNamespace(records=records, depths={"a": 40, "b": 40}, present_organs=["lung", "heart"])
    topics = PromptTopics.from_records(records, data.present_organs)
    return data, PromptStatements(topics, ByteTokenizer(), 48, data.depths)


def _batch(n=5):
    from sigvlp.train.step import Batch

    names = ("a", "a", "b", "b", "b")[:n]
    organs = (("lung", "heart"), ("lung",), ("heart",), ("lung", "heart"), ())[:n]
    z = ((0, 40), (0, 10), (0, 40), (5, 40), (0, 40))[:n]
    ids = torch.tensor([7, 8, 7, 9, 10][:n], dtype=torch.int64)
    cu = torch.arange(n + 1, dtype=torch.int32)
    return Batch(patches=torch.zeros(n, 1), cu_seqlens=cu, grid_thw=torch.ones(n, 3, dtype=torch.int32),
                 text_ids=torch.arange(3 * n), text_cu_seqlens=cu * 3, image_pair_ids=ids, text_pair_ids=ids.clone(),
                 max_seqlen=1, text_max_seqlen=3, names=names, organs=organs, z_ranges=z)


def test_loss_terms_exist_only_with_a_positive_weight():
    from sigvlp.data.tokenizers import ByteTokenizer
    from sigvlp.train import TrainConfig
    from sigvlp.train.losses import PromptSupervision, TopicDecorrelation, build_losses

    data, _ = _statements_setup()
    tok = ByteTokenizer()
    off = build_losses(TrainConfig(), data, tok, 48, log=lambda m: None)
    assert off.terms == [] and off.statements is None and off.names == ("main",)
    batch = _batch()
    assert off.prepare(batch) is batch  # no statements appended
    prompt = build_losses(TrainConfig(prompt_weight=2.0), data, tok, 48, log=lambda m: None)
    assert [type(t) for t in prompt.terms] == [PromptSupervision] and prompt.terms[0].weight == 2.0
    both = build_losses(TrainConfig(prompt_weight=2.0, prompt_decorrelation=3.0), data, tok, 48, log=lambda m: None)
    assert [type(t) for t in both.terms] == [PromptSupervision, TopicDecorrelation]
    assert both.names == ("main", "prompt", "decorrelation")
    with pytest.raises(ValueError, match="prompt_weight > 0 needs the dataset loader"):
        build_losses(TrainConfig(prompt_weight=1.0), None, tok, 48)


def test_statements_are_appended_after_the_batch_texts():
    from sigvlp.data.tokenizers import ByteTokenizer

    _, statements = _statements_setup()
    batch = _batch()
    out = statements.append(batch)
    tok = ByteTokenizer()
    want = [tok.encode(t, 48) for t in statements.topics.texts]
    assert out.text_ids.tolist() == batch.text_ids.tolist() + [i for r in want for i in r]
    lens = [len(r) for r in want]
    cu = out.text_cu_seqlens.tolist()
    assert cu[:6] == batch.text_cu_seqlens.tolist() and [b - a for a, b in zip(cu[5:], cu[6:])] == lens
    assert out.text_cu_seqlens.dtype == torch.int32 and out.text_max_seqlen == max(lens + [3])
    assert out.text_pair_ids is batch.text_pair_ids and out.names == batch.names


def _oracle(img, txt, stm, scale, bias, truth, w_prompt, w_decor, ids):
    """fp64 objective written out: main sigmoid loss, balanced per-topic statement loss, decorrelation."""
    logsig = torch.nn.functional.logsigmoid
    n = img.shape[0]
    main = -sum(float(logsig((1.0 if ids[i] == ids[j] else -1.0) * (scale * img[i] @ txt[j] + bias)))
                for i in range(n) for j in range(n)) / n
    prompt = 0.0
    for k in range(truth.shape[0]):
        for value in (1, 0):
            rows = [i for i in range(n) if truth[k, i] == value]
            if rows:
                true_s, false_s = stm[2 * k + (1 - value)], stm[2 * k + value]
                prompt += 0.5 * -sum(float(logsig(scale * img[i] @ true_s)) + float(logsig(-scale * img[i] @ false_s))
                                     for i in rows) / len(rows)
    prompt /= truth.shape[0]
    d = [stm[2 * k] - stm[2 * k + 1] for k in range(stm.shape[0] // 2)]
    cos2 = [float(a @ b / (a.norm() * b.norm())) ** 2 for i, a in enumerate(d) for j, b in enumerate(d) if i != j]
    decor = sum(cos2) / len(cos2)
    return main + w_prompt * prompt + w_decor * decor, main, prompt, decor


def test_losses_match_the_written_out_objective():
    from sigvlp.train.losses import Losses, PromptSupervision, TopicDecorrelation

    _, statements = _statements_setup()
    batch = _batch()
    g = torch.Generator().manual_seed(0)
    norm = torch.nn.functional.normalize
    img = norm(torch.randn(5, 16, generator=g, dtype=torch.float64), dim=1)
    txt = norm(torch.randn(5 + len(statements), 16, generator=g, dtype=torch.float64), dim=1)
    scale, bias = torch.tensor(7.0, dtype=torch.float64), torch.tensor(-3.0, dtype=torch.float64)
    losses = Losses([PromptSupervision(2.0, statements), TopicDecorrelation(3.0)], statements)
    out = SimpleNamespace(image_emb=img.float(), text_emb=txt.float(), logit_scale=scale.float(), logit_bias=bias.float())
    total, parts = losses(out, losses.prepare(batch))
    truth = statements.truth(batch)
    assert truth.tolist()[1] == [1, -1, 0, 0, 0]  # Lung nodule: a's 10-slice chunk covers 25%: unknown
    want = _oracle(img, txt[:5], txt[5:], scale, bias, truth, 2.0, 3.0, batch.image_pair_ids.tolist())
    got = [float(total), float(parts["main"]), float(parts["prompt"]), float(parts["decorrelation"])]
    assert got == pytest.approx(want, rel=1e-5)
    alone, parts0 = Losses()(SimpleNamespace(**{**vars(out), "text_emb": out.text_emb[:5]}), batch)
    assert set(parts0) == {"main"} and float(alone) == pytest.approx(want[1], rel=1e-5)


def test_train_step_accumulates_the_gradient_of_the_scaled_objective():
    from sigvlp.model import SigVLP, SigVLPConfig
    from sigvlp.ops import sigmoid_loss
    from sigvlp.train.losses import Losses
    from sigvlp.train.step import Batch, train_step

    torch.manual_seed(0)
    model = SigVLP(SigVLPConfig.preset("tiny", **TEST_MODEL))
    raw = collate(samples(1, 4))
    parts = train_step(model, Batch.from_collate(raw).to("cpu"), Losses(), grad_accum=4)
    got = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    out = model(raw)
    main = sigmoid_loss(out.image_emb, out.text_emb, out.logit_scale, out.logit_bias,
                        image_ids=raw["image_pair_ids"], text_ids=raw["text_pair_ids"])
    (main / 4).backward()
    assert float(parts["main"]) == float(main.detach()) and not parts["main"].requires_grad
    want = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys() and len(got) > 10
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)
