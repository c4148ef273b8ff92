"""The preprocessing cache: entries survive moving the dataset, a changed file is never served
stale, old formats are rebuilt (not misread), preprocessing changes need a CACHE_FORMAT bump
(golden outputs), and the peak memory of load + preprocess for a 512 x 512 x 400 volume."""

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import zlib

import nibabel as nib
import numpy as np
import pytest

from _data_helpers import tiny_dataset
from sigvlp.data.ctrate import CTRateDataset, volume_relpath
from sigvlp.data.preprocess import (CACHE_FORMAT, CachedVolume, PreprocessCache, PreprocessConfig, StaleCacheEntry,
                                    file_fingerprint, preset)


def _copy_without_times(src, dst):
    shutil.copytree(src, dst, copy_function=shutil.copyfile)  # new mtimes, as a plain copy gives
    return dst


def test_cache_survives_moving_the_dataset(tmp_path_factory, tmp_path):
    first = _copy_without_times(tiny_dataset(tmp_path_factory), tmp_path / "here")
    cache = PreprocessCache(tmp_path / "cache", preset("tiny"))
    built = CTRateDataset(first, "train").cached(cache)
    assert (cache.hits, cache.misses) == (0, 6)
    moved = tmp_path / "elsewhere" / "renamed"
    moved.parent.mkdir()
    shutil.move(first, moved)
    again = PreprocessCache(tmp_path / "cache", preset("tiny"))
    entries = CTRateDataset(moved, "train").cached(again)
    assert (again.hits, again.misses) == (6, 0)
    assert [cv.file for _, cv in entries] == [cv.file for _, cv in built]
    assert entries[0][1].source == entries[0][0].path  # the entry reports where the source is now
    copied = _copy_without_times(moved, tmp_path / "copy")
    third = PreprocessCache(tmp_path / "cache", preset("tiny"))
    CTRateDataset(copied, "train").cached(third)
    assert (third.hits, third.misses) == (6, 0)


def test_changed_file_is_never_served_stale(tmp_path_factory, tmp_path):
    root = _copy_without_times(tiny_dataset(tmp_path_factory), tmp_path / "ds")
    cache = PreprocessCache(tmp_path / "cache", preset("tiny"))
    ds = CTRateDataset(root, "valid")
    before = dict((r.name, cv) for r, cv in ds.cached(cache))
    path = root / "dataset" / volume_relpath("valid_1_a_1.nii.gz")
    img = nib.load(path)
    data = np.asarray(img.dataobj.get_unscaled()).copy()
    data[data.shape[0] // 2, data.shape[1] // 2, data.shape[2] // 2] += 500  # one voxel
    st = os.stat(path)
    out = nib.Nifti1Image(data, img.affine, img.header)
    nib.save(out, path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # same mtime: the key must not rely on it
    after = dict((r.name, cv) for r, cv in CTRateDataset(root, "valid").cached(cache))
    assert after["valid_1_a_1.nii.gz"].file != before["valid_1_a_1.nii.gz"].file
    assert after["valid_2_a_1.nii.gz"].file == before["valid_2_a_1.nii.gz"].file
    assert not np.array_equal(after["valid_1_a_1.nii.gz"].read(), before["valid_1_a_1.nii.gz"].read())


def test_fingerprint_sees_a_changed_byte_anywhere_in_a_plain_file(tmp_path):
    p = tmp_path / "v.nii"
    p.write_bytes(bytes(range(256)) * 4096)
    a = file_fingerprint(p)
    data = bytearray(p.read_bytes())
    data[len(data) // 3 + 17] ^= 1
    p.write_bytes(bytes(data))
    assert file_fingerprint(p) != a


def test_old_format_entry_is_rebuilt_not_misread(tmp_path):
    from safetensors.numpy import load_file, save_file
    from safetensors import safe_open

    from sigvlp.demo.synth import make_phantom, save_nifti
    from _data_helpers import TINY

    src, mask = tmp_path / "v.nii.gz", tmp_path / "m.nii.gz"
    save_nifti(make_phantom(3, TINY), src, "RAS", mask_path=mask)
    cache = PreprocessCache(tmp_path / "c", preset("tiny"))
    cv = cache.get(src, mask)
    # Rewrite the entry as a format-1 file would look: no organ map, format 1 in its metadata.
    tensors = load_file(cv.file)
    del tensors["organ_map"]
    with safe_open(cv.file, framework="np") as f:
        meta = json.loads(f.metadata()["sigvlp"])
    meta["format"] = 1
    save_file(tensors, cv.file, metadata={"sigvlp": json.dumps(meta)})
    with pytest.raises(StaleCacheEntry, match="cache format 1"):
        CachedVolume.open(cv.file)
    again = PreprocessCache(tmp_path / "c", preset("tiny"))
    rebuilt = again.get(src, mask)
    assert (again.hits, again.misses) == (0, 1) and rebuilt.has_organ_map
    assert CachedVolume.open(rebuilt.file).has_organ_map


# ----------------------------------------------------------------------------- golden outputs
# Quantised preprocessing outputs of a small fixed volume, per CACHE_FORMAT. A change to loading
# or preprocessing that alters results fails here until CACHE_FORMAT is bumped and the new golden
# (printed by the failure) recorded: old cache entries are then never served.
GOLDEN_BLOBS = {
    2: (
        "eNqllsmq7EYShl/lcrYy1jw1eCGppNKs0iyVMUbzPM8y9927jjeNaXrVkASZf2REJkHGR/71NWdLdWdf//rx11e6XmO2fKa/f1Vd"
        "VGRfv/z4GuYi6v/sovE/i3Ee8qrNvv74KNkZJesn4ouOMJxIMALKUyRGk+R7+99J/py+3Zk+0FALa0Jghico9pmLp7AwrnLwwtK6"
        "EA1V5WLZkq0iEeom50/RhC88qLiLMflsq+b0rXCu1JidkG2qC8uXDZxMZc36HW010zcpLz9IokFjp+2aSJk0EARyN98yDEhpkM4p"
        "GqyLEB6NLpoCDbZP0OvTqUWBtU2d+YHHs0d2NH0+0Plqr9oArCcq2epWINtloci+Bfass8hWaRuWEVij+Su8DithIUi4UQZADxvS"
        "3ruxrjVK13taApfr66vePfr6/RTc+ZIdCdbSWIf7hQxk0DacXsPj0Z+T5HMGivbr3NPkbMYpra1Ruy1XGNHuheZ6u6l02uz6uvg+"
        "5sPImPk6L4VeStJ6Fx2cTIrPs4KSKwJWS95DGwBKr4mwqRbi/hLsozZDkiQ3A+wIwSBMNp+8OU/z7G1sDwGFiCDM5bVz6G2GO0aM"
        "9aJTWa9dV5ggpRtVWbsSBRpz4MG0opIzwKnUi+T0xCU/IPdQ3UyPT1SMySpYps5FVk6UJUZTJoEgJibJA2UCsGOD6ksn2h7ch2RB"
        "CNonpy1HeoyMvGRlw9UsB9AsUHF/PU+ex7CieK9hzaNh4ZEU17jEGdVedppGaE+dsY4CjjwkWoEIpNF6glWESeamSYaexOMQDE3B"
        "U3LHt8ZUV74KkOJN3mAcDZy3oCzJmPOl0fRTh85SVDbPYsjhKEWAoogu6ba2D7T0c39GiSYPeE5uoUaCAqwlWcvFDYjeRBGQKsu3"
        "MHr3K3+bxeg8xO0dkoBVgyjtY0K3yeLukiASoBKgBmqikYbUzJlcXoTjTYOkQRbXZwTQPoiJv3W+uTNWg6GOjwZvcXHFS64Yzdar"
        "00P4fmxgMzwxD+t8GqbEJ3Az/Ij18oYHuKHVRXVdFrKSK+cBwxRE6Fg9pRRton6ntQNczJnmyHWAdaj1JKym01sHYQZGKoKG3hs+"
        "6NRx74qPFiINSgMKhBy6HCtq5KvBvypqaNGmaa7RdabR0+yX1rKV28GrthW11oKolUJ1TAwq0EZo6D0MyQVBjdaGq1pHe4ckDizS"
        "/GBT0HjlEnzvcX7i983DaNe9uEzPJRbEii6TTf/yvLEpn+ARc51rd53DOM0s2V0UFajExk3PM61rqy/omqqhZF5Ckc3MjtOEiPG/"
        "fSNnKaPxG2a/U7/8+B7fjFrGKKn64ltFfyXxX34gv0J/GwT/4+c//P8fAuOEhlGaoqKUzJCMTP8LgZPedLDWPF23XGj8MTbIhLTP"
        "S8h8WXvyglYlIuGonfPgpRJ1pN403udUfcqubVY9aZWgDdVRRecI3NKpqS5SSL38nAXLFKCmGDsznJAQNyyKNtYlWdfY+DRbkMYo"
        "mt00K75sML45MZD1B+BjWWK7YvJ5/snjfmGqC5SgdoiL8Q60UcwUlqdcx8BsmKoWrTWvoelvsKzOYzdiOb2bDgLHdOUYAOwaHVMk"
        "sFHe9/qdj+pKoJXzE6BvwXUu441KJQlo4Ovlva+MrV6LyVLTo7lQApd5iLKVt1o5liTiyDKhvrFz+8pP8+hPo5hGD7q7e9elUuJA"
        "1AzTdz4ppR1/yBsmErasaxhMpiOe8JdJTY0dxJcREr7Kg/ThGTn0KN9SCSpZ3AY4MHRkyk681e1ZPMYb6AIXKTRBZIg0E8Whtq/F"
        "y0twDKw9HbjKV3pUCGVJlJecF1vjTv+WY1rtX1EgCM3MUt44TKQZVYg3oEo89uO0R6mxdFw6+vS0HMQhcNsVE6d9AwWtL3m2lJrP"
        "Go0ZU2Co7rs3VIyqL/pIGGh+JMgifsi5tHXWcJ96pk3XW0rZedOmWuMiXBbbIpMHToqlL9QUx00GsTh9CDqadYPWPOCm9N51C5yA"
        "z7zJQbOB1VuKpxezOMZgjPsqkg/Jw5sxR0Q69U7eQch6S4p/OfRMBbMAjI6VzlgOv8e1UgjU4Hh86p5ByHbb5SN81PKcH8exoy+W"
        "E4C5axrXhcWMuS7MyGlJv5jqjT1fGAfIJ++TYn+LCpsxTSB1MCIZdaCQMYHOZI3tOOnJ9IkqK3RhaQh2CAoSUPNmdINg1H2WAI1t"
        "lIEdtqOrtYNozYeEmjCs55TgPN5lxUMon+obp5PdE0UW9JmSjG7CCOEDgLExAiR2+qcH9sloj3BMdRXWd3BVyQ/QUbNDLv6OTe55"
        "jHdoGZBZP4zjIS9nARRPRD6ZmBDJoAo6AH6GNrmdKUWlMdGn8xAJ7L1T67nBAFxFDtZuTrA1zFZYwsgJnqWe9L22fCh8/jbTFAZG"
        "YKRiRYZQRmOIP6O5dj6I8Bh8zOWbFij9jZ1QJgRrMcNOmlRJZPdrJbD7C7X2DaBT6QFzKix5XjzccVm2ULVB3TmPshZY0jpKcGCH"
        "+W4jzgbSzUA6ijPPFBDMZADq0YQ6O17wHeML4EDnB2OjsODjapnK1H2Nh4h2hfa21A4hjw2cd4T3ctfJXXtL6dWsgNGOphAGtm7A"
        "zAwO9heYIP5+4fkSM7Dxzorf/oldGPof3P3o8K/k3+aPnz//DdSGbfc="
    ),
}
def _golden_source(tmp_path):
    z, y, x = 12, 20, 18
    k, j, i = np.meshgrid(np.arange(z), np.arange(y), np.arange(x), indexing="ij")
    hu = ((k * 97 + j * 31 + i * 17) % 2000 - 1000).astype(np.int16)  # integer pattern, -1000..999
    hu[:, :3] = -1000
    labels = np.zeros((z, y, x), np.uint8)
    labels[2:9, 5:15, 4:9] = 10
    labels[4:12, 6:12, 10:16] = 51
    labels[0:5, 14:20, 2:16] = 5
    aff = np.array([[-0.9, 0, 0, 10.0], [0, -0.8, 0, 20.0], [0, 0, 2.5, -30.0], [0, 0, 0, 1]])  # LPS file
    stored = (hu.astype(np.int32) + 1024).astype(np.int16)
    for arr, name, scaled in ((stored, "g.nii.gz", True), (labels, "gm.nii.gz", False)):
        img = nib.Nifti1Image(np.ascontiguousarray(arr.transpose(2, 1, 0)[::-1, ::-1]), aff)
        img.set_qform(aff, 1)
        img.set_sform(aff, 1)
        if scaled:
            img.header.set_data_dtype(np.int16)
            img.header.set_slope_inter(1.0, -1024.0)
        nib.save(img, str(tmp_path / name))
    return tmp_path / "g.nii.gz", tmp_path / "gm.nii.gz"


def _golden_now(tmp_path) -> dict:
    from safetensors import safe_open

    src, mask = _golden_source(tmp_path)
    out = {}
    for mode, cfg in (("resize", PreprocessConfig(z_spacing=4.0, inplane="resize", size=8)),
                      ("spacing", PreprocessConfig(z_spacing=3.0, inplane="spacing", xy_spacing=1.7, size=8,
                                                   hu_window=(-500.0, 500.0)))):
        cv = PreprocessCache(tmp_path / "c", cfg).get(src, mask, {"RescaleSlope": "1", "RescaleIntercept": "-1024"})
        with safe_open(cv.file, framework="np") as f:
            names = sorted(f.keys())
            image = f.get_tensor("image")
            exact = b"".join(f.get_tensor(n).tobytes() for n in ("organ_map", "organ_profile"))
        q = np.round(image.astype(np.float32) * 1000).astype(np.int16)
        out[mode] = {"shape": list(image.shape), "dtypes": names, "spacing": [round(s, 6) for s in cv.spacing],
                     "image_q": base64.b64encode(zlib.compress(q.tobytes(), 9)).decode(),
                     "exact": hashlib.sha256(exact).hexdigest()[:16]}
    return out


def test_preprocessing_changes_need_a_cache_format_bump(tmp_path):
    now = _golden_now(tmp_path)
    blob = base64.b64encode(zlib.compress(json.dumps(now, sort_keys=True).encode(), 9)).decode()
    hint = (f"CACHE_FORMAT is {CACHE_FORMAT}. If preprocessing or the cache layout changed on purpose, bump "
            f"CACHE_FORMAT in sigvlp/data/preprocess.py and record this golden for it in tests/test_data_cache.py "
            f"GOLDEN_BLOBS:\n{blob}")
    assert CACHE_FORMAT in GOLDEN_BLOBS, "no golden output for this CACHE_FORMAT. " + hint
    want = json.loads(zlib.decompress(base64.b64decode(GOLDEN_BLOBS[CACHE_FORMAT])))
    for mode in want:
        w, n = want[mode], now[mode]
        for key in ("shape", "dtypes", "spacing", "exact"):
            assert n[key] == w[key], f"{mode}: {key} changed ({w[key]} -> {n[key]}). " + hint
        qw = np.frombuffer(zlib.decompress(base64.b64decode(w["image_q"])), np.int16).astype(np.int32)
        qn = np.frombuffer(zlib.decompress(base64.b64decode(n["image_q"])), np.int16).astype(np.int32)
        # One quantum (1e-3) of slack for rounding at a boundary across platforms; float16 storage
        # steps are about 5e-4, so any real change of the output moves many values by more.
        assert np.abs(qw - qn).max() <= 1, f"{mode}: preprocessed image changed. " + hint



# ----------------------------------------------------------------------------- memory
MEASURE = textwrap.dedent("""
    import json, resource, sys
    import numpy as np, torch
    torch.set_num_threads(1)
    from sigvlp.data.preprocess import PreprocessCache, preprocess_array, preset
    from sigvlp.data.volume import load_volume
    preprocess_array(np.zeros((4, 16, 16), np.int16), (1.0, 1.0, 1.0), preset("sigvlp"))  # warm-up
    def status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))
    try:  # reset this process's peak RSS (ru_maxrss would carry the parent's peak across exec)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        rss = lambda: status("VmHWM")
        base = status("VmRSS")
    except OSError:
        rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        base = rss()
    if sys.argv[1] == "volume":
        vol = load_volume(sys.argv[2])
        n = vol.hu.size * 2
        preprocess_array(vol.hu, vol.spacing, preset("sigvlp"))
    else:
        import nibabel as nib
        PreprocessCache(sys.argv[4], preset("sigvlp")).get(sys.argv[2], sys.argv[3])
        n = int(np.prod(nib.load(sys.argv[2]).shape)) * 2
    print(json.dumps({"extra": rss() - base, "int16_bytes": n}))
""")


def write_big_volume(out, z=400, n=512):
    """A 512 x 512 x z int16 chest-like volume (LPS file, scl_inter -1024) and its uint8 mask."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:n, :n]
    body = ((yy - n / 2) / (0.39 * n)) ** 2 + ((xx - n / 2) / (0.47 * n)) ** 2 <= 1
    lung = ((yy - n / 2) / (0.23 * n)) ** 2 + ((np.abs(xx - n / 2) - 0.2 * n) / (0.14 * n)) ** 2 <= 1
    plane = np.full((n, n), -1000, np.int16)
    plane[body], plane[lung] = 40, -850
    lab = np.where(lung, 10, np.where(body, 5, 0)).astype(np.uint8)
    vol = np.empty((n, n, z), np.int16, order="F")
    mask = np.empty((n, n, z), np.uint8, order="F")
    for k in range(z):
        vol[:, :, k] = (plane + rng.integers(-20, 21, size=(n, n), dtype=np.int16) + 1024).T[::-1, ::-1]
        mask[:, :, k] = lab.T[::-1, ::-1]
    aff = np.array([[-0.7, 0, 0, 180], [0, -0.7, 0, 180], [0, 0, 1.0, 0], [0, 0, 0, 1]])
    for arr, name in ((vol, "ct.nii.gz"), (mask, "mask.nii.gz")):
        img = nib.Nifti1Image(arr, aff)
        img.set_qform(aff, 1)
        img.set_sform(aff, 1)
        if arr.dtype == np.int16:
            img.header.set_data_dtype(np.int16)
            img.header.set_slope_inter(1.0, -1024.0)
        nib.save(img, str(out / name))
    return out / "ct.nii.gz", out / "mask.nii.gz"


def peak_extra(kind, ct, mask=None, cache_root=None) -> float:
    """Peak extra RSS of a fresh process (its peak, reset after imports and warm-up, minus its RSS
    then; ru_maxrss where /proc cannot reset it) over the int16 volume size."""
    args = [sys.executable, "-c", MEASURE, kind, str(ct), str(mask), str(cache_root)]
    res = json.loads(subprocess.run(args, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
    return res["extra"] / res["int16_bytes"]


@pytest.mark.slow
def test_peak_memory_of_load_and_preprocess_512x512x400(tmp_path):
    ct, mask = write_big_volume(tmp_path)
    ratio = peak_extra("volume", ct)
    print(f"load_volume + preprocess_array: peak extra {ratio:.2f}x the int16 volume")
    assert ratio <= 2.5, f"load + preprocess peak extra {ratio:.2f}x the int16 volume"
    ratio = peak_extra("cache", ct, mask, tmp_path / "cache")
    print(f"PreprocessCache.get (volume + mask): peak extra {ratio:.2f}x the int16 volume")
    assert ratio <= 2.5, f"cache build (volume + mask) peak extra {ratio:.2f}x the int16 volume"


# ----------------------------------------------------------------------------- per-volume failures
def test_build_cache_counts_memory_errors_and_any_failure(tmp_path_factory, tmp_path, monkeypatch):
    from sigvlp.data.ctrate import build_cache

    ds = CTRateDataset(tiny_dataset(tmp_path_factory), "train")
    real_get = PreprocessCache.get
    failures = {"train_2_a_1": MemoryError(), "train_4_a_1": RuntimeError("cuda? no: a bug")}

    def flaky(self, path, *args, **kw):
        for key, exc in failures.items():
            if key in str(path):
                raise exc
        return real_get(self, path, *args, **kw)

    monkeypatch.setattr(PreprocessCache, "get", flaky)
    entries, report = build_cache(ds, PreprocessCache(tmp_path / "c", preset("tiny")))
    assert len(entries) == 4 and len(report.skipped) == 2
    reasons = dict(report.skipped)
    mem = next(r for p, r in reasons.items() if "train_2_a_1" in p)
    bug = next(r for p, r in reasons.items() if "train_4_a_1" in p)
    assert "train_2_a_1" in mem and "MemoryError" in mem
    assert "train_4_a_1" in bug and "RuntimeError: cuda? no: a bug" in bug
    assert "4 of 6 volumes usable, 2 skipped" in report.summary()


def test_a_killed_worker_fails_only_its_own_volume():
    from _data_helpers import die_on_odd
    from sigvlp.data.ctrate import _run_pool

    jobs = [(i, f"{name}.nii.gz") for i, name in enumerate("abcd")]
    results = _run_pool(jobs, 2, fn=die_on_odd)
    for i, (ok, value) in enumerate(results):
        if i % 2:
            assert not ok and f"{jobs[i][1]}: the worker process died" in value
        else:
            assert (ok, value) == (True, jobs[i][1])


def test_preprocessing_shows_a_progress_bar_when_asked(tmp_path_factory, tmp_path, capsys):
    """progress=True (what train and eval pass from their progress option): a tqdm bar over the
    volumes on stderr, ending at the volume count; progress=False: nothing."""
    data = tiny_dataset(tmp_path_factory)
    CTRateDataset(data, "train").cached(PreprocessCache(tmp_path / "quiet", preset("tiny")))
    assert capsys.readouterr().err == ""
    entries = CTRateDataset(data, "train").cached(PreprocessCache(tmp_path / "shown", preset("tiny")), progress=True)
    err = capsys.readouterr().err
    assert "preprocess train" in err and f"{len(entries)}/{len(entries)}" in err and "vol" in err, err
