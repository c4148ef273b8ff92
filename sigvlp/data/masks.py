"""Organ masks from TotalSegmentator, in every format it writes, read as one label map of the
current ``total`` class ids (TotalSegmentator v2.x, ids 1..117; see TOTAL_CLASSES).

``load_total_labels(path, shape)`` picks the reader by what ``path`` is:

- **a multilabel file** (``TotalSegmentator -i ct.nii.gz -o seg.nii.gz --ml``, and CT-RATE's
  ``dataset/ts_seg/ts_total/...`` files, made with TotalSegmentator 2.7.0 whose ``total`` map is
  the current one): one NIfTI of class ids. TotalSegmentator stores its id -> name table in the
  file's NIfTI header extension (an XML ``<CaretExtension>`` whose ``<LabelTable>`` holds
  ``<Label Key="id">name</Label>`` entries; its ``nifti_ext_header.add_label_map_to_nifti``).
  When that table is present the ids are mapped by name onto the current ``total`` ids, so a map
  written with ``v1_order=True`` (TotalSegmentator v1's ids: 7 is the aorta, 10 the pancreas,
  13..17 the lung lobes, ...) is recognised and read correctly: v1's heart chambers and myocardium
  become "heart", and v1 classes with no v2 counterpart (pulmonary_artery, face) background; one
  log line says so. A table naming a class that is not in either map (a mask of another task,
  e.g. ``lung_nodules``) or a voxel id that the table does not name is a ValueError.
  **Risk:** a map without a table (written by other tools, or stripped) cannot be told apart:
  its ids are taken as the current ``total`` map. A v1-order map without its table passes the id
  range check (1..104) but means other organs (its 7, the aorta, reads as the pancreas); make such
  masks with TotalSegmentator >= 2 without ``--v1_order``, or keep the header extension.
- **a folder of binary files**, one per class, named as TotalSegmentator names them
  (``liver.nii.gz``, ``lung_upper_lobe_left.nii.gz``, ...; its default output without ``--ml``):
  each file's voxels > 0 get the class's id. Files named after no ``total`` class (another
  task's output in the same folder) are ignored; a folder with none of the class names is a
  ValueError. TotalSegmentator's binary masks do not overlap; where files do, the higher id wins.

CT-RATE also ships ``ts_seg/ts_lung_nodules`` and ``ts_seg/ts_pleural_pericard_effusion`` beside
``ts_total``: they are **not used** (our organ groups come from ``total``; nodules and effusions
are findings, supervised by the reports and the abnormality labels).

Source of the class maps: ``class_map["total"]`` and ``class_map["total_v1"]`` in
``totalsegmentator/map_to_binary.py`` of github.com/wasserth/TotalSegmentator (checked at
v2.18.0; unchanged since v2.0). The table below is written out here, not imported: the reader
needs no TotalSegmentator install.
"""

from __future__ import annotations

import logging
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Optional

import numpy as np

from sigvlp.data.volume import load_mask

log = logging.getLogger("sigvlp.data")

_VERTEBRAE = ("S1", "L5", "L4", "L3", "L2", "L1") + tuple(f"T{n}" for n in range(12, 0, -1)) + tuple(
    f"C{n}" for n in range(7, 0, -1))
#: TotalSegmentator v2 ``total`` class names in id order: TOTAL_NAMES[i] has id i + 1.
TOTAL_NAMES: tuple[str, ...] = (
    "spleen", "kidney_right", "kidney_left", "gallbladder", "liver", "stomach", "pancreas",
    "adrenal_gland_right", "adrenal_gland_left", "lung_upper_lobe_left", "lung_lower_lobe_left",
    "lung_upper_lobe_right", "lung_middle_lobe_right", "lung_lower_lobe_right", "esophagus", "trachea",
    "thyroid_gland", "small_bowel", "duodenum", "colon", "urinary_bladder", "prostate", "kidney_cyst_left",
    "kidney_cyst_right", "sacrum", *(f"vertebrae_{v}" for v in _VERTEBRAE), "heart", "aorta",
    "pulmonary_vein", "brachiocephalic_trunk", "subclavian_artery_right", "subclavian_artery_left",
    "common_carotid_artery_right", "common_carotid_artery_left", "brachiocephalic_vein_left",
    "brachiocephalic_vein_right", "atrial_appendage_left", "superior_vena_cava", "inferior_vena_cava",
    "portal_vein_and_splenic_vein", "iliac_artery_left", "iliac_artery_right", "iliac_vena_left",
    "iliac_vena_right", "humerus_left", "humerus_right", "scapula_left", "scapula_right", "clavicula_left",
    "clavicula_right", "femur_left", "femur_right", "hip_left", "hip_right", "spinal_cord",
    "gluteus_maximus_left", "gluteus_maximus_right", "gluteus_medius_left", "gluteus_medius_right",
    "gluteus_minimus_left", "gluteus_minimus_right", "autochthon_left", "autochthon_right",
    "iliopsoas_left", "iliopsoas_right", "brain", "skull",
    *(f"rib_left_{n}" for n in range(1, 13)), *(f"rib_right_{n}" for n in range(1, 13)),
    "sternum", "costal_cartilages",
)
#: id -> name of the current ``total`` map (1..117).
TOTAL_CLASSES: dict[int, str] = {i + 1: name for i, name in enumerate(TOTAL_NAMES)}
#: name -> id of the current ``total`` map.
TOTAL_IDS: dict[str, int] = {name: i for i, name in TOTAL_CLASSES.items()}
#: TotalSegmentator v1 class names absent from v2, and the v2 class each becomes (None: background).
#: Every other v1 name exists in v2 under the same name (with another id).
V1_ONLY: dict[str, Optional[str]] = {
    "heart_myocardium": "heart", "heart_atrium_left": "heart", "heart_ventricle_left": "heart",
    "heart_atrium_right": "heart", "heart_ventricle_right": "heart", "pulmonary_artery": None, "face": None,
}
_REMAP_SAID = False  # the first remapped mask is a warning, later ones info lines
_NIFTI = re.compile(r"^(?P<name>.+)\.nii(\.gz)?$")


def class_id(name: str) -> Optional[int]:
    """The current ``total`` id of a TotalSegmentator class name (v2, or a v1-only name mapped as
    V1_ONLY says; 0 for v1 classes that v2 does not have), None for a name of neither map."""
    if name in TOTAL_IDS:
        return TOTAL_IDS[name]
    if name in V1_ONLY:
        target = V1_ONLY[name]
        return TOTAL_IDS[target] if target is not None else 0
    return None


def label_table(path) -> Optional[dict[int, str]]:
    """The id -> class name table TotalSegmentator writes into a NIfTI header extension (None when
    the file has none). Reads the header only. Errors: ValueError for an unreadable file or a
    label table that does not parse."""
    import nibabel as nib  # import cost: nibabel loads only when a mask is read

    try:
        exts = nib.load(os.fspath(path)).header.extensions
    except Exception as e:
        raise ValueError(f"{path}: not a readable NIfTI mask ({type(e).__name__}: {e})") from None
    for ext in exts:
        content = ext.get_content()
        raw = content if isinstance(content, bytes) else str(content).encode("utf-8", "replace")
        if b"<LabelTable" not in raw:
            continue
        try:
            root = ET.fromstring(raw.strip(b"\x00 \t\r\n"))
        except ET.ParseError as e:
            raise ValueError(f"{path}: the header's label table is not valid XML ({e})") from None
        table = {}
        for el in root.iter("Label"):
            try:
                table[int(el.get("Key"))] = (el.text or "").strip()
            except (TypeError, ValueError):
                raise ValueError(f"{path}: label table entry with a non-integer Key {el.get('Key')!r}") from None
        return table
    return None


def remap_lut(table: dict[int, str], path=None) -> Optional[np.ndarray]:
    """(256,) uint8 lookup from a file's ids to current ``total`` ids by the file's label table,
    None when the table already follows the current map. Ids the table does not name map to 255
    (load_total_labels refuses voxels that hold one). Errors: ValueError naming unknown classes."""
    unknown = sorted({name for name in table.values() if class_id(name) is None})
    if unknown:
        raise ValueError(f"{path or 'mask'}: its label table names {unknown[:6]}, not TotalSegmentator 'total' "
                         f"classes (a mask of another task, e.g. lung_nodules? use the 'total' task's output)")
    bad = [k for k in table if not 0 < k < 255]
    if bad:
        raise ValueError(f"{path or 'mask'}: label table ids {bad[:6]} outside 1..254")
    if all(class_id(name) == k for k, name in table.items()):
        return None
    lut = np.full(256, 255, np.uint8)
    lut[0] = 0
    for k, name in table.items():
        lut[k] = class_id(name)
    return lut


def _from_binary_folder(folder: Path, shape) -> np.ndarray:
    files = sorted((class_id(m.group("name")), f) for f in folder.iterdir()
                   if f.is_file() and (m := _NIFTI.match(f.name)) and class_id(m.group("name")) is not None)
    if not files:
        raise ValueError(f"{folder}: no binary mask named after a TotalSegmentator 'total' class "
                         f"(expected files such as liver.nii.gz, lung_upper_lobe_left.nii.gz)")
    out = None
    for cid, f in files:
        m = load_mask(f, shape, max_label=1)
        if out is None:
            out, shape = np.zeros(m.shape, np.uint8), m.shape
        if cid:
            out[m != 0] = cid
    return out


def load_total_labels(path, shape: Optional[tuple[int, int, int]] = None) -> np.ndarray:
    """A TotalSegmentator mask (a multilabel file or a folder of binary files, see the module
    docstring) as a (z, y, x) uint8 map of current ``total`` ids in load_volume's canonical order.
    shape: the image's canonical shape, checked. Errors: FileNotFoundError; ValueError naming the
    file for an unreadable mask, a shape mismatch, a non-binary file in a folder, an unknown class
    in the label table, or a voxel id the label table does not name."""
    path = Path(path)
    if path.is_dir():
        return _from_binary_folder(path, shape)
    labels = load_mask(path, shape)
    table = label_table(path)
    lut = remap_lut(table, path) if table else None
    if lut is None:
        return labels
    present = np.flatnonzero(np.bincount(labels.ravel(), minlength=256))
    unnamed = [int(k) for k in present if lut[k] == 255]
    if unnamed:
        raise ValueError(f"{path}: voxel ids {unnamed[:6]} are not named by the file's label table")
    moved = sorted(k for k, name in table.items() if class_id(name) != k)
    global _REMAP_SAID
    (log.info if _REMAP_SAID else log.warning)("%s: ids remapped by the label table's names onto the current 'total' map (%d ids moved, e.g. "
             "%s; a TotalSegmentator v1-order map)", path, len(moved),
             ", ".join(f"{k} {table[k]} -> {class_id(table[k])}" for k in moved[:3]))
    _REMAP_SAID = True
    return lut[labels]
