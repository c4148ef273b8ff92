"""Organ-wise findings banks: a rule splitter for CT-RATE reports, and readers for the two public
organ-/region-wise splits of CT-RATE's reports (fVLM, RadGenome-ChestCT).

The bank format is the one sigvlp.data.chunks documents: one entry per VolumeName,
``{"VolumeName", "organs": {organ: [sentences]}, "general": str}``, organ names from
sigvlp.data.organs.ORGANS. ``sigvlp findings`` (sigvlp.data.findings_cli) writes banks with
this module; sigvlp.data.findings_llm adds an optional LLM backend.

One table, ``REGION_ORGANS``, maps every anatomical name a source uses (fVLM organs, RadGenome
regions, and the lexicon's own region names) onto our organ groups. A region with no mask of its
own takes the groups whose z-extent covers it (pleura, hilum -> lung; mediastinum -> heart,
aorta, trachea, esophagus; upper abdomen -> the six abdominal groups; adrenal -> kidney;
thyroid -> trachea, esophagus; bone -> spine, ribs, sternum); an empty tuple means "general"
(breast, axilla, soft tissue, and organs outside a chest CT such as brain or femur). A name not
in the table is read with the lexicon ("left lung upper lobe" -> lung), else it goes to general
and is counted (``SourceStats.unknown``).

Source formats (as confirmed: fVLM's README and the dataset loaders of public fVLM forks; the
RadGenome-ChestCT file listing on the Hub and the region-report loader of Reg2RG, a model trained
on it; the dataset card's own text was not retrievable here. Test files are written in exactly
these formats):

- fVLM (Shui et al., ICLR 2025, "Large-scale and fine-grained vision-language pre-training for
  enhanced CT image understanding"): ``desc_info.json`` (findings) and ``conc_info.json``
  (impressions), both ``{"<split>_<pid>_<scan>": {"<organ>": "<text>", ...}}``. The key is the
  scan folder (their loader takes the folder name of the volume, ``VolumeName.rsplit("_", 1)[0]``),
  so every reconstruction of a scan gets the scan's entry: ``train_1_a_2.nii.gz`` -> ``train_1_a``.
  Their loader uses the organs lung, heart, esophagus, aorta, trachea, kidney, stomach, liver,
  gallbladder, pancreas, spleen, colon, rib, humerus, scapula, clavicula, femur, hip, sacrum,
  gluteus, iliopsoas, autochthon, face, brain; re-decompositions add spine, adrenal, thyroid,
  vena_cava, bone: all are in the table.
- RadGenome-ChestCT (Zhang et al. 2024, dataset ``RadGenome/RadGenome-ChestCT`` on the Hugging
  Face Hub, ``dataset/radgenome_files/{train,validation}_region_report.csv``): columns
  ``Volumename, Anatomy, Sentence``, one row per (volume, region), ``Sentence`` holding the
  region's text; an empty ``Anatomy`` is the whole report. Regions: abdomen, bone, breast,
  esophagus, heart, lung, mediastinum, pleura, thyroid, "trachea and bronchie". A hierarchical
  ``Anatomy`` ("lung/left lung") is read by its first component. ``Volumename`` is matched with
  or without ".nii.gz". The whole-report row is used (through the rule splitter) only for a
  volume that has no region row.

The rule splitter (``split_report``): sentences are cut at ". ", "! ", "? " (not after the
abbreviations in ``ABBREVIATIONS``, not inside numbers such as "4.5 mm" or "12.03.2020"; list
markers "1." are dropped), then at "; " into clauses about different organs. Each clause gets every organ whose lexicon
terms it contains (``LEXICON``: ordered regular expressions; a match masks its span, so
"mediastinal main vascular structures" -> aorta is not read again as "mediastinal", and "main
bronchi" -> trachea is not read as "bronchi" -> lung). Weak terms (``WEAK_LEXICON``: nodule,
effusion, parenchyma, lymph node, fracture, ...) count only when no other term matched in the sentence, so
"a nodule in the right breast" stays general. A clause with no organ joins the clause before it
(or the one after, for a leading clause such as "When examined in the lung parenchyma window;").
Negated statements keep their organ ("No pleural effusion was detected." -> lung). Sentences
with no organ go to "general", followed by the impression.

Sentence accuracy of the lexicon on the held-out half of tests/data/findings_sentences.jsonl is
asserted by tests/test_findings.py and reported in docs/data.md.
"""

from __future__ import annotations

import csv
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

from sigvlp.data.organs import ORGANS

_ABDOMEN = ("liver", "spleen", "kidney", "stomach", "pancreas", "gallbladder")
_BONE = ("spine", "ribs", "sternum")
_MEDIASTINUM = ("heart", "aorta", "trachea", "esophagus")

#: source organ / region name (lower case, "_" and "-" read as spaces) -> our organ groups;
#: () = "general". The one table every reader and the lexicon map through.
REGION_ORGANS: dict[str, tuple[str, ...]] = {
    **{organ: (organ,) for organ in ORGANS},
    "lungs": ("lung",), "pleura": ("lung",), "hilum": ("lung",), "hemithorax": ("lung",),
    "bronchi": ("lung",), "bronchus": ("lung",),
    "main bronchi": ("trachea",), "trachea and bronchie": ("trachea",), "trachea and bronchi": ("trachea",),
    "kidneys": ("kidney",), "adrenal": ("kidney",), "adrenal gland": ("kidney",), "adrenal glands": ("kidney",),
    "rib": ("ribs",), "costovertebral": ("spine", "ribs"),
    "vertebra": ("spine",), "vertebrae": ("spine",), "sacrum": ("spine",), "autochthon": ("spine",),
    "iliopsoas": ("spine",),
    "scapula": ("ribs",), "humerus": ("ribs",), "clavicula": ("ribs", "sternum"), "clavicle": ("ribs", "sternum"),
    "bone": _BONE, "bones": _BONE, "skeleton": _BONE,
    "gall bladder": ("gallbladder",), "oesophagus": ("esophagus",),
    "gastroesophageal junction": ("stomach", "esophagus"),
    "heart valve": ("heart",), "pulmonary artery": ("heart",), "vena cava": ("heart",),
    "mediastinum": _MEDIASTINUM, "abdomen": _ABDOMEN, "upper abdomen": _ABDOMEN,
    "thyroid": ("trachea", "esophagus"),
    # no group's z-extent fits: general
    "breast": (), "axilla": (), "soft tissue": (), "chest wall": (), "face": (), "brain": (), "colon": (),
    "femur": (), "hip": (), "gluteus": (), "general": (), "whole": (), "other": (), "others": (),
}

# (pattern, table key); None masks the span and assigns nothing (reading-window preambles).
# Order matters: earlier, more specific patterns mask their span for the later ones.
LEXICON: tuple[tuple[str, Optional[str]], ...] = (
    (r"when (?:examined|evaluated) (?:in|with) the [a-z ]*?window", None),
    (r"as far as (?:it )?can be (?:observed|seen|evaluated)", None),
    (r"within the limits of (?:a |the )?non-?contrast (?:ct|examination|study)", None),
    (r"gastro-?o?esophageal", "gastroesophageal junction"),
    (r"costovertebral", "costovertebral"),
    (r"(?:aortic|mitral|tricuspid|pulmonary|heart|cardiac) valves?", "heart valve"),
    (r"pulmonary (?:artery|arteries|trunk)", "pulmonary artery"),
    (r"vena cava", "vena cava"),
    (r"(?:mediastinal )?(?:main |major |great )?(?:mediastinal )?vascular structures?|"
     r"(?:(?:mediastinal|main|major|great) )+vessels", "aorta"),
    (r"aort\w*", "aorta"),
    (r"(?:both )?main bronch\w*", "main bronchi"),
    (r"prevascular|pre-?paratracheal|paratracheal|pretracheal|subcarinal|mediastin\w*", "mediastinum"),
    (r"carina\b|\w*trache\w*", "trachea"),
    (r"(?:(?:right|left) )?lobes? of the thyroid(?: gland)?|thyroid\w*", "thyroid"),
    (r"(?:right|left|caudate|quadrate) lobe of the liver|liver|\w*hepat\w*|steatosis|cirrho\w*|bile ducts?|biliary",
     "liver"),
    (r"gall ?bladder|cholecyst\w*|cholelith\w*|gall ?stones?", "gallbladder"),
    (r"splen\w* hil\w*|splen\w*|spleen\w*", "spleen"),
    (r"adrenal\w*", "adrenal"),
    (r"renal hil\w*|kidneys?|(?:peri)?renal|\w*nephr\w*|\w*caly(?:x|ces|ceal)", "kidney"),
    (r"pancrea\w*", "pancreas"),
    (r"stomach|gastr\w*", "stomach"),
    (r"o?esophag\w*|hiat(?:al|us) hernia|achalasia", "esophagus"),
    (r"\w*cardi(?:al|ac|um|omegaly|omyopathy|othoracic|tis)\w*|heart|ventric\w*|atri(?:um|al|a)|coronary|"
     r"pacemaker|\bcto\b", "heart"),
    (r"stern\w*|manubri\w*|xiphoid", "sternum"),
    (r"costochondral|ribs?|costal", "ribs"),
    (r"\w*vertebr\w*|spin(?:e|al)|\w*scolio\w*|kypho\w*|lordo\w*|spondyl\w*|dis[ck]s?|neural foramin\w*|"
     r"thoracolumbar|dorsolumbar|lumbar|[tl]\d{1,2}", "spine"),
    (r"bon(?:e|y) structures?|bones?|osseous|skelet\w*|osteop(?:enia|enic|orosis|orotic)", "bone"),
    (r"(?:upper )?abdom\w*", "abdomen"),
    (r"breasts?|\w*mast(?:ia|ectomy)", "breast"),
    (r"axill\w*|supraclavicular", "axilla"),
    (r"chest wall|soft tissues?|subcutaneous", "soft tissue"),
    (r"lungs?|pulmon\w*|pleur\w*|\w*pneumo\w*|\w*lob(?:e|es|ar|ectomy|ular)|lingul\w*|hil(?:um|a|ar|us)|"
     r"hemithora\w*|emphysem\w*|atelecta\w*|consolidat\w*|ground[- ]glass|opacit\w*|\w*bronch\w*|septal|"
     r"mosaic attenuation|bullae?|bullous|blebs?|fissur\w*|crazy[- ]paving|tree[- ]in[- ]bud|air trapping|"
     r"honeycomb\w*|covid\w*|aeration|ventilation", "lung"),
)
#: terms that count only when no LEXICON term matched the clause.
WEAK_LEXICON: tuple[tuple[str, str], ...] = (
    (r"nodul\w*|effusions?|parenchym\w*|infiltrat\w*|granulom\w*|fibro(?:tic|sis)|sequel\w*|apices|apical",
     "lung"),
    (r"lymph nodes?|lymphadenopath\w*", "mediastinum"),
    (r"hemangiom\w*", "liver"),
    (r"osteophyt\w*", "spine"),
    (r"lytic|destructive|fractur\w*", "bone"),
)
#: words (lower case, without their final ".") after which a "." does not end a sentence.
ABBREVIATIONS = frozenset({"e.g", "i.e", "eg", "ie", "approx", "vs", "dr", "fig", "cf", "ca", "resp", "diam", "ant",
                           "post", "lat", "sup", "inf", "seg"})


def _compile(table):
    return tuple((re.compile(rf"\b(?:{pat})\b", re.IGNORECASE), key) for pat, key in table)


_LEXICON_RE = _compile(LEXICON)
_WEAK_RE = _compile(WEAK_LEXICON)
_BOUNDARY_RE = re.compile(r"[.!?]+(?=\s|$)")
_LIST_MARKER_RE = re.compile(r"^\(?\d{1,2}[.)]\s*|^[-*\u2022]\s+")


def region_key(name: str) -> str:
    """A source organ/region name as REGION_ORGANS spells it: lower case, "_"/"-" -> space."""
    return " ".join(re.split(r"[\s_\-]+", name.strip().lower()))


def organs_of(keys: Iterable[Optional[str]]) -> list[str]:
    """The organ groups (ORGANS order) that these REGION_ORGANS keys map to."""
    found = {o for k in keys if k is not None for o in REGION_ORGANS[k]}
    return [o for o in ORGANS if o in found]


def _matched_keys(text: str, weak: bool = True) -> list[Optional[str]]:
    keys, masked = [], text
    for pattern, key in _LEXICON_RE:
        if pattern.search(masked):
            keys.append(key)
            masked = pattern.sub(lambda m: " " * len(m.group(0)), masked)
    if weak and not any(k is not None for k in keys):
        keys += [key for pattern, key in _WEAK_RE if pattern.search(masked)]
    return keys


def sentence_organs(text: str, weak: bool = True) -> list[str]:
    """The organs (ORGANS order) a sentence or clause is about, by the lexicon; [] = general.
    weak=False: LEXICON terms only (no WEAK_LEXICON fallback)."""
    return organs_of(_matched_keys(text, weak))


def segment(text: str) -> list[str]:
    """Sentences of a report section. Ends at [.!?] followed by white space or the end, except
    after ABBREVIATIONS; list markers ("1.", "-") are dropped, as are pieces with no letter."""
    text = " ".join((text or "").split())
    out, start = [], 0
    for m in _BOUNDARY_RE.finditer(text):
        word = text[start:m.start()].rsplit(" ", 1)[-1].lower()
        if word.rstrip(".") in ABBREVIATIONS or re.fullmatch(r"[a-z]", word):
            continue
        out.append(text[start:m.end()].strip())
        start = m.end()
    out.append(text[start:].strip())
    pieces = [_LIST_MARKER_RE.sub("", p).strip() for p in out]
    return [p for p in pieces if re.search(r"[A-Za-z]", p)]


def split_sentence(sentence: str) -> list[tuple[str, list[str]]]:
    """(clause, organs) pieces of one sentence. It is cut at "; " only between clauses about
    different organs (LEXICON terms); a clause naming none joins the clause before it (or after
    it, when it leads). With no LEXICON term anywhere, the weak terms decide for the whole sentence."""
    clauses = [c.strip() for c in re.split(r";\s+", sentence) if c.strip()]
    pieces: list[tuple[str, list[str]]] = []
    lead = ""
    for clause in clauses:
        organs = sentence_organs(clause, weak=False)
        if organs and pieces and pieces[-1][1] == organs:
            pieces[-1] = (f"{pieces[-1][0]}; {clause}", organs)
        elif organs:
            pieces.append((f"{lead}; {clause}" if lead else clause, organs))
            lead = ""
        elif pieces:
            pieces[-1] = (f"{pieces[-1][0]}; {clause}", pieces[-1][1])
        else:
            lead = f"{lead}; {clause}" if lead else clause
    if lead:
        pieces.append((lead, sentence_organs(lead)))
    return pieces


def split_report(findings: str, impression: str = "") -> dict:
    """A bank entry body {"organs": {organ: [sentences]}, "general": str} from a report's findings
    and impression text by the rule splitter (see the module docstring)."""
    pieces = [piece for sentence in segment(findings) for piece in split_sentence(sentence)]
    return entry_from_pieces(pieces, impression)


def entry_from_pieces(pieces: Iterable[tuple[str, list[str]]], impression: str = "") -> dict:
    """An entry body from (sentence, organs) pairs: each sentence filed under each of its organs,
    organ-less sentences and then the impression's sentences in "general"."""
    organs: dict[str, list[str]] = {}
    general: list[str] = []
    for piece, targets in pieces:
        if not targets:
            general.append(piece)
        for organ in targets:
            organs.setdefault(organ, []).append(piece)
    return make_entry(organs, general + segment(impression))


def make_entry(organs: dict[str, list[str]], general: Iterable[str]) -> dict:
    """{"organs": ..., "general": ...} with organs in ORGANS order, sentences de-duplicated (first
    kept) and general joined by spaces."""
    out = {}
    for organ in ORGANS:
        seen = list(dict.fromkeys(s.strip() for s in organs.get(organ, ()) if s and s.strip()))
        if seen:
            out[organ] = seen
    gen = list(dict.fromkeys(s.strip() for s in general if s and s.strip()))
    return {"organs": out, "general": " ".join(gen)}


@dataclass
class SourceStats:
    """What a reader met: entries read, volumes without an entry, names not in REGION_ORGANS."""

    entries: int = 0
    missing: list[str] = field(default_factory=list)  # VolumeNames the source has no entry for
    unknown: dict[str, int] = field(default_factory=dict)  # source name -> times sent to "general"


def map_region(name: str, stats: Optional[SourceStats] = None) -> list[str]:
    """Our organs for a source organ/region name: REGION_ORGANS, else the lexicon read on the
    name, else [] (general; counted in stats.unknown)."""
    key = region_key(name)
    if key in REGION_ORGANS:
        return organs_of([key])
    organs = sentence_organs(key)
    if not organs and stats is not None:
        stats.unknown[key] = stats.unknown.get(key, 0) + 1
    return organs


def _add_text(organs: dict, general: list, source_name: str, text, stats: SourceStats, where: str):
    if isinstance(text, str):
        text = [text]
    if not isinstance(text, list) or not all(isinstance(t, str) for t in text):
        raise ValueError(f"{where}: organ {source_name!r} must hold a string or a list of strings")
    sentences = [s for t in text for s in segment(t)]
    targets = map_region(source_name, stats)
    if not targets:
        general.extend(sentences)
    for organ in targets:
        organs.setdefault(organ, []).extend(sentences)


def scan_key(volume_name: str) -> str:
    """fVLM's key of a volume: its scan, train_1_a_2.nii.gz -> train_1_a."""
    stem = re.sub(r"\.nii(\.gz)?$", "", volume_name)
    return stem.rsplit("_", 1)[0] if stem.count("_") >= 3 else stem


def _read_json_mapping(path, what: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such {what} file")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(obj, dict) or not all(isinstance(v, dict) for v in obj.values()):
        raise ValueError(f"{path}: expected fVLM's {what} format, an object "
                         '{"<split>_<pid>_<scan>": {"<organ>": "<text>", ...}, ...}')
    return obj


def fvlm_entries(names: Iterable[str], desc_path, conc_path=None,
                 impressions: Optional[dict[str, str]] = None) -> tuple[dict[str, dict], SourceStats]:
    """Bank entries (VolumeName -> entry body) from fVLM's desc_info.json (findings) and, when
    given, conc_info.json (impressions: each organ's sentences follow its findings). General:
    the sentences of names mapped to general, then (without conc_path) impressions[VolumeName]
    (e.g. the reports CSV's Impressions_EN). Volumes the file has no scan for are left out and
    listed in stats.missing. Errors: FileNotFoundError, ValueError naming the file."""
    desc = _read_json_mapping(desc_path, "desc_info.json")
    conc = _read_json_mapping(conc_path, "conc_info.json") if conc_path is not None else {}
    stats, out = SourceStats(), {}
    for name in names:
        key = scan_key(name)
        if key not in desc and key not in conc:
            stats.missing.append(name)
            continue
        organs: dict[str, list[str]] = {}
        general: list[str] = []
        for source, where in ((desc, desc_path), (conc, conc_path)):
            for organ_name, text in source.get(key, {}).items():
                _add_text(organs, general, organ_name, text, stats, f"{where} [{key}]")
        if conc_path is None and impressions:
            general.extend(segment(impressions.get(name, "")))
        out[name] = make_entry(organs, general)
        stats.entries += 1
    return out, stats


def _radgenome_rows(path) -> dict[str, list[tuple[str, str]]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such RadGenome region report")
    by_volume: dict[str, list[tuple[str, str]]] = {}
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        cols = {c.strip().lower(): c for c in reader.fieldnames or ()}
        if not {"volumename", "anatomy", "sentence"} <= set(cols):
            raise ValueError(f"{path}: expected RadGenome's region-report columns Volumename, Anatomy, Sentence; "
                             f"got {reader.fieldnames}")
        for row in reader:
            name = re.sub(r"\.nii(\.gz)?$", "", (row[cols["volumename"]] or "").strip())
            anatomy = (row[cols["anatomy"]] or "").strip()
            by_volume.setdefault(name, []).append((anatomy, row[cols["sentence"]] or ""))
    return by_volume


def radgenome_entries(names: Iterable[str], region_csv,
                      impressions: Optional[dict[str, str]] = None) -> tuple[dict[str, dict], SourceStats]:
    """Bank entries from a RadGenome-ChestCT region report (see the module docstring). General:
    the sentences of regions mapped to general, then impressions[VolumeName]. A volume with only
    the whole-report row is split by the rule splitter; a volume with no row is left out and
    listed in stats.missing. Errors: FileNotFoundError, ValueError naming the file."""
    rows = _radgenome_rows(region_csv)
    stats, out = SourceStats(), {}
    for name in names:
        found = rows.get(re.sub(r"\.nii(\.gz)?$", "", name))
        if not found:
            stats.missing.append(name)
            continue
        regions = [(a, s) for a, s in found if a]
        impression = (impressions or {}).get(name, "")
        if not regions:
            out[name] = split_report(" ".join(s for _, s in found), impression)
        else:
            organs: dict[str, list[str]] = {}
            general: list[str] = []
            for anatomy, text in regions:
                _add_text(organs, general, anatomy.split("/")[0], text, stats, f"{region_csv} [{name}]")
            out[name] = make_entry(organs, general + segment(impression))
        stats.entries += 1
    return out, stats


def write_bank(entries: dict[str, dict], path, overwrite: bool = False) -> Path:
    """Write a JSONL bank (one {"VolumeName", "organs", "general"} a line, names sorted)
    atomically: a temporary file beside it (a name the bank lookup never matches), then a rename.
    FileExistsError when the bank exists and overwrite is False."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass --overwrite to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for name in sorted(entries):
                entry = entries[name]
                f.write(json.dumps({"VolumeName": name, "organs": entry["organs"], "general": entry["general"]},
                                   ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def no_bank_notice(root, split: str) -> str:
    """The line `sigvlp train` logs when a split has no findings bank: what the chunks are paired
    with instead, and how to build a bank."""
    return (f"data: no findings bank for the {split!r} split under {root}: every chunk is paired with its volume's "
            f"whole report (Findings_EN), not with the findings of the organs inside it; build a bank with "
            f"`sigvlp findings {root} --split {split}` (writes {Path(root) / 'findings' / f'{split}_findings.jsonl'}, "
            f"found automatically) or pass --findings BANK.jsonl")
