"""CSVs and findings banks as people save them (sigvlp.data.csvfiles): a UTF-8 BOM and CRLF line ends
are read; repeated rows for one VolumeName are dropped when identical and an error naming the file,
the volume and the column when they disagree, in the dataset's CSVs and in `sigvlp eval`'s labels;
text with no UTF-8 encoding is reported when the file is read, naming the file and the volume."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from sigvlp.data.chunks import load_findings_bank
from sigvlp.data.ctrate import read_csv_rows
from sigvlp.eval.suite import read_labels

A, B = "valid_1_a_1.nii.gz", "valid_2_a_1.nii.gz"


def _write(path: Path, lines, *, bom=False, eol="\n") -> Path:
    data = eol.join(lines) + eol
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + data.encode("utf-8"))
    return path


def test_bom_and_crlf_are_read(tmp_path):
    p = _write(tmp_path / "meta.csv", ["VolumeName,RescaleSlope,RescaleIntercept", f"{A},1,-1024", f"{B},1,-8192"],
               bom=True, eol="\r\n")
    rows = read_csv_rows(p)
    assert list(rows) == [A, B]
    assert rows[B] == {"VolumeName": B, "RescaleSlope": "1", "RescaleIntercept": "-8192"}  # no "\r", no BOM
    labels = _write(tmp_path / "labels.csv", ["VolumeName,Emphysema", f"{A},1", f"{B},0"], bom=True, eol="\r\n")
    y, names = read_labels(labels, ["Emphysema"], [B, A])
    assert names == ["Emphysema"] and y.tolist() == [[0], [1]]


def test_identical_repeats_dropped_with_a_count(tmp_path, caplog):
    p = _write(tmp_path / "meta.csv", ["VolumeName,RescaleSlope", f"{A},1", f"{B},2", f"{A},1", f"{A},1 "])
    with caplog.at_level(logging.WARNING, logger="sigvlp.data"):
        rows = read_csv_rows(p)
    assert list(rows) == [A, B] and rows[A]["RescaleSlope"] == "1"
    assert any("dropped 2 row(s)" in r.getMessage() and str(p) in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("reader", ["dataset", "eval"])
def test_disagreeing_repeats_are_an_error(tmp_path, reader):
    if reader == "dataset":
        p = _write(tmp_path / "meta.csv", ["VolumeName,RescaleSlope,RescaleIntercept", f"{A},1,-1024", f"{B},1,0",
                                           f"{A},1,-1000"])
        read = lambda: read_csv_rows(p)  # noqa: E731
        col = "RescaleIntercept"
    else:
        p = _write(tmp_path / "labels.csv", ["VolumeName,Emphysema,Cardiomegaly", f"{A},1,0", f"{A},1,1"])
        read = lambda: read_labels(p, ["Emphysema"], [A])  # noqa: E731
        col = "Cardiomegaly"  # a column not scored still makes the rows disagree
    with pytest.raises(ValueError) as e:
        read()
    msg = str(e.value)
    assert str(p) in msg and A in msg and repr(col) in msg
    assert ("line 2" in msg and "line 4" in msg) if reader == "dataset" else ("line 2" in msg and "line 3" in msg)


def test_invalid_utf8_in_a_csv_names_file_and_volume(tmp_path):
    p = tmp_path / "reports.csv"
    p.write_bytes(b"VolumeName,Findings_EN\n" + A.encode() + b",clear lungs\n" + B.encode()
                  + b",nodule of 4 mm \xff\xfe in the left lobe\n")
    with pytest.raises(ValueError) as e:
        read_csv_rows(p)
    msg = str(e.value)
    assert str(p) in msg and B in msg and "Findings_EN" in msg and "line 3" in msg


@pytest.mark.parametrize("fmt", ["jsonl", "json"])
def test_lone_surrogate_in_the_bank_names_file_and_volume(tmp_path, fmt):
    good = {"VolumeName": A, "organs": {"lung": ["Clear."]}, "general": ""}
    bad = {"VolumeName": B, "organs": {"heart": ["Normal size \ud800."]}, "general": ""}
    p = tmp_path / f"valid_findings.{fmt}"
    text = "\n".join(json.dumps(x) for x in (good, bad)) if fmt == "jsonl" else json.dumps([good, bad])
    p.write_text(text, encoding="ascii")  # json.dumps escapes the lone surrogate as \ud800: valid JSON
    with pytest.raises(ValueError) as e:
        load_findings_bank(p)
    msg = str(e.value)
    assert str(p) in msg and B in msg and "heart" in msg


def test_invalid_utf8_bytes_in_the_bank_name_the_volume(tmp_path):
    p = tmp_path / "valid_findings.jsonl"
    line = json.dumps({"VolumeName": B, "organs": {}, "general": "Xyz"}).encode().replace(b"Xyz", b"X\xc3yz")
    p.write_bytes(json.dumps({"VolumeName": A, "organs": {}, "general": ""}).encode() + b"\n" + line + b"\n")
    with pytest.raises(ValueError) as e:
        load_findings_bank(p)
    msg = str(e.value)
    assert f"{p}:2" in msg and B in msg and "general" in msg


def test_dataset_reports_bad_text_when_opened(tmp_path_factory, tmp_path):
    """The dataset refuses a reports CSV with undecodable text when it is opened, not in a worker."""
    from _data_helpers import copy_dataset, tiny_dataset

    from sigvlp.data import CTRateDataset

    root = copy_dataset(tiny_dataset(tmp_path_factory), tmp_path / "d")
    csv_path = next(root.rglob("validation_reports.csv"))
    raw = csv_path.read_bytes().splitlines(keepends=True)
    name = raw[2].split(b",", 1)[0].decode()
    head, rest = raw[2].split(b",", 1)
    raw[2] = head + b"," + rest.replace(b" ", b" \xe9", 1)  # a Latin-1 byte inside the report text
    csv_path.write_bytes(b"".join(raw))
    with pytest.raises(ValueError) as e:
        CTRateDataset(root, "valid")
    assert str(csv_path) in str(e.value) and name in str(e.value)
