"""`sigvlp preprocess` and sharded cache building (sigvlp.data.shards): two --shard processes build the
same cache as one process; the manifest finds a complete cache without reading the sources; under
DDP (2 gloo ranks, torchrun) each rank builds half of an empty cache and the run trains."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _data_helpers import tiny_dataset
from _train_helpers import TEST_MODEL


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    return env


def _preprocess(data, cache, *extra):
    return [sys.executable, "-m", "sigvlp", "preprocess", str(data), "--cache", str(cache), "--preset", "tiny",
            "--quiet", *extra]


def _entries(cache: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in cache.glob("pp-*/*.safetensors")}


def _manifest_lines(cache: Path) -> dict[str, list[dict]]:
    return {f.name: [json.loads(line) for line in f.read_text().splitlines()] for f in cache.glob("pp-*/manifest/*.jsonl")}


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    return tiny_dataset(tmp_path_factory, n_train=6, n_valid=2)


def test_two_shards_build_the_same_cache_as_one_process(phantoms, tmp_path):
    procs = [subprocess.Popen(_preprocess(phantoms, tmp_path / "sharded", "--shard", f"{i}/2"), env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    assert all("4 of 4 volume(s) cached" in o[0] for o in outs)  # 8 volumes, disjoint halves
    one = subprocess.run(_preprocess(phantoms, tmp_path / "one"), env=_env(), capture_output=True, text=True,
                         timeout=600)
    assert one.returncode == 0 and "8 of 8 volume(s) cached" in one.stdout, one.stderr[-2000:]
    sharded, single = _entries(tmp_path / "sharded"), _entries(tmp_path / "one")
    assert len(single) == 8 and sharded == single  # same names (content keys), same bytes
    # resumable: a rerun builds nothing (no entry rewritten, no manifest line added)
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "sharded").rglob("*.safetensors")}
    lines = sum(len(v) for v in _manifest_lines(tmp_path / "sharded").values())
    again = subprocess.run(_preprocess(phantoms, tmp_path / "sharded"), env=_env(), capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0 and "8 of 8 volume(s) cached" in again.stdout
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "sharded").rglob("*.safetensors")} == before
    assert sum(len(v) for v in _manifest_lines(tmp_path / "sharded").values()) == lines


@pytest.mark.parametrize("flag,value", [("--shard", "2/2"), ("--shard", "1"), ("--workers", "0")])
def test_bad_flags_exit_2(phantoms, tmp_path, capsys, flag, value):
    from sigvlp.cli import main

    try:  # numeric flags are refused while the command line is read (argparse exits 2), the rest by run()
        rc = main(["preprocess", str(phantoms), "--cache", str(tmp_path), flag, value])
    except SystemExit as e:
        rc = e.code
    assert rc == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("usage:")
           and not line.startswith(" ")]
    assert len(err) == 1 and (err[0].startswith(f"sigvlp preprocess: error: {flag}:")
                              or err[0].startswith(f"sigvlp preprocess: error: argument {flag}:")), err


def test_manifest_finds_entries_without_reading_sources(phantoms, tmp_path, monkeypatch):
    """A complete cache is found through the manifest: no source is fingerprinted (opened); a source
    whose mtime changed is fingerprinted again and, unchanged in content, keeps its entry."""
    import sigvlp.data.preprocess as pp
    from sigvlp.data import CTRateDataset
    from sigvlp.data.shards import preprocess_records

    ds = CTRateDataset(phantoms, "train")
    cache = pp.PreprocessCache(tmp_path, pp.preset("tiny"))
    preprocess_records(ds, cache, ds.records)

    def no_reads(path):
        raise AssertionError(f"fingerprinted {path}")

    monkeypatch.setattr(pp, "file_fingerprint", no_reads)
    fresh = pp.PreprocessCache(tmp_path, pp.preset("tiny"))
    got = [fresh.get(r.path, r.mask_path, r.metadata, root=ds.root) for r in ds.records]
    assert fresh.misses == 0 and len({g.file for g in got}) == len(ds.records)
    monkeypatch.undo()
    st = os.stat(ds.records[0].path)
    os.utime(ds.records[0].path, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))
    again = pp.PreprocessCache(tmp_path, pp.preset("tiny"))
    assert again.get(ds.records[0].path, ds.records[0].mask_path, ds.records[0].metadata, root=ds.root).file == got[0].file
    assert again.misses == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_ddp_ranks_each_build_half_of_an_empty_cache_and_train(phantoms, tmp_path):
    sets = [f"--set=model.{k}={v}" for k, v in {**TEST_MODEL, "tokenizer": "word"}.items()]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
           f"--master-port={_free_port()}", "-m", "sigvlp", "train", "--data", str(phantoms),
           "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "run"), "--model", "tiny", *sets,
           "--steps", "2", "--warmup-steps", "1", "--token-budget", "512", "--num-workers", "0", "--threads", "1",
           "--no-progress", "--no-tensorboard"]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    built = {name: [r for r in lines if "entry" in r] for name, lines in _manifest_lines(tmp_path / "cache").items()}
    assert sorted(len(v) for v in built.values()) == [3, 3]  # 6 train volumes: one half per rank process
    keys = [r["key"] for v in built.values() for r in v]
    assert len(set(keys)) == 6
    assert "without a timeout" in proc.stdout
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2
