"""sigvlp.threads: the CPU thread rule of train, demo and eval."""

from __future__ import annotations

import pytest
import torch

from sigvlp import threads


def test_rule_one_thread_per_free_core_capped():
    assert threads.default_threads(cores=2, busy=0) == 2  # idle 2-core machine
    assert threads.default_threads(cores=2, busy=1) == 1  # one competing busy process
    assert threads.default_threads(cores=2, busy=10) == 1  # never below one
    assert threads.default_threads(cores=16, busy=1) == threads.MAX_THREADS == 8
    assert threads.default_threads(cores=64, busy=60) == 4
    assert 1 <= threads.default_threads() <= threads.MAX_THREADS
    assert threads.cores_available() >= 1 and threads.busy_cores() >= 0


def test_apply_threads(monkeypatch):
    before = torch.get_num_threads()
    try:
        assert threads.apply_threads(3) == 3
        assert threads.apply_threads(0) == 3  # 0: left as it is
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert threads.apply_threads(None) == 3  # the environment pins it: unchanged
        monkeypatch.delenv("OMP_NUM_THREADS")
        monkeypatch.setattr(threads, "default_threads", lambda: 1)
        assert threads.apply_threads(None) == 1
        for bad in (-1, 1.5, True, "2"):
            with pytest.raises(ValueError, match="threads"):
                threads.apply_threads(bad)
    finally:
        torch.set_num_threads(before)


def test_train_runtime_applies_the_rule_on_the_cpu(monkeypatch):
    from sigvlp.train.builders import setup_runtime
    from sigvlp.train.config import TrainConfig

    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "default_threads", lambda: 1)
    try:
        torch.set_num_threads(2)
        if not torch.cuda.is_available():
            setup_runtime(TrainConfig(data="unused"))
            assert torch.get_num_threads() == 1
        setup_runtime(TrainConfig(data="unused", threads=2))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
