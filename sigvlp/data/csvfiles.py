"""Reading the CSVs people save (CT-RATE's reports, labels and metadata; eval label files).

- Encoding: UTF-8, with or without the byte-order mark Excel writes (``utf-8-sig``); CRLF, LF or
  CR line ends (the csv module with ``newline=""``).
- Text that cannot be encoded as UTF-8 (invalid bytes in the file, read as lone surrogates with
  ``surrogateescape``; or a lone surrogate from a JSON escape such as ``"\\ud800"``) is an error
  when the file is read, naming the file, the line and the volume (``check_text``), never later in
  a tokenizer inside a loader worker.
- Several rows for one key (VolumeName): rows identical in every column are dropped and counted in
  the log ("sigvlp.data"); rows that disagree are a ValueError naming the file, the volume, the
  column and both lines.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Optional

__all__ = ["read_csv_table", "read_csv_rows", "check_text"]

log = logging.getLogger("sigvlp.data")


def check_text(value, where: str) -> None:
    """ValueError naming ``where`` when ``value`` (a str, or a list / dict of them, nested) holds
    text that has no UTF-8 encoding (a lone surrogate: invalid bytes in the source file, or a
    JSON ``\\udXXX`` escape)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            bad = value[e.start:e.end]
            shown = value[max(0, e.start - 20):e.end + 20].encode("utf-8", "backslashreplace").decode("ascii", "replace")
            raise ValueError(f"{where}: text is not valid Unicode (lone surrogate {bad!r} at character {e.start}: "
                             f"invalid UTF-8 bytes in the file, or an unpaired \\ud800-\\udfff escape) near "
                             f"{shown!r}") from None
    elif isinstance(value, dict):
        for k, v in value.items():
            check_text(k, where)
            check_text(v, f"{where} [{k}]" if isinstance(k, str) else where)
    elif isinstance(value, (list, tuple)):
        for v in value:
            check_text(v, where)


def _disagreement(path, key_value, first: tuple[int, dict], second: tuple[int, dict]) -> Optional[str]:
    (l1, a), (l2, b) = first, second
    for col in dict.fromkeys([*a, *b]):
        if (a.get(col) or "").strip() != (b.get(col) or "").strip():
            return (f"{path}: two rows for {key_value} disagree in column {col!r} (line {l1}: {a.get(col)!r}, "
                    f"line {l2}: {b.get(col)!r}); remove one")
    return None


def read_csv_table(path, key: str = "VolumeName") -> tuple[list[str], dict[str, dict]]:
    """(columns, {row[key]: row}) of a CSV file, rows as {column: str}. Errors: FileNotFoundError;
    ValueError naming the file for no ``key`` column, text that is not UTF-8 (with the line and
    the row's key) and two rows for one key that disagree (with the column); identical repeated
    rows are dropped (count logged)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such CSV file")
    with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        reader = csv.DictReader(f)
        columns = [c for c in (reader.fieldnames or [])]
        check_text(columns, f"{path}: header")
        if key not in columns:
            raise ValueError(f"{path}: no {key!r} column (columns: {columns})")
        rows: dict[str, dict] = {}
        lines: dict[str, int] = {}
        dropped = 0
        for row in reader:
            line = reader.line_num
            name = row.get(key)
            check_text(row, f"{path}: line {line} ({key} {name!r})")
            if name in rows:
                err = _disagreement(path, name, (lines[name], rows[name]), (line, row))
                if err:
                    raise ValueError(err)
                dropped += 1
                continue
            rows[name], lines[name] = row, line
    if dropped:
        log.warning("%s: dropped %d row(s) repeating an earlier row for the same %s exactly", path, dropped, key)
    return columns, rows


def read_csv_rows(path, key: str = "VolumeName") -> dict[str, dict]:
    """{row[key]: row} of a CSV file; see ``read_csv_table`` (rules in the module docstring)."""
    return read_csv_table(path, key)[1]
