"""Data pipeline throughput: chunks/s and MB/s reading phantom volumes from .nii.gz (first
pass: gunzip, reorient, rescale, resample, window) and from the preprocessing cache (memory-
mapped slices), against MONAI's chain (LoadImaged, EnsureChannelFirstd, Orientationd RAS,
Spacingd, ScaleIntensityRanged, Resized) on the same files when MONAI is installed.

MB/s counts the decoded int16 source voxels for the .nii.gz paths and the float16 chunk bytes
read for the cache path. Every path draws the same chunks (same seed) after preprocessing.

Without nibabel (e.g. a bare GPU machine) no .nii.gz can be written or read: the phantoms stay in
memory, the in-memory path (preprocess_array on the HU arrays) is timed, and the file and cache
paths skip, saying why.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from sigvlp.data.chunks import ChunkConfig, ChunkSampler
from sigvlp.data.preprocess import PreprocessCache, PreprocessConfig, preprocess_array
from sigvlp.demo.synth import SynthConfig, make_phantom, write_dataset
from sigvlp.data.volume import load_volume

import _bench

try:
    import nibabel  # noqa: F401  (only to know whether .nii.gz files can be written and read)

    NO_NIFTI = None
except ImportError as exc:
    NO_NIFTI = f"nibabel is not installed ({exc}): .nii.gz files cannot be written or read"

CHUNKS_PER_VOLUME = 4
TABLE = "data pipeline (chunks from phantom CT volumes)"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, full_mode):
    n, size, slices = (16, (384, 512), (120, 400)) if full_mode else (6, (160, 192), (120, 300))
    cfg = SynthConfig(size=size, slices=slices, z_spacings=(0.75, 1.0, 1.25, 1.5, 2.0))
    pp = PreprocessConfig(z_spacing=1.5, inplane="resize", size=256 if full_mode else 128)
    chunk = ChunkConfig(patch=(16, 16, 16), min_slices=16, max_slices=64)
    corpus = {"pp": pp, "chunk": chunk, "cache_root": tmp_path_factory.mktemp("bench_cache")}
    if NO_NIFTI:
        corpus["phantoms"] = [make_phantom(7 + i, cfg) for i in range(n)]
        corpus["files"] = []
        corpus["source_mb"] = sum(p.hu.nbytes for p in corpus["phantoms"]) / 2 ** 20
        return corpus
    out = write_dataset(tmp_path_factory.mktemp("bench_phantoms"), n, 0, seed=7, config=cfg)
    files = sorted((out / "dataset" / "train").rglob("*.nii.gz"))
    corpus["files"] = files
    corpus["source_mb"] = sum(np.prod(load_volume(f).shape) * 2 for f in files) / 2 ** 20
    return corpus


@pytest.fixture
def files(corpus):
    """The corpus's .nii.gz files; skips (saying why) without nibabel."""
    if NO_NIFTI:
        pytest.skip(NO_NIFTI)
    return corpus["files"]


def _chunks(image: np.ndarray, sampler: ChunkSampler, rng) -> list[np.ndarray]:
    out = []
    for _ in range(CHUNKS_PER_VOLUME):
        z0, z1 = sampler.sample(image.shape[0], rng)
        out.append(np.ascontiguousarray(image[z0:z1], dtype=np.float32))
    return out


def _measure(benchmark, fn, rounds):
    return _bench.timed(benchmark, fn, rounds=rounds)  # after one warm-up call (imports, page cache)


def _report(bench_report, path, seconds, n_chunks, mb, baseline_key=None):
    chunks_s = n_chunks / seconds
    _bench.RESULTS.add(op=TABLE, provider=path, timing=_bench.last_timing(), bytes=mb * 2**20,
                       volumes_s=round(n_chunks / CHUNKS_PER_VOLUME / seconds, 2), chunks_s=round(chunks_s, 1),
                       MB_s=round(mb / seconds, 1), vs_monai=bench_report.ratio(chunks_s, ("data", "monai")))
    return chunks_s


def test_monai_chain(benchmark, bench_report, corpus, files):
    monai = pytest.importorskip("monai")
    from monai.transforms import (Compose, EnsureChannelFirstd, LoadImaged, Orientationd, Resized,
                                  ScaleIntensityRanged, Spacingd)

    pp = corpus["pp"]
    chain = Compose([
        LoadImaged(keys="image", image_only=True),
        EnsureChannelFirstd(keys="image"),
        Orientationd(keys="image", axcodes="RAS"),
        Spacingd(keys="image", pixdim=(-1, -1, pp.z_spacing), mode="bilinear"),
        ScaleIntensityRanged(keys="image", a_min=pp.hu_window[0], a_max=pp.hu_window[1], b_min=-1, b_max=1, clip=True),
        Resized(keys="image", spatial_size=(pp.size, pp.size, -1), mode="trilinear"),
    ])
    sampler = ChunkSampler(corpus["chunk"])

    def run():
        rng = np.random.default_rng(0)
        n = 0
        for f in corpus["files"]:
            img = chain({"image": str(f)})["image"]  # (1, x, y, z)
            image = np.asarray(img[0]).transpose(2, 1, 0)  # -> (z, y, x) like ours
            n += len(_chunks(image, sampler, rng))
        return n

    seconds = _measure(benchmark, run, rounds=2)
    chunks_s = _report(bench_report, f"MONAI {monai.__version__} chain from .nii.gz", seconds,
                       len(corpus["files"]) * CHUNKS_PER_VOLUME, corpus["source_mb"])
    bench_report.baselines[("data", "monai")] = chunks_s


def test_ours_from_arrays(benchmark, bench_report, corpus):
    """In memory: preprocess_array on each phantom's HU array, then the chunks (runs without nibabel:
    the phantoms are made in memory; with nibabel they are read once from the files, untimed)."""
    sampler = ChunkSampler(corpus["chunk"])
    pp = corpus["pp"]
    volumes = ([(p.hu, p.spacing) for p in corpus["phantoms"]] if NO_NIFTI else
               [(v.hu, v.spacing) for v in map(load_volume, corpus["files"])])

    def run():
        rng = np.random.default_rng(0)
        return sum(len(_chunks(preprocess_array(hu, spacing, pp), sampler, rng)) for hu, spacing in volumes)

    seconds = _measure(benchmark, run, rounds=3)
    _report(bench_report, "sigvlp from arrays (in memory)", seconds, len(volumes) * CHUNKS_PER_VOLUME,
            sum(hu.nbytes for hu, _ in volumes) / 2 ** 20)


def test_ours_from_nifti(benchmark, bench_report, corpus, files):
    sampler = ChunkSampler(corpus["chunk"])
    pp = corpus["pp"]

    def run():
        rng = np.random.default_rng(0)
        n = 0
        for f in corpus["files"]:
            vol = load_volume(f)
            n += len(_chunks(preprocess_array(vol.hu, vol.spacing, pp), sampler, rng))
        return n

    seconds = _measure(benchmark, run, rounds=3)
    _report(bench_report, "sigvlp from .nii.gz (first pass)", seconds, len(corpus["files"]) * CHUNKS_PER_VOLUME,
            corpus["source_mb"])


def test_ours_from_cache(benchmark, bench_report, corpus, files):
    from safetensors import safe_open

    cache = PreprocessCache(corpus["cache_root"], corpus["pp"])
    t0 = time.perf_counter()
    entries = [cache.get(f) for f in corpus["files"]]
    build_s = time.perf_counter() - t0
    sampler = ChunkSampler(corpus["chunk"])
    read_mb = [0.0]

    def run():
        rng = np.random.default_rng(0)
        n, nbytes = 0, 0
        for e in entries:
            with safe_open(e.file, framework="np") as fh:
                image = fh.get_slice("image")
                for _ in range(CHUNKS_PER_VOLUME):
                    z0, z1 = sampler.sample(e.shape[0], rng)
                    chunk = np.asarray(image[z0:z1], dtype=np.float32)
                    nbytes += chunk.size * 2
                    n += 1
        read_mb[0] = nbytes / 2 ** 20
        return n

    seconds = _measure(benchmark, run, rounds=10)
    _report(bench_report, "sigvlp from cache (mmap slices)", seconds, len(entries) * CHUNKS_PER_VOLUME, read_mb[0])
    _bench.RESULTS.add(op=TABLE, provider="cache build (once)", shape=f"{len(entries)} volumes",
                       seconds=build_s, volumes_s=round(len(entries) / build_s, 2))


def test_ours_loader_batches(benchmark, bench_report, corpus, files):
    from sigvlp.data.loader import ChunkSource, LoaderConfig, make_loader

    cache = PreprocessCache(corpus["cache_root"], corpus["pp"])
    sources = [ChunkSource.from_cache(cache.get(f)) for f in corpus["files"]]
    cfg = LoaderConfig(token_budget=4096, chunks_per_volume=CHUNKS_PER_VOLUME, num_workers=0)
    loader = make_loader(sources, corpus["chunk"], cfg)
    counted = [0, 0]

    def run():
        counted[:] = [0, 0]
        for batch in loader:
            counted[0] += len(batch["names"])
            counted[1] += batch["patches"].numel() * 4
        return counted[0]

    seconds = _measure(benchmark, run, rounds=5)
    _report(bench_report, "sigvlp loader (cache -> packed batches)", seconds, counted[0], counted[1] / 2 ** 20)


MEMORY_TABLE = "data pipeline peak memory (fresh process, extra over its baseline)"
_MEASURE = """
import json, sys
import numpy as np, torch
torch.set_num_threads(1)
from sigvlp.data.preprocess import PreprocessCache, preprocess_array, preset
from sigvlp.data.volume import load_volume
preprocess_array(np.zeros((4, 16, 16), np.int16), (1.0, 1.0, 1.0), preset("sigvlp"))
def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = status("VmRSS")
vol = load_volume(sys.argv[1])
n = vol.hu.size * 2
out = preprocess_array(vol.hu, vol.spacing, preset(sys.argv[2]))
print(json.dumps({"extra": status("VmHWM") - base, "int16_bytes": n, "output_bytes": out.nbytes}))
"""


def test_peak_memory_load_preprocess(bench_report, corpus, files):
    """Peak extra RSS of load_volume + preprocess_array on the largest corpus volume, in units of
    its int16 size (goal <= 2.5x; tests/test_data_cache.py checks a 512 x 512 x 400 volume). The
    float32 output is part of it (larger than the input when the preset upsamples in-plane)."""
    import json
    import os
    import subprocess
    import sys

    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux /proc to reset a process's peak RSS")
    f = max(corpus["files"], key=lambda p: p.stat().st_size)
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(f), "sigvlp"], check=True, capture_output=True,
                         text=True).stdout.strip().splitlines()[-1]
    res = json.loads(out)
    _bench.RESULTS.add(op=MEMORY_TABLE, provider="load_volume + preprocess_array", shape=f"{f.name}",
                       peak_bytes=res["extra"], volume_MB=round(res["int16_bytes"] / 2 ** 20),
                       output_MB=round(res["output_bytes"] / 2 ** 20),
                       x_int16=round(res["extra"] / res["int16_bytes"], 2))
