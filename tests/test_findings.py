"""Organ-wise findings banks: the rule splitter against a labelled sentence set, the region
table, the fVLM and RadGenome readers on files in their public formats, `sigvlp findings`, and
chunks paired with the bank's organ text at the loader level."""

import csv
import json
import shutil
from pathlib import Path

import pytest

from _data_helpers import tiny_dataset
from sigvlp.cli import main as cli_main
from sigvlp.data.chunks import chunk_preset, chunk_text, load_findings_bank, organs_in_chunk
from sigvlp.data.ctrate import CTRateDataset
from sigvlp.data.findings import (REGION_ORGANS, SourceStats, fvlm_entries, map_region, radgenome_entries,
                                  scan_key, segment, sentence_organs, split_report, split_sentence, write_bank)
from sigvlp.data.loader import LoaderConfig, make_loader
from sigvlp.data.organs import ORGANS
from sigvlp.data.preprocess import PreprocessCache, preset

LABELLED = Path(__file__).parent / "data" / "findings_sentences.jsonl"
RADGENOME_REGIONS = ("abdomen", "bone", "breast", "esophagus", "heart", "lung", "mediastinum", "pleura", "thyroid",
                     "trachea and bronchie")
FVLM_ORGANS = ("face", "brain", "esophagus", "trachea", "lung", "heart", "kidney", "stomach", "liver", "gallbladder",
               "pancreas", "spleen", "colon", "aorta", "rib", "humerus", "scapula", "clavicula", "femur", "hip",
               "sacrum", "gluteus", "iliopsoas", "autochthon", "spine", "adrenal", "thyroid", "vena_cava", "bone")


# ----------------------------------------------------------------------------- rule splitter
def _labelled(split):
    rows = [json.loads(line) for line in LABELLED.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["split"] == split]


def test_labelled_set_is_large_and_covers_the_hard_cases():
    rows = _labelled("tune") + _labelled("test")
    assert len(rows) >= 80
    for r in rows:
        assert set(r["organs"]) <= set(ORGANS) and r["organs"] == [o for o in ORGANS if o in r["organs"]]
    for tag in ("derived", "two-organ", "negation", "no-organ", "region-map"):
        assert sum(tag in r["cases"] for r in _labelled("test")) >= 4, tag


@pytest.mark.parametrize("split", ["tune", "test"])
def test_rule_splitter_sentence_accuracy(split):
    rows = _labelled(split)
    wrong = [(r["text"], r["organs"], sentence_organs(r["text"])) for r in rows
             if sentence_organs(r["text"]) != r["organs"]]
    accuracy = 1 - len(wrong) / len(rows)
    print(f"{split}: {len(rows) - len(wrong)}/{len(rows)} sentences right ({accuracy:.3f})")
    assert accuracy >= 0.9, wrong


def test_segmentation_survives_ct_rate_style():
    text = ("Trachea and both main bronchi are open. A nodule of 4.5 mm, e.g. in the right upper lobe, is seen approx. "
            "3 cm from the pleura. Compared with the examination dated 12.03.2020, no change. 1. Pleural effusion. "
            "2. Cardiomegaly! Is there ascites? No")
    assert segment(text) == [
        "Trachea and both main bronchi are open.",
        "A nodule of 4.5 mm, e.g. in the right upper lobe, is seen approx. 3 cm from the pleura.",
        "Compared with the examination dated 12.03.2020, no change.",
        "Pleural effusion.", "Cardiomegaly!", "Is there ascites?", "No"]
    assert segment("") == [] and segment("  .  ") == []


def test_semicolons_cut_only_between_organs():
    assert split_sentence("Heart size is normal; no pericardial effusion.") == [
        ("Heart size is normal; no pericardial effusion.", ["heart"])]
    assert split_sentence("Nodules in both lungs; the largest is 5 mm.") == [
        ("Nodules in both lungs; the largest is 5 mm.", ["lung"])]
    assert split_sentence("When examined in the lung parenchyma window; trachea is open; the heart is enlarged.") == [
        ("When examined in the lung parenchyma window; trachea is open", ["trachea"]),
        ("the heart is enlarged.", ["heart"])]
    assert split_sentence("Comparison was made; no change.") == [("Comparison was made; no change.", [])]


def test_split_report_files_negations_and_general():
    entry = split_report("No pleural effusion was detected. Hepatosteatosis is observed. Comparison was not possible. "
                         "No pleural or pericardial effusion.", "Fatty liver.")
    assert entry["organs"] == {"lung": ["No pleural effusion was detected.", "No pleural or pericardial effusion."],
                               "heart": ["No pleural or pericardial effusion."],
                               "liver": ["Hepatosteatosis is observed."]}
    assert entry["general"] == "Comparison was not possible. Fatty liver."
    assert list(entry["organs"]) == [o for o in ORGANS if o in entry["organs"]]
    # a sentence filed under two of a chunk's organs is paired with the chunk once
    assert chunk_text(entry, ["lung", "heart"], False) == ("No pleural effusion was detected. "
                                                           "No pleural or pericardial effusion.")


def test_rule_splitter_reproduces_the_phantom_banks(tmp_path_factory):
    """The phantoms' reports are the join of their own organ banks: splitting them back must give
    every organ the same text."""
    root = tiny_dataset(tmp_path_factory)
    bank = load_findings_bank(root / "findings" / "train_findings.jsonl")
    ds = CTRateDataset(root, "train", masks_dir=None, findings=None, check_headers=False)
    for rec in ds:
        ours = split_report(rec.report["Findings_EN"], rec.report["Impressions_EN"])
        for organ in ORGANS:
            assert chunk_text(ours, [organ], False) == chunk_text(bank[rec.name], [organ], False), (rec.name, organ)
        assert ours["general"] == bank[rec.name]["general"]


# ----------------------------------------------------------------------------- region table
def test_region_table_maps_every_public_name_onto_our_organs():
    for organs in REGION_ORGANS.values():
        assert set(organs) <= set(ORGANS)
    for name in RADGENOME_REGIONS + FVLM_ORGANS:
        assert map_region(name) is not None
    assert map_region("pleura") == ["lung"] and map_region("breast") == []
    assert map_region("bone") == ["spine", "ribs", "sternum"]
    assert map_region("trachea and bronchie") == ["trachea"] and map_region("vena_cava") == ["heart"]
    assert map_region("mediastinum") == ["heart", "aorta", "trachea", "esophagus"]
    stats = SourceStats()
    assert map_region("Left-Lung upper lobe", stats) == ["lung"] and map_region("colon") == []
    assert map_region("navel", stats) == [] and stats.unknown == {"navel": 1}


# ----------------------------------------------------------------------------- readers
def _write_fvlm(tmp_path):
    desc = {"train_1_a": {"lung": "Nodule of 4.5 mm in the right upper lobe. No pleural effusion.",
                          "heart": "Heart contour and size are normal.", "pleura": "Pleural thickening.",
                          "breast": "Breast tissue is normal.", "navel": "Unmapped text."},
            "train_2_a": {"rib": ["Old fracture of the left 6th rib."], "adrenal": "Adrenal glands are normal."}}
    conc = {"train_1_a": {"lung": "Lung nodule."}}
    (tmp_path / "desc_info.json").write_text(json.dumps(desc))
    (tmp_path / "conc_info.json").write_text(json.dumps(conc))
    return tmp_path / "desc_info.json", tmp_path / "conc_info.json"


def test_fvlm_reader_keys_by_scan_and_maps_through_the_table(tmp_path):
    desc, conc = _write_fvlm(tmp_path)
    assert scan_key("train_1_a_2.nii.gz") == "train_1_a" and scan_key("valid_10_b_1.nii") == "valid_10_b"
    names = ["train_1_a_1.nii.gz", "train_1_a_2.nii.gz", "train_2_a_1.nii.gz", "train_3_a_1.nii.gz"]
    entries, stats = fvlm_entries(names, desc, conc)
    assert entries["train_1_a_1.nii.gz"] == entries["train_1_a_2.nii.gz"]
    one = entries["train_1_a_1.nii.gz"]
    assert one["organs"]["lung"] == ["Nodule of 4.5 mm in the right upper lobe.", "No pleural effusion.",
                                     "Pleural thickening.", "Lung nodule."]
    assert one["organs"]["heart"] == ["Heart contour and size are normal."]
    assert one["general"] == "Breast tissue is normal. Unmapped text."
    assert entries["train_2_a_1.nii.gz"]["organs"] == {"kidney": ["Adrenal glands are normal."],
                                                       "ribs": ["Old fracture of the left 6th rib."]}
    assert stats.missing == ["train_3_a_1.nii.gz"] and stats.unknown == {"navel": 2} and stats.entries == 3
    # without conc_info, general takes the given impressions
    entries, _ = fvlm_entries(["train_1_a_1.nii.gz"], desc, impressions={"train_1_a_1.nii.gz": "Nodule. Stable."})
    assert entries["train_1_a_1.nii.gz"]["general"] == "Breast tissue is normal. Unmapped text. Nodule. Stable."
    (tmp_path / "bad.json").write_text(json.dumps({"train_1_a": "not a mapping"}))
    with pytest.raises(ValueError, match="fVLM"):
        fvlm_entries(names, tmp_path / "bad.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="invalid JSON"):
        fvlm_entries(names, tmp_path / "broken.json")
    with pytest.raises(FileNotFoundError):
        fvlm_entries(names, tmp_path / "absent.json")


def _write_radgenome(path, rows, columns=("Volumename", "Anatomy", "Sentence")):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        w.writerows(rows)
    return path


def test_radgenome_reader(tmp_path):
    csv_path = _write_radgenome(tmp_path / "train_region_report.csv", [
        ("train_1_a_1.nii.gz", "", "Whole report. Heart is normal. Lungs are clear."),
        ("train_1_a_1.nii.gz", "lung", "Lungs are clear. No nodule."),
        ("train_1_a_1.nii.gz", "pleura", "No pleural effusion."),
        ("train_1_a_1.nii.gz", "bone", "Bone structures are natural."),
        ("train_1_a_1.nii.gz", "breast", "Breasts are normal."),
        ("train_1_a_1.nii.gz", "trachea and bronchie", "Trachea and both main bronchi are open."),
        ("train_1_a_1.nii.gz", "lung/left lung", "No nodule."),
        ("train_2_a_1", "", "Heart contour is normal. No pleural effusion."),  # name without .nii.gz, whole only
    ])
    names = ["train_1_a_1.nii.gz", "train_2_a_1.nii.gz", "train_3_a_1.nii.gz"]
    entries, stats = radgenome_entries(names, csv_path, {"train_1_a_1.nii.gz": "Normal chest CT."})
    one = entries["train_1_a_1.nii.gz"]
    assert one["organs"] == {"lung": ["Lungs are clear.", "No nodule.", "No pleural effusion."],
                             "trachea": ["Trachea and both main bronchi are open."],
                             "spine": ["Bone structures are natural."], "ribs": ["Bone structures are natural."],
                             "sternum": ["Bone structures are natural."]}
    assert one["general"] == "Breasts are normal. Normal chest CT."
    assert entries["train_2_a_1.nii.gz"]["organs"] == {"lung": ["No pleural effusion."],
                                                       "heart": ["Heart contour is normal."]}
    assert stats.missing == ["train_3_a_1.nii.gz"] and stats.entries == 2
    bad = _write_radgenome(tmp_path / "bad.csv", [("a", "b")], columns=("VolumeName", "Region"))
    with pytest.raises(ValueError, match="Volumename, Anatomy, Sentence"):
        radgenome_entries(names, bad)


def test_write_bank_is_atomic_and_refuses_to_overwrite(tmp_path):
    bank = tmp_path / "f" / "train_findings.jsonl"
    write_bank({"train_1_a_1.nii.gz": split_report("Cardiomegaly.")}, bank)
    assert load_findings_bank(bank)["train_1_a_1.nii.gz"]["organs"] == {"heart": ["Cardiomegaly."]}
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_bank({}, bank)
    write_bank({}, bank, overwrite=True)
    assert bank.read_text() == "" and [p.name for p in bank.parent.iterdir()] == ["train_findings.jsonl"]


# ----------------------------------------------------------------------------- the command
@pytest.fixture()
def data(tmp_path_factory, tmp_path):
    """A phantom dataset with no findings bank (the one synth writes is moved aside)."""
    root = shutil.copytree(tiny_dataset(tmp_path_factory), tmp_path / "data")
    shutil.move(root / "findings", tmp_path / "synth_findings")
    return root


def test_cli_builds_the_default_bank_and_refuses_to_overwrite(data, capsys):
    assert cli_main(["findings", str(data)]) == 0
    bank = data / "findings" / "train_findings.jsonl"
    ds = CTRateDataset(data, "train")  # picks the bank up
    assert ds.findings_bank is not None and set(ds.findings_bank) == {r.name for r in ds}
    assert "wrote" in capsys.readouterr().out
    before = bank.read_bytes()
    assert cli_main(["findings", str(data)]) == 2
    assert "--overwrite" in capsys.readouterr().err and bank.read_bytes() == before
    assert cli_main(["findings", str(data), "--overwrite", "--split", "valid"]) == 0
    assert (data / "findings" / "valid_findings.jsonl").is_file()


def test_cli_builds_from_fvlm_and_radgenome(data, tmp_path, capsys):
    desc, conc = _write_fvlm(tmp_path)
    out = tmp_path / "fvlm_bank.jsonl"
    assert cli_main(["findings", str(data), "--fvlm", str(desc), "--fvlm-impressions", str(conc),
                     "--out", str(out)]) == 0
    bank = load_findings_bank(out)
    ds = CTRateDataset(data, "train", findings=None)
    assert set(bank) == {r.name for r in ds}  # volumes fVLM lacks are split from their reports
    assert bank["train_1_a_1.nii.gz"]["organs"]["heart"] == ["Heart contour and size are normal."]
    text = capsys.readouterr().out
    assert "fVLM" in text and "by the rules" in text and "navel" in text
    rg = _write_radgenome(tmp_path / "train_region_report.csv",
                          [("train_1_a_1", "heart", "Cardiomegaly."), ("train_1_a_1", "breast", "Normal breasts.")])
    out = tmp_path / "rg_bank.jsonl"
    assert cli_main(["findings", str(data), "--radgenome", str(rg), "--out", str(out)]) == 0
    entry = load_findings_bank(out)["train_1_a_1.nii.gz"]
    assert entry["organs"] == {"heart": ["Cardiomegaly."]}
    assert entry["general"].startswith("Normal breasts.")


@pytest.mark.parametrize("argv, message", [
    (["--fvlm-impressions", "x.json"], "--fvlm-impressions: only with --fvlm"),
    (["--llm-url", "http://127.0.0.1:9"], "--llm-model: required"),
    (["--llm-model", "m"], "--llm-model: only with --llm-url"),
    (["--llm-url", "http://127.0.0.1:9", "--llm-model", "m", "--llm-key-env", "SIGVLP_TEST_NO_SUCH_VAR"],
     "SIGVLP_TEST_NO_SUCH_VAR is not set"),
    (["--llm-url", "ftp://x", "--llm-model", "m"], "http:// or https://"),
    (["--fvlm", "absent.json"], "--fvlm: no such file"),
    (["--out", "bank.txt"], "expected a .jsonl"),
])
def test_cli_bad_values_are_one_line_errors(data, argv, message, capsys):
    assert cli_main(["findings", str(data)] + argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (data / "findings").exists()


@pytest.mark.parametrize("argv", [["--split", "test"], ["--layout", "v3"], ["--llm-concurrency", "0"],
                                  ["--llm-rate", "-1"], ["--fvlm", "a", "--radgenome", "b"]])
def test_cli_bad_flags_exit_2(data, argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["findings", str(data)] + argv)
    assert e.value.code == 2


def test_cli_without_volumes_is_an_error(tmp_path, capsys):
    assert cli_main(["findings", str(tmp_path)]) == 2
    assert "DATA" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the pairing
def test_chunks_get_their_organs_bank_text(data, tmp_path):
    """With a bank built by `sigvlp findings`, every chunk's text is exactly the bank sentences of
    the organs organs_in_chunk finds for it (ORGANS order, each sentence once), then the general text."""
    assert cli_main(["findings", str(data)]) == 0
    bank = load_findings_bank(data / "findings" / "train_findings.jsonl")
    ds = CTRateDataset(data, "train")
    assert all(rec.findings == bank[rec.name] for rec in ds)
    chunk = chunk_preset("tiny")
    cache = PreprocessCache(tmp_path / "cache", preset("tiny"))
    loader = make_loader(ds, chunk, LoaderConfig(token_budget=256, chunks_per_volume=3, num_workers=0), cache=cache)
    profiles = {s.name: s.organ_profile for s in loader.dataset.sources}
    seen = 0
    for batch in loader:
        for name, organs, (z0, z1), text in zip(batch["names"], batch["organs"], batch["z_ranges"], batch["texts"]):
            assert organs == organs_in_chunk(profiles[name], z0, z1, chunk)
            entry = bank[name]
            sentences = []
            for organ in organs:
                sentences += [s for s in entry["organs"].get(organ, []) if s not in sentences]
            assert text == " ".join(sentences + ([entry["general"]] if entry["general"] else []))
            seen += 1
    assert seen == 3 * len(ds)


# ----------------------------------------------------------------------------- sigvlp train
@pytest.mark.parametrize("with_bank", [False, True])
def test_train_says_once_when_there_is_no_bank(data, tmp_path, capsys, with_bank):
    from _train_helpers import TEST_MODEL
    from sigvlp.train import TrainConfig
    from sigvlp.train.trainer import Trainer

    if with_bank:
        assert cli_main(["findings", str(data)]) == 0
    capsys.readouterr()
    cfg = TrainConfig(data=str(data), out=str(tmp_path / "run"), cache=str(tmp_path / "cache"), model="tiny",
                      model_overrides=TEST_MODEL, token_budget=512, num_workers=0, steps=1, prompt_weight=0.0,
                      progress=False, tensorboard=False)
    trainer = Trainer(cfg)
    assert all(bool(s.findings) for s in trainer.data.loader.dataset.sources)
    console = capsys.readouterr().out
    log = (tmp_path / "run" / "log.txt").read_text()
    hint = f"sigvlp findings {data} --split train"
    for text in (console, log):
        assert text.count("no findings bank") == (0 if with_bank else 1), text
        assert text.count(hint) == (0 if with_bank else 1)
