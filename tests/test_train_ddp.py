"""DDP on CPU (gloo): a 2-process run equals the single-process run on the same global batches.

Each step's global batch is 2 x PER_RANK chunks; rank r trains on its half, the single process
on all of it. The distributed sigmoid loss (texts of both ranks are candidates), DDP's gradient
average and the distributed Muon must reproduce the single-process losses and weights up to
fp32 reduction order. A control run on rank 0's half alone shows the comparison can fail.
"""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from _train_helpers import TEST_MODEL, global_batches, rank_source

STEPS, PER_RANK = 3, 3


def _config(out, **kw):
    from sigvlp.train import TrainConfig

    values = dict(out=str(out), model="tiny", model_overrides=dict(TEST_MODEL), steps=STEPS, warmup_steps=1,
                  lr=0.02, adamw_lr=3e-3, progress=False, tensorboard=False, ckpt_every=100, threads=1)
    values.update(kw)
    return TrainConfig(**values)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out):
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    from sigvlp.train import train

    train(_config(out), batch_source=rank_source(global_batches(STEPS, PER_RANK, world), PER_RANK))


def _run_single(out, batches, per_rank):
    from sigvlp.train import Trainer

    trainer = Trainer(_config(out), batch_source=rank_source(batches, per_rank))
    trainer.run()
    return trainer


def _losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def _weights(out):
    from safetensors.torch import load_file

    return load_file(str(out / "checkpoints" / f"step_{STEPS:08d}" / "model.safetensors"))


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_two_process_gloo_matches_single_process(tmp_path):
    threads = torch.get_num_threads()
    try:
        ddp_out = tmp_path / "ddp"
        mp.start_processes(_worker, args=(2, _free_port(), str(ddp_out)), nprocs=2, join=True, start_method="spawn")
        single_out = tmp_path / "single"
        batches = global_batches(STEPS, PER_RANK, 2)
        _run_single(single_out, batches, PER_RANK)
        half_out = tmp_path / "half"  # control: rank 0's share only
        _run_single(half_out, [b[:PER_RANK] for b in batches], PER_RANK)
    finally:
        torch.set_num_threads(threads)

    ddp_l, single_l, half_l = _losses(ddp_out), _losses(single_out), _losses(half_out)
    assert len(ddp_l) == len(single_l) == STEPS
    # fp32, different reduction order (all-reduce vs one backward): agreement to ~1e-6 relative
    torch.testing.assert_close(torch.tensor(ddp_l), torch.tensor(single_l), rtol=1e-5, atol=1e-6)
    assert max(abs(a - b) for a, b in zip(half_l, single_l)) > 1e-3
    w_ddp, w_single, w_half = _weights(ddp_out), _weights(single_out), _weights(half_out)
    assert w_ddp.keys() == w_single.keys()
    worst = max((w_ddp[k] - w_single[k]).abs().max().item() for k in w_ddp)
    control = max((w_half[k] - w_single[k]).abs().max().item() for k in w_half)
    assert worst < 1e-4, worst
    assert control > 100 * max(worst, 1e-7), (control, worst)
