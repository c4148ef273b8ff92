"""Organ label maps with TotalSegmentator ``total`` ids (v2 numbering), grouped into the organs
that findings are written for: the five lung lobes merge into "lung", both kidneys into
"kidney", vertebrae into "spine", ribs into "ribs".

Ids outside TotalSegmentator's 0..117 are unknown: a mask holding one is refused. Known ids that
belong to no group here (e.g. colon, 20) are allowed and simply belong to no organ.
"""

from __future__ import annotations

import numpy as np

# TotalSegmentator "total" ids used by the synthetic phantoms and the organ groups.
TS_IDS = {
    "spleen": 1, "kidney_right": 2, "kidney_left": 3, "gallbladder": 4, "liver": 5, "stomach": 6,
    "pancreas": 7,
    "lung_upper_lobe_left": 10, "lung_lower_lobe_left": 11, "lung_upper_lobe_right": 12,
    "lung_middle_lobe_right": 13, "lung_lower_lobe_right": 14,
    "esophagus": 15, "trachea": 16, "heart": 51, "aorta": 52, "sternum": 116,
}
# vertebrae_L1 = 31, vertebrae_T12 = 32, ..., vertebrae_T1 = 43 (id falls as the level rises).
VERTEBRA_IDS = {f"vertebrae_T{n}": 44 - n for n in range(1, 13)} | {"vertebrae_L1": 31, "vertebrae_L2": 30}
# rib_left_1..12 = 92..103, rib_right_1..12 = 104..115.
RIB_IDS = {f"rib_left_{n}": 91 + n for n in range(1, 13)} | {f"rib_right_{n}": 103 + n for n in range(1, 13)}
MAX_TS_ID = 117

ORGAN_GROUPS: dict[str, tuple[int, ...]] = {
    "lung": (10, 11, 12, 13, 14),
    "heart": (51,),
    "aorta": (52,),
    "trachea": (16,),
    "esophagus": (15,),
    "liver": (5,),
    "spleen": (1,),
    "kidney": (2, 3),
    "stomach": (6,),
    "pancreas": (7,),
    "gallbladder": (4,),
    "spine": tuple(range(25, 51)),
    "ribs": tuple(range(92, 116)),
    "sternum": (116,),
}
#: organ names in a fixed order: the rows of organ z-profiles.
ORGANS: tuple[str, ...] = tuple(ORGAN_GROUPS)


def label_to_organ_index() -> np.ndarray:
    """(MAX_TS_ID + 1,) int array: label id -> row in ORGANS, -1 for background/ungrouped."""
    lut = np.full(MAX_TS_ID + 1, -1, dtype=np.int64)
    for row, ids in enumerate(ORGAN_GROUPS.values()):
        lut[list(ids)] = row
    return lut


def organ_z_profile(labels: np.ndarray, path=None) -> np.ndarray:
    """Voxel count of each organ (rows in ORGANS order) in each slice: (len(ORGANS), z) int32.
    labels: (z, y, x) integer label map with TotalSegmentator ids."""
    if labels.ndim != 3:
        raise ValueError(f"{path or 'labels'}: expected a 3-D label map, got shape {labels.shape}")
    top = int(labels.max()) if labels.size else 0
    if top > MAX_TS_ID or (labels.size and int(labels.min()) < 0):
        bad = sorted(set(np.unique(labels).tolist()) - set(range(MAX_TS_ID + 1)))
        raise ValueError(f"{path or 'labels'}: unknown organ label(s) {bad[:10]} (TotalSegmentator ids are 0..{MAX_TS_ID})")
    lut = label_to_organ_index()
    n_org, z = len(ORGANS), labels.shape[0]
    profile = np.zeros((n_org, z), dtype=np.int32)
    for k in range(z):
        per_label = np.bincount(labels[k].ravel(), minlength=MAX_TS_ID + 1)
        np.add.at(profile[:, k], lut[lut >= 0], per_label[lut >= 0])
    return profile
