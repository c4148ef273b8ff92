"""Synthetic chest-CT phantoms written as a CT-RATE-style dataset.

Each phantom is a chest CT in HU built in patient coordinates (mm, RAS+): air, a body outline
with subcutaneous fat, chest-wall muscle, lungs (five lobes), mediastinal fat, heart, aorta
(ascending, arch, descending), trachea with main bronchi, esophagus, liver, spleen, stomach with
its gas bubble, kidneys (when in the field of view), vertebrae with discs and spinal canal, ribs
and sternum; Gaussian noise on top. Tissue HU: air -1000, lung about -850, fat about -100,
muscle 45, blood 50, liver 60, cancellous bone 250, cortical bone 700, calcium 400..800,
metal 3000.

Twelve of CT-RATE's 18 abnormalities are drawn into the image and stated in the report, the
label CSV and the organ findings, with CT-RATE-like prevalences (`PREVALENCE`) and a share of
normal volumes: lung nodule, pleural effusion, cardiomegaly, pericardial effusion, emphysema,
consolidation, lung opacity (ground glass), atelectasis, arterial wall calcification, coronary
artery wall calcification, hiatal hernia and medical material (pacemaker with lead).

Scans vary in slices (about 60..400), z spacing (0.75..5 mm), in-plane size and spacing, and
file orientation (RAS or LPS affine). Files are int16 with scl_slope 1 / scl_inter -1024 in
the header (stored value = HU + 1024); masks are uint8 TotalSegmentator ids. Everything is a
pure function of (seed, index, config). ``make_phantom`` runs named steps over a shared scene
(_geometry, _body_wall, _abdomen, _lungs, _heart, _skeleton, _vessels_airway, one step per
abnormality in ``_ABNORMALITY_STEPS``, _noise_and_quantise, _report); their random draws come in a
fixed order, so a seed always gives the same phantom (tests hold digests of a few).

Output (``write_dataset``)::

    OUT/dataset/{train,valid}/<split>_<pid>/<split>_<pid>_a/<split>_<pid>_a_1.nii.gz
    OUT/dataset/radiology_text_reports/{train,validation}_reports.csv
    OUT/dataset/multi_abnormality_labels/{train,valid}_predicted_labels.csv
    OUT/dataset/metadata/{train,validation}_metadata.csv
    OUT/masks/{train,valid}/...same relative path....nii.gz
    OUT/findings/{train,valid}_findings.jsonl

Findings bank (JSONL, one volume per line)::

    {"VolumeName": "train_1_a_1.nii.gz",
     "organs": {"lung": ["A 7 mm solid nodule is seen in the right upper lobe."],
                "heart": ["Heart size is normal. There is no pericardial effusion."], ...},
     "general": "Lung nodule in the right upper lobe."}

Organ keys are the names in sigvlp.data.organs.ORGANS; "general" is the report's impression.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Optional, Sequence

import numpy as np

from sigvlp.data.ctrate import CTRATE_LABELS, LABEL_COLUMNS, METADATA_COLUMNS, REPORT_COLUMNS
from sigvlp.data.organs import RIB_IDS, TS_IDS, VERTEBRA_IDS

# Per-volume probability among non-normal volumes (roughly CT-RATE's label frequencies).
PREVALENCE = {
    "Medical material": 0.10, "Arterial wall calcification": 0.30, "Cardiomegaly": 0.11,
    "Pericardial effusion": 0.08, "Coronary artery wall calcification": 0.27, "Hiatal hernia": 0.14,
    "Emphysema": 0.20, "Atelectasis": 0.25, "Lung nodule": 0.45, "Lung opacity": 0.30,
    "Pleural effusion": 0.13, "Consolidation": 0.17,
}
DRAWN = tuple(PREVALENCE)

RESCALE_SLOPE, RESCALE_INTERCEPT = 1.0, -1024.0
HU = {"air": -1000.0, "lung": -850.0, "fat": -95.0, "muscle": 45.0, "blood": 50.0, "myocardium": 42.0,
      "liver": 60.0, "spleen": 48.0, "kidney": 32.0, "stomach": 38.0, "abdomen": 25.0, "fluid": 8.0,
      "cancellous": 250.0, "cortical": 700.0, "disc": 80.0, "csf": 12.0, "rib": 650.0,
      "sternum": 420.0, "calcium": 600.0, "metal": 3000.0, "ggo": -600.0, "emphysema": -975.0,
      "consolidation": 35.0}


@dataclass(frozen=True)
class SynthConfig:
    size: tuple[int, int] = (64, 96)  # in-plane matrix (min, max), square
    slices: tuple[int, int] = (60, 400)
    z_spacings: tuple[float, ...] = (0.75, 1.0, 1.25, 1.5, 2.0, 3.0, 5.0)
    normal_fraction: float = 0.2
    lps_fraction: float = 0.5
    noise_hu: float = 12.0
    #: smallest lesion radius drawn, mm (nodules, emphysema bullae, calcifications; opacities and
    #: consolidations at least twice it). None: 0.75 of the largest source voxel side, so nothing
    #: vanishes in the file; a larger value keeps findings visible after a coarse preprocessing
    min_lesion_mm: Optional[float] = None
    #: every drawn lesion size (radii, thicknesses, depths) is multiplied by this (after its draw,
    #: so the random draws and 1.0's phantoms are unchanged): > 1 makes findings visible at a
    #: coarse demo resolution
    lesion_scale: float = 1.0

    def __post_init__(self):
        if not (isinstance(self.lesion_scale, (int, float)) and not isinstance(self.lesion_scale, bool)
                and math.isfinite(self.lesion_scale)
                and self.lesion_scale > 0):
            raise ValueError(f"lesion_scale: expected a finite number > 0, got {self.lesion_scale!r}")
        m = self.min_lesion_mm
        if m is not None and not (isinstance(m, (int, float)) and not isinstance(m, bool) and math.isfinite(m)
                                  and m >= 0):
            raise ValueError(f"min_lesion_mm: expected None or a finite number >= 0 (mm), got {m!r}")


SYNTH_PRESETS = {
    "small": SynthConfig(),
    "tiny": SynthConfig(size=(40, 48), slices=(24, 64), z_spacings=(5.0, 6.0, 8.0)),
    # `sigvlp demo`: 64 px, 3-5 mm slices (about the demo's 64 px / 3 mm preprocessing), lesions drawn
    # twice their size and at least 9 mm in radius (1.5 voxels of that grid) so each finding stays
    # visible after preprocessing
    "demo": SynthConfig(size=(64, 64), slices=(40, 128), z_spacings=(3.0, 4.0, 5.0), lesion_scale=2.0,
                        min_lesion_mm=9.0),
    "medium": SynthConfig(size=(128, 192)),
    "full": SynthConfig(size=(384, 512)),
}


@dataclass
class Phantom:
    hu: np.ndarray  # (z, y, x) int16 HU, canonical RAS+ index order
    labels: np.ndarray  # (z, y, x) uint8 TotalSegmentator ids
    spacing: tuple[float, float, float]  # (z, y, x) mm
    origin: tuple[float, float, float]  # (z, y, x) world mm of voxel (0, 0, 0)
    findings: dict[str, dict] = field(default_factory=dict)  # abnormality -> parameters
    organ_sentences: dict[str, list[str]] = field(default_factory=dict)
    impression: str = ""
    clinical: str = ""
    technique: str = ""
    patient: dict = field(default_factory=dict)

    def affine(self, orientation: str = "RAS") -> np.ndarray:
        """NIfTI affine for the file written in this orientation, (i, j, k) = (x, y, z)."""
        sz, sy, sx = self.spacing
        oz, oy, ox = self.origin
        nz, ny, nx = self.hu.shape
        if orientation == "RAS":
            return np.array([[sx, 0, 0, ox], [0, sy, 0, oy], [0, 0, sz, oz], [0, 0, 0, 1]], dtype=np.float64)
        if orientation == "LPS":  # i runs to the left, j to the back: both flipped
            return np.array([[-sx, 0, 0, ox + (nx - 1) * sx], [0, -sy, 0, oy + (ny - 1) * sy],
                             [0, 0, sz, oz], [0, 0, 0, 1]], dtype=np.float64)
        raise ValueError(f"orientation must be 'RAS' or 'LPS', got {orientation!r}")

    def file_array(self, arr: np.ndarray, orientation: str) -> np.ndarray:
        """(z, y, x) canonical array -> the (i, j, k) array stored in a file of that orientation."""
        out = arr.transpose(2, 1, 0)
        if orientation == "LPS":
            out = out[::-1, ::-1, :]
        return np.ascontiguousarray(out)

    @property
    def labels_present(self) -> dict[str, int]:
        on = set(self.findings)
        if "Consolidation" in on:
            on.add("Lung opacity")  # consolidation is an opacity
        return {name: int(name in on) for name in CTRATE_LABELS}


class _Grid:
    """World coordinates (mm) of a (z, y, x) voxel grid and bounding-box helpers."""

    def __init__(self, shape, spacing, origin):
        self.shape, self.spacing, self.origin = shape, spacing, origin
        self.axes = [np.float32(o) + np.arange(n, dtype=np.float32) * np.float32(s)
                     for n, s, o in zip(shape, spacing, origin)]
        self.z = self.axes[0][:, None, None]
        self.y = self.axes[1][None, :, None]
        self.x = self.axes[2][None, None, :]

    def box(self, lo, hi):
        """Slices covering world box [lo, hi] (z, y, x), or None when empty."""
        out = []
        for a, (l, h) in enumerate(zip(lo, hi)):
            o, s, n = self.origin[a], self.spacing[a], self.shape[a]
            i0 = max(0, int(math.ceil((l - o) / s)))
            i1 = min(n, int(math.floor((h - o) / s)) + 1)
            if i1 <= i0:
                return None
            out.append(slice(i0, i1))
        return tuple(out)

    def local(self, sl):
        return self.z[sl[0]], self.y[:, sl[1]], self.x[:, :, sl[2]]

    def ellipsoid(self, c, r):
        """(slices, mask) of an axis-aligned ellipsoid, centre c and radii r as (z, y, x) mm."""
        sl = self.box([ci - ri for ci, ri in zip(c, r)], [ci + ri for ci, ri in zip(c, r)])
        if sl is None:
            return None, None
        z, y, x = self.local(sl)
        m = ((z - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((x - c[2]) / r[2]) ** 2 <= 1.0
        return sl, m


def _paint(hu, labels, sl, mask, value=None, label=None, where=None):
    if sl is None:
        return
    mask = np.broadcast_to(mask, hu[sl].shape)
    if where is not None:
        mask = mask & where[sl]
    if value is not None:
        hu[sl][mask] = value
    if label is not None:
        labels[sl][mask] = label


def _tube(grid, hu, labels, points, radius, value, label=None, where=None):
    """Spheres of `radius` along a polyline of (z, y, x) points, spaced finer than a voxel."""
    points = np.asarray(points, dtype=np.float64)
    step = max(0.5 * min(grid.spacing), radius * 0.5)
    for p, q in zip(points[:-1], points[1:]):
        n = max(1, int(np.linalg.norm(q - p) / step))
        for t in np.linspace(0, 1, n + 1):
            c = p + t * (q - p)
            sl, m = grid.ellipsoid(c, (radius,) * 3)
            _paint(hu, labels, sl, m, value, label, where)


LOBE_NAMES = {10: "left upper lobe", 11: "left lower lobe", 12: "right upper lobe", 13: "right middle lobe",
              14: "right lower lobe"}
NORMAL_SENTENCES = {
    "trachea": ["Trachea and both main bronchi are in normal width and open.", "Trachea and main bronchi are patent."],
    "esophagus": ["Esophagus is of normal calibre.", "No wall thickening is seen in the esophagus."],
    "heart": ["Heart size is normal. There is no pericardial effusion.",
              "Heart contour and size are normal; no pericardial effusion or thickening."],
    "aorta": ["Thoracic aorta diameter is normal.", "The calibre of the thoracic aorta is normal."],
    "lung": ["Both lungs are normally aerated; no nodule, mass or infiltrate.",
             "No mass or infiltrative lesion is seen in either lung.", "Lung parenchyma is normal."],
    "liver": ["The liver is normal in size and density in the sections included.", "The liver is unremarkable."],
    "spleen": ["The spleen is of normal size.", "The spleen is unremarkable."],
    "stomach": ["No pathology is seen in the stomach within the sections."],
    "kidney": ["The upper poles of both kidneys are unremarkable."],
    "spine": ["Vertebral alignment is normal; no lytic or destructive lesion.",
              "Thoracic vertebrae are of normal height and alignment."],
    "ribs": ["No rib fracture is seen.", "Ribs are intact."],
    "sternum": ["The sternum is intact."],
}
CLINICAL = ["Not given.", "Cough.", "Shortness of breath.", "Follow-up of a pulmonary nodule.", "Fever and cough.",
            "Chest pain.", "Screening."]


def sample_findings(seed: int, config: SynthConfig = SynthConfig()) -> set[str]:
    """The abnormalities a phantom of this seed is drawn with: none for a normal volume
    (probability config.normal_fraction), else each independently with PREVALENCE."""
    rng = np.random.default_rng([int(seed), 2])
    normal = rng.random() < config.normal_fraction
    draws = {name: rng.random() < p for name, p in PREVALENCE.items()}
    return set() if normal else {k for k, v in draws.items() if v}


class _Scene(SimpleNamespace):
    """What the drawing steps of make_phantom share: random generators, geometry, the HU and
    label arrays being painted, and the stated findings."""

    def set(self, **values):
        self.__dict__.update(values)


def _lung_points(sc: _Scene, lobes=None, tries=50):
    """Up to `tries` random lung voxels (world (z, y, x) mm, lobe label), of `lobes` or any lobe."""
    labels, lung_mask, lrng, shape, g = sc.labels, sc.lung_mask, sc.lrng, sc.shape, sc.g
    cand = np.flatnonzero(np.isin(labels, lobes) if lobes is not None else lung_mask)
    if cand.size == 0:
        return None
    for _ in range(tries):
        idx = np.unravel_index(int(cand[lrng.integers(cand.size)]), shape)
        yield tuple(ax[i] for ax, i in zip(g.axes, idx)), int(labels[idx])


def _geometry(sc: _Scene) -> None:
    """Body size, field of view, slice count and spacing; the empty (air) grid."""
    rng, config = sc.rng, sc.config
    a = rng.uniform(140, 175)  # body half-width (mm)
    b = rng.uniform(0.62, 0.75) * a  # body half-depth
    fat = rng.uniform(8, 28)
    wall = rng.uniform(14, 20)
    ac, bc = a - fat - wall, b - fat - wall  # thoracic cavity half-axes
    yc = -0.05 * b
    apex = rng.uniform(180, 220)  # lung apex above the right dome (z = 0)
    z_top = apex + rng.uniform(10, 30)
    z_bot = -rng.uniform(50, 110)
    sz = float(rng.choice(config.z_spacings))
    n_z = int(round((z_top - z_bot) / sz)) + 1
    n_z_clipped = int(np.clip(n_z, *config.slices))
    mid = 0.5 * (z_top + z_bot)
    z_bot = mid - 0.5 * (n_z_clipped - 1) * sz
    n_z = n_z_clipped
    n_xy = int(rng.integers(config.size[0], config.size[1] + 1))
    fov = 2 * a * rng.uniform(1.12, 1.3)
    sxy = round(fov / n_xy, 4)
    y_shift = rng.uniform(-10, 10)
    shape = (n_z, n_xy, n_xy)
    spacing = (sz, sxy, sxy)
    origin = (z_bot, -(n_xy - 1) / 2 * sxy + y_shift, -(n_xy - 1) / 2 * sxy)
    g = _Grid(shape, spacing, origin)
    hu = np.full(shape, HU["air"], dtype=np.float32)
    labels = np.zeros(shape, dtype=np.uint8)

    # Lesions smaller than a voxel would vanish: every drawn radius is at least this.
    min_r = max(0.75 * max(spacing), config.min_lesion_mm or 0.0)
    sc.set(ls=float(config.lesion_scale), a=a, b=b, fat=fat, wall=wall, ac=ac, bc=bc, yc=yc, apex=apex, z_top=z_top,
           z_bot=z_bot, sz=sz, n_xy=n_xy, sxy=sxy, y_shift=y_shift, shape=shape, spacing=spacing, origin=origin, g=g,
           hu=hu, labels=labels, min_r=min_r)


def _body_wall(sc: _Scene) -> None:
    """Subcutaneous fat, chest-wall muscle and the thoracic cavity (2-D outlines along z)."""
    g, a, b, yc, ac, bc, fat, hu, y_shift = sc.g, sc.a, sc.b, sc.yc, sc.ac, sc.bc, sc.fat, sc.hu, sc.y_shift
    n_xy, sxy, shape = sc.n_xy, sc.sxy, sc.shape
    x2, y2 = g.x[0], g.y[0]  # (1, nx), (ny, 1)
    e_body = (x2 / a) ** 2 + ((y2 - yc) / b) ** 2
    e_cav = np.sqrt((x2 / ac) ** 2 + ((y2 - yc) / bc) ** 2)
    body2 = e_body <= 1
    muscle2 = (x2 / (a - fat)) ** 2 + ((y2 - yc) / (b - fat)) ** 2 <= 1
    cavity2 = e_cav <= 1
    hu[:, body2] = HU["fat"]
    hu[:, muscle2] = HU["muscle"]
    hu[:, cavity2] = HU["fat"]  # mediastinal / abdominal fat; organs are drawn over it
    fov_circle = x2 ** 2 + (y2 - y_shift) ** 2 <= ((n_xy - 1) / 2 * sxy) ** 2
    cavity = np.broadcast_to(cavity2, shape)
    sc.set(x2=x2, y2=y2, e_cav=e_cav, cavity=cavity, fov_circle=fov_circle)


def _abdomen(sc: _Scene) -> None:
    """Diaphragm domes, liver, spleen, stomach with its gas bubble, kidneys."""
    rng, ac, bc, yc, g, cavity, hu, labels = sc.rng, sc.ac, sc.bc, sc.yc, sc.g, sc.cavity, sc.hu, sc.labels
    dome_r, dome_l = 0.0, -rng.uniform(10, 20)
    xs = 0.45 * ac
    bowl = 70 * (((g.x - np.where(g.x > 0, xs, -xs)) / ac) ** 2 + ((g.y - yc) / bc) ** 2)
    z_diaph = np.where(g.x > 0, dome_r, dome_l) - bowl  # (1, ny, nx)
    below = (g.z < z_diaph) & cavity
    hu[below] = HU["abdomen"]
    liver = below & (g.x > -0.25 * ac) & (g.z > dome_r - 170) & (g.y > yc - 0.8 * bc)
    hu[liver] = HU["liver"]
    labels[liver] = TS_IDS["liver"]
    sl, m = g.ellipsoid((dome_l - 55, yc - 0.45 * bc, -0.7 * ac), (50, 0.35 * bc, 0.22 * ac))
    _paint(hu, labels, sl, m, HU["spleen"], TS_IDS["spleen"], where=below)
    st_c = (dome_l - 45, yc + 0.35 * bc, -0.4 * ac)
    st_r = (40, 0.35 * bc, 0.3 * ac)
    sl, m = g.ellipsoid(st_c, st_r)
    _paint(hu, labels, sl, m, HU["stomach"], TS_IDS["stomach"], where=below)
    sl, m = g.ellipsoid((st_c[0] + 0.5 * st_r[0], st_c[1], st_c[2]), (0.45 * st_r[0], 0.7 * st_r[1], 0.7 * st_r[2]))
    _paint(hu, labels, sl, m, HU["air"], None, where=below & (labels == TS_IDS["stomach"]))  # gas bubble
    for side, tid in ((1, TS_IDS["kidney_right"]), (-1, TS_IDS["kidney_left"])):
        sl, m = g.ellipsoid((dome_r - 120, yc - 0.62 * bc, side * 0.42 * ac), (55, 0.22 * bc, 0.17 * ac))
        _paint(hu, labels, sl, m, HU["kidney"], tid, where=below)
    sc.set(dome_r=dome_r, dome_l=dome_l, z_diaph=z_diaph, st_c=st_c, st_r=st_r)


def _lungs(sc: _Scene) -> None:
    """Lungs with their five lobes above the diaphragm."""
    rng, yc, bc, g, z_diaph, cavity, apex = sc.rng, sc.yc, sc.bc, sc.g, sc.z_diaph, sc.cavity, sc.apex
    e_cav, hu, shape, labels = sc.e_cav, sc.hu, sc.shape, sc.labels
    spine_r = rng.uniform(16, 19)
    spine_y = yc - bc + spine_r + 2
    med_half = rng.uniform(18, 26)
    above = (g.z >= z_diaph) & cavity & (g.z <= apex)
    apex_dome = ((g.z - (apex - 60)) / 60).clip(0, None) ** 2 + e_cav ** 2 <= 1.05
    not_med = np.abs(g.x + 5) > med_half
    lung = above & apex_dome & (not_med | (g.y < spine_y - spine_r))
    lung &= ~((np.abs(g.x) < spine_r + 4) & (g.y < spine_y + spine_r + 4))  # spine column
    hu[lung] = HU["lung"]
    fissure = g.z - 0.9 * (g.y - yc)  # oblique fissure: upper lobe above/anterior
    z_fis = rng.uniform(70, 100)
    right = g.x > 0
    lobe = np.where(right, np.where(fissure > z_fis, 12, np.where((g.y > yc + 0.1 * bc) & (g.z > 30), 13, 14)),
                    np.where(fissure > z_fis - 10, 10, 11)).astype(np.uint8)
    labels[lung] = np.broadcast_to(lobe, shape)[lung]
    above_diaph = g.z >= z_diaph
    sc.set(spine_r=spine_r, spine_y=spine_y, above_diaph=above_diaph)


def _heart(sc: _Scene) -> None:
    """Heart (enlarged with cardiomegaly), pericardial effusion when present."""
    rng, big_heart, present, bc, ac, dome_l, yc = sc.rng, sc.big_heart, sc.present, sc.bc, sc.ac, sc.dome_l, sc.yc
    spacing, g, hu, labels, above_diaph, cavity = sc.spacing, sc.g, sc.hu, sc.labels, sc.above_diaph, sc.cavity
    pe_t = None
    h_scale = rng.uniform(1.32, 1.45) if big_heart else rng.uniform(0.92, 1.05)
    h_r = (48 * h_scale, 0.42 * bc * h_scale, 0.44 * ac * h_scale)
    h_c = (dome_l + 0.8 * h_r[0], yc + 0.28 * bc, -0.12 * ac)
    if "Pericardial effusion" in present:
        pe_t = max(rng.uniform(6, 15) * sc.ls, 1.2 * max(spacing))
        sl, m = g.ellipsoid(h_c, tuple(r + pe_t for r in h_r))
        _paint(hu, labels, sl, m, HU["fluid"], TS_IDS["heart"], where=above_diaph & cavity)
    else:
        rng.uniform(6, 15)
    sl, m = g.ellipsoid(h_c, h_r)
    _paint(hu, labels, sl, m, HU["myocardium"], TS_IDS["heart"], where=above_diaph & cavity)
    sl, m = g.ellipsoid(h_c, tuple(0.72 * r for r in h_r))
    _paint(hu, labels, sl, m, HU["blood"], None, where=above_diaph)
    heart_width = 2 * h_r[2]
    sc.set(h_r=h_r, h_c=h_c, heart_width=heart_width, pe_t=pe_t)


def _skeleton(sc: _Scene) -> None:
    """Vertebrae with discs and spinal canal, ribs, sternum."""
    apex, spine_y, spine_r, z_bot, z_top, g, hu = sc.apex, sc.spine_y, sc.spine_r, sc.z_bot, sc.z_top, sc.g, sc.hu
    labels, x2, y2, yc, e_cav, wall, ac, bc = sc.labels, sc.x2, sc.y2, sc.yc, sc.e_cav, sc.wall, sc.ac, sc.bc
    sxy, sz, dome_r = sc.sxy, sc.sz, sc.dome_r
    level_h = 24.0
    n_levels = 14  # T1..T12, L1, L2
    level_top = apex + 12
    canal_y = spine_y - spine_r - 8
    for k in range(n_levels):
        z1 = level_top - k * level_h
        z0 = z1 - level_h
        if z1 < z_bot or z0 > z_top:
            continue
        name = f"vertebrae_T{k + 1}" if k < 12 else f"vertebrae_L{k - 11}"
        vid = VERTEBRA_IDS[name]
        sl = g.box((z0, spine_y - spine_r, -spine_r), (z1 - 5, spine_y + spine_r, spine_r))
        if sl is not None:
            z, y, x = g.local(sl)
            rr = np.sqrt(x ** 2 + (y - spine_y) ** 2)
            body = rr <= spine_r
            _paint(hu, labels, sl, body, HU["cancellous"], vid)
            _paint(hu, labels, sl, body & (rr > spine_r - 2.5), HU["cortical"], None)
        sl = g.box((z1 - 5, spine_y - spine_r, -spine_r), (z1, spine_y + spine_r, spine_r))
        if sl is not None:
            z, y, x = g.local(sl)
            _paint(hu, labels, sl, np.broadcast_to(np.sqrt(x ** 2 + (y - spine_y) ** 2) <= spine_r,
                                                   (z.shape[0], y.shape[1], x.shape[2])), HU["disc"], 0)
        sl = g.box((z0, canal_y - 20, -spine_r), (z1 - 3, canal_y + 12, spine_r))
        if sl is not None:
            z, y, x = g.local(sl)
            rr = np.sqrt(x ** 2 + (y - canal_y) ** 2)
            arch = ((rr <= 13) | ((np.abs(x) < 4) & (y < canal_y) & (y > canal_y - 20))) & (rr > 7)
            _paint(hu, labels, sl, np.broadcast_to(arch, (z.shape[0],) + arch.shape[1:]), HU["cortical"], vid)
            _paint(hu, labels, sl, np.broadcast_to(rr <= 7, (z.shape[0],) + rr.shape[1:]), HU["csf"], 0)
        if k < 12:  # a pair of ribs per thoracic level, sloping down towards the front
            theta_sin = (y2 - yc) / np.maximum(np.sqrt(x2 ** 2 + (y2 - yc) ** 2), 1e-3)
            band = (np.abs(e_cav - 1.0 - 0.5 * wall / ac) * ac < max(4.0, 0.6 * sxy)) & (theta_sin < (0.75 if k < 10 else 0.0))
            band &= np.abs(x2) > spine_r + 4
            z_rib = z1 - 10 - 45 * (1 + theta_sin) / 2  # (ny, nx)
            half = max(4.5, 0.6 * sz)
            sl = g.box((z_rib.min() - half, -1e9, -1e9), (z_rib.max() + half, 1e9, 1e9))
            if sl is not None:
                z = g.z[sl[0]]
                rib = band & (np.abs(z - z_rib) < half)
                rib_id = np.where(x2 > 0, RIB_IDS[f"rib_right_{k + 1}"], RIB_IDS[f"rib_left_{k + 1}"])
                hu[sl[0]][rib] = HU["rib"]
                labels[sl[0]][rib] = np.broadcast_to(rib_id, rib.shape)[rib]
    sl = g.box((dome_r - 10, yc + bc + 2, -14), (level_top - 2 * level_h, yc + bc + wall - 2, 14))
    if sl is not None:
        _paint(hu, labels, sl, np.ones(tuple(s.stop - s.start for s in sl), bool), HU["sternum"], TS_IDS["sternum"])


def _vessels_airway(sc: _Scene) -> None:
    """Aorta (ascending, arch, descending), esophagus, trachea and main bronchi."""
    rng, apex, h_c, yc, bc, ac, spine_r = sc.rng, sc.apex, sc.h_c, sc.yc, sc.bc, sc.ac, sc.spine_r
    spine_y, z_bot, z_top, dome_l, st_c, g, hu = sc.spine_y, sc.z_bot, sc.z_top, sc.dome_l, sc.st_c, sc.g, sc.hu
    labels = sc.labels
    z_carina = apex - rng.uniform(70, 85)
    z_arch = z_carina + rng.uniform(10, 20)
    asc = (h_c[0], yc + 0.18 * bc, 0.1 * ac)
    desc_x, desc_y = -(spine_r + 16), spine_y + 6
    r_ao = rng.uniform(12, 16)
    arch_pts = [(z_arch + 22 * math.sin(math.pi * t), asc[1] + t * (desc_y - asc[1]), asc[2] + t * (desc_x - asc[2]))
                for t in np.linspace(0, 1, 9)]
    aorta_path = [asc, (z_arch, asc[1], asc[2])] + arch_pts + [(z_arch, desc_y, desc_x), (z_bot - 5, desc_y, desc_x)]
    _tube(g, hu, labels, aorta_path, r_ao, HU["blood"], TS_IDS["aorta"])
    tr_y = spine_y + spine_r + 28
    eso_y = spine_y + spine_r + 9
    _tube(g, hu, labels, [(z_top + 5, eso_y, -5), (dome_l + 5, eso_y, -8), (st_c[0] + 10, st_c[1] - 10, st_c[2] + 10)],
          7, HU["muscle"], TS_IDS["esophagus"])
    _tube(g, hu, labels, [(z_top + 5, tr_y, 0), (z_carina, tr_y, 0)], 9.5, HU["muscle"], TS_IDS["trachea"])
    _tube(g, hu, labels, [(z_top + 5, tr_y, 0), (z_carina, tr_y, 0)], 7.5, HU["air"], None)
    for side in (1, -1):  # main bronchi: air lumen, labelled by what they pass through
        _tube(g, hu, labels, [(z_carina, tr_y, 0), (z_carina - 30, tr_y - 10, side * 45)], 5.5, HU["air"], None)
    sc.set(z_arch=z_arch, desc_x=desc_x, desc_y=desc_y, r_ao=r_ao, eso_y=eso_y)


def _lung_nodule(sc: _Scene) -> None:
    """Lung nodule: drawn into the image and stated."""
    lrng, g, hu, labels, lung_mask, min_r, stated = sc.lrng, sc.g, sc.hu, sc.labels, sc.lung_mask, sc.min_r, sc.stated
    nodules = []
    for _ in range(int(lrng.integers(1, 4))):
        r = max(lrng.uniform(2.5, 8.0) * sc.ls, min_r)
        for c, lab in _lung_points(sc) or ():
            sl, m = g.ellipsoid(c, (r, r, r))
            inside = lung_mask[sl][m]
            if inside.size and inside.mean() > 0.8:
                _paint(hu, labels, sl, m, HU["consolidation"] + lrng.uniform(-10, 10), None, where=lung_mask)
                nodules.append({"diameter_mm": round(2 * r), "lobe": LOBE_NAMES[lab], "center": c})
                break
    if nodules:
        stated["Lung nodule"] = {"nodules": nodules}


def _emphysema(sc: _Scene) -> None:
    """Emphysema: drawn into the image and stated."""
    lrng, g, hu, labels, min_r, stated = sc.lrng, sc.g, sc.hu, sc.labels, sc.min_r, sc.stated
    n = int(lrng.integers(40, 90))
    upper = np.isin(labels, (10, 12))
    for c, _lab in list(_lung_points(sc, (10, 12), tries=n) or ())[:n]:
        r = max(lrng.uniform(5, 12) * sc.ls, min_r)
        sl, m = g.ellipsoid(c, (r, r, r))
        _paint(hu, labels, sl, m, HU["emphysema"], None, where=upper)
    stated["Emphysema"] = {}


def _lung_opacity(sc: _Scene) -> None:
    """Lung opacity: drawn into the image and stated."""
    lrng, g, hu, labels, lung_mask, min_r, stated = sc.lrng, sc.g, sc.hu, sc.labels, sc.lung_mask, sc.min_r, sc.stated
    for c, lab in _lung_points(sc) or ():
        r = (lrng.uniform(15, 35), lrng.uniform(15, 30), lrng.uniform(15, 30))
        sl, m = g.ellipsoid(c, tuple(max(ri * sc.ls, 2 * min_r) for ri in r))
        _paint(hu, labels, sl, m, HU["ggo"], None, where=lung_mask & (labels == lab))
        stated["Lung opacity"] = {"lobe": LOBE_NAMES[lab]}
        break


def _consolidation(sc: _Scene) -> None:
    """Consolidation: drawn into the image and stated."""
    lrng, g, hu, labels, min_r, stated = sc.lrng, sc.g, sc.hu, sc.labels, sc.min_r, sc.stated
    for c, lab in _lung_points(sc, (11, 14)) or ():
        r = (lrng.uniform(20, 40), lrng.uniform(15, 30), lrng.uniform(15, 30))
        sl, m = g.ellipsoid(c, tuple(max(ri * sc.ls, 2 * min_r) for ri in r))
        _paint(hu, labels, sl, m, HU["consolidation"], None, where=labels == lab)
        stated["Consolidation"] = {"lobe": LOBE_NAMES[lab]}
        break


def _atelectasis(sc: _Scene) -> None:
    """Atelectasis: drawn into the image and stated."""
    lrng, g, hu, labels, sz, z_diaph, yc = sc.lrng, sc.g, sc.hu, sc.labels, sc.sz, sc.z_diaph, sc.yc
    stated = sc.stated
    lab = int(lrng.choice([11, 14]))
    t = max(lrng.uniform(6, 12) * sc.ls, 1.2 * sz)
    band = (labels == lab) & (g.z < z_diaph + t) & (g.y < yc)
    hu[band] = HU["consolidation"] - 5
    stated["Atelectasis"] = {"lobe": LOBE_NAMES[lab]}


def _pleural_effusion(sc: _Scene) -> None:
    """Pleural effusion: drawn into the image and stated."""
    lrng, g, hu, lung_mask, sxy, sz, stated = sc.lrng, sc.g, sc.hu, sc.lung_mask, sc.sxy, sc.sz, sc.stated
    side = lrng.choice(["right", "left", "bilateral"], p=[0.4, 0.2, 0.4])
    depth = max(lrng.uniform(15, 45) * sc.ls, 2 * max(sxy, sz))
    sides = {"right": [1], "left": [-1], "bilateral": [1, -1]}[side]
    for s in sides:
        this = lung_mask & ((g.x > 0) if s > 0 else (g.x < 0))
        ys = np.nonzero(this.any(axis=(0, 2)))[0]
        if ys.size:
            y_back = g.axes[1][ys[0]]
            hu[this & (g.y < y_back + depth)] = HU["fluid"]
    stated["Pleural effusion"] = {"side": str(side), "depth_mm": round(depth)}


def _cardiomegaly(sc: _Scene) -> None:
    """Cardiomegaly: drawn into the image and stated."""
    heart_width, ac, stated = sc.heart_width, sc.ac, sc.stated
    stated["Cardiomegaly"] = {"ctr": round(heart_width / (2 * ac), 2)}


def _pericardial_effusion(sc: _Scene) -> None:
    """Pericardial effusion: drawn into the image and stated."""
    pe_t, stated = sc.pe_t, sc.stated
    stated["Pericardial effusion"] = {"thickness_mm": round(pe_t)}


def _arterial_wall_calcification(sc: _Scene) -> None:
    """Arterial wall calcification: drawn into the image and stated."""
    lrng, g, hu, labels, z_arch, z_bot, dome_l = sc.lrng, sc.g, sc.hu, sc.labels, sc.z_arch, sc.z_bot, sc.dome_l
    desc_x, desc_y, r_ao, min_r, stated = sc.desc_x, sc.desc_y, sc.r_ao, sc.min_r, sc.stated
    desc = labels == TS_IDS["aorta"]
    for _ in range(int(lrng.integers(2, 6))):
        t = lrng.uniform(0, 1)
        zc = z_arch - t * (z_arch - max(z_bot, dome_l - 40))
        ang = lrng.uniform(0, 2 * math.pi)
        c = (zc, desc_y + r_ao * math.sin(ang) * 0.85, desc_x + r_ao * math.cos(ang) * 0.85)
        r = max(lrng.uniform(2, 4) * sc.ls, min_r)
        sl, m = g.ellipsoid(c, (r, r, r))
        _paint(hu, labels, sl, m, HU["calcium"] + lrng.uniform(-200, 200), None, where=desc)
    stated["Arterial wall calcification"] = {}


def _coronary_artery_wall_calcification(sc: _Scene) -> None:
    """Coronary artery wall calcification: drawn into the image and stated."""
    lrng, g, hu, labels, h_c, h_r, min_r = sc.lrng, sc.g, sc.hu, sc.labels, sc.h_c, sc.h_r, sc.min_r
    stated = sc.stated
    heart = labels == TS_IDS["heart"]
    for _ in range(int(lrng.integers(1, 4))):
        ang = lrng.uniform(0.2, 1.4)  # anterior-superior surface: coronary territory
        c = (h_c[0] + 0.5 * h_r[0], h_c[1] + 0.85 * h_r[1] * math.sin(ang), h_c[2] + 0.85 * h_r[2] * math.cos(ang))
        r = max(lrng.uniform(2, 3.5) * sc.ls, min_r)
        sl, m = g.ellipsoid(c, (r, r, r))
        _paint(hu, labels, sl, m, HU["calcium"] - 100 + lrng.uniform(-100, 200), None, where=heart)
    stated["Coronary artery wall calcification"] = {}


def _hiatal_hernia(sc: _Scene) -> None:
    """Hiatal hernia: drawn into the image and stated."""
    lrng, g, hu, labels, sz, sxy, dome_l, eso_y = sc.lrng, sc.g, sc.hu, sc.labels, sc.sz, sc.sxy, sc.dome_l, sc.eso_y
    cavity, stated = sc.cavity, sc.stated
    r = (max(lrng.uniform(18, 28) * sc.ls, 2 * sz), max(lrng.uniform(14, 22) * sc.ls, 2 * sxy),
         max(lrng.uniform(14, 22) * sc.ls, 2 * sxy))
    c = (dome_l + 0.8 * r[0], eso_y + 4, -12)
    sl, m = g.ellipsoid(c, r)
    free = cavity & ~np.isin(labels, (TS_IDS["aorta"], TS_IDS["heart"], *VERTEBRA_IDS.values()))
    _paint(hu, labels, sl, m, HU["stomach"], TS_IDS["stomach"], where=free)
    sl, m = g.ellipsoid((c[0] + 0.4 * r[0], c[1], c[2]), tuple(0.5 * ri for ri in r))
    _paint(hu, labels, sl, m, HU["air"], None, where=free)
    stated["Hiatal hernia"] = {"size_mm": round(2 * r[0])}


def _medical_material(sc: _Scene) -> None:
    """Medical material: drawn into the image and stated."""
    g, hu, labels, h_c, h_r, yc, a, b, fat = sc.g, sc.hu, sc.labels, sc.h_c, sc.h_r, sc.yc, sc.a, sc.b, sc.fat
    sxy, spacing, stated = sc.sxy, sc.spacing, sc.stated
    box_c = (h_c[0] + 90, yc + b - fat / 2 - 3, -0.5 * a)  # left anterior chest wall
    sl = g.box((box_c[0] - 20, box_c[1] - max(4, sxy), box_c[2] - 25), (box_c[0] + 20, box_c[1] + max(4, sxy), box_c[2] + 25))
    if sl is not None:
        _paint(hu, labels, sl, np.ones(tuple(s.stop - s.start for s in sl), bool), HU["metal"], None)
    _tube(g, hu, labels, [box_c, (h_c[0] + 0.9 * h_r[0], h_c[1], h_c[2] + 0.3 * h_r[2]), (h_c[0], h_c[1], h_c[2] + 0.4 * h_r[2])],
          max(1.5, 0.55 * max(spacing)), HU["metal"] - 500, None, where=labels != TS_IDS["aorta"])
    stated["Medical material"] = {"device": "pacemaker"}


def _noise_and_quantise(sc: _Scene) -> np.ndarray:
    """Gaussian noise, -1024 outside the reconstruction circle, int16 HU."""
    seed, config, shape, hu, fov_circle = sc.seed, sc.config, sc.shape, sc.hu, sc.fov_circle
    noise_rng = np.random.default_rng([seed, 5])
    hu += noise_rng.standard_normal(shape, dtype=np.float32) * np.float32(config.noise_hu)
    hu[:, ~fov_circle] = -1024.0
    hu_i16 = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
    return hu_i16


def _report(sc: _Scene, hu_i16: np.ndarray) -> Phantom:
    """The Phantom: image, labels, geometry, organ sentences, impression, clinical and patient fields."""
    rng, trng, stated, labels, spacing, origin, sz = sc.rng, sc.trng, sc.stated, sc.labels, sc.spacing, sc.origin, sc.sz
    sentences, impression = _write_text(stated, labels, trng)
    age = int(rng.integers(25, 90))
    return Phantom(
        hu=hu_i16, labels=labels, spacing=spacing, origin=origin, findings=stated,
        organ_sentences=sentences, impression=impression, clinical=str(trng.choice(CLINICAL)),
        technique=f"Non-contrast chest CT was obtained in the axial plane with {sz:g} mm slice thickness.",
        patient={"PatientSex": str(rng.choice(["M", "F"])), "PatientAge": f"{age:03d}Y",
                 "Manufacturer": str(rng.choice(["SIEMENS", "PHILIPS", "GE MEDICAL SYSTEMS", "TOSHIBA"]))})


# In drawing order (the lesion generator's draws follow it).
_ABNORMALITY_STEPS = {
    "Lung nodule": _lung_nodule,
    "Emphysema": _emphysema,
    "Lung opacity": _lung_opacity,
    "Consolidation": _consolidation,
    "Atelectasis": _atelectasis,
    "Pleural effusion": _pleural_effusion,
    "Cardiomegaly": _cardiomegaly,
    "Pericardial effusion": _pericardial_effusion,
    "Arterial wall calcification": _arterial_wall_calcification,
    "Coronary artery wall calcification": _coronary_artery_wall_calcification,
    "Hiatal hernia": _hiatal_hernia,
    "Medical material": _medical_material,
}


def make_phantom(seed: int = 0, config: SynthConfig = SynthConfig(), *, findings: Optional[Sequence[str]] = None,
                 anatomy_seed: Optional[int] = None) -> Phantom:
    """One synthetic chest CT. findings: force exactly these abnormalities (names from DRAWN)
    instead of drawing them; the anatomy, geometry and noise depend only on the seed, so the
    same seed with and without a finding differs only by that finding."""
    seed = int(seed if anatomy_seed is None else anatomy_seed)
    if findings is None:
        present = sample_findings(seed, config)
    else:
        present = set(findings)
        if present - set(DRAWN):
            raise ValueError(f"findings: {sorted(present - set(DRAWN))} are not drawn by the phantoms; drawn: {list(DRAWN)}")
    sc = _Scene(seed=seed, config=config, present=present, big_heart="Cardiomegaly" in present,
                rng=np.random.default_rng([seed, 1]),  # anatomy and geometry
                lrng=np.random.default_rng([seed, 3]),  # lesion placement
                trng=np.random.default_rng([seed, 4]))  # wording
    for step in (_geometry, _body_wall, _abdomen, _lungs, _heart, _skeleton, _vessels_airway):
        step(sc)
    sc.set(stated={}, lung_mask=(sc.labels >= 10) & (sc.labels <= 14))
    for name, step in _ABNORMALITY_STEPS.items():
        if name in present:
            step(sc)
    return _report(sc, _noise_and_quantise(sc))


def _write_text(stated: dict, labels: np.ndarray, rng) -> tuple[dict[str, list[str]], str]:
    from sigvlp.data.organs import ORGAN_GROUPS

    present_ids = set(np.unique(labels).tolist())
    organs = [o for o, ids in ORGAN_GROUPS.items() if present_ids & set(ids)]
    out: dict[str, list[str]] = {o: [] for o in organs}
    short = []

    def say(organ, text):
        out.setdefault(organ, []).append(text)

    f = stated
    if "Medical material" in f:
        say("heart", "A cardiac pacemaker is present with its lead ending in the right heart.")
        short.append("Cardiac pacemaker.")
    if "Cardiomegaly" in f:
        say("heart", f"The heart is enlarged, with a cardiothoracic ratio of about {f['Cardiomegaly']['ctr']:.2f}.")
        short.append("Cardiomegaly.")
    if "Pericardial effusion" in f:
        say("heart", f"Pericardial effusion up to {f['Pericardial effusion']['thickness_mm']} mm thick is present.")
        short.append("Pericardial effusion.")
    if "Coronary artery wall calcification" in f:
        say("heart", "Calcified atherosclerotic plaques are seen in the coronary arteries.")
        short.append("Coronary artery calcification.")
    if "Arterial wall calcification" in f:
        say("aorta", "Atherosclerotic calcified plaques are seen in the wall of the thoracic aorta.")
        short.append("Aortic atherosclerosis.")
    if "Hiatal hernia" in f:
        say("esophagus", "A hiatal hernia is present at the lower end of the esophagus.")
        say("stomach", f"Part of the stomach has herniated through the hiatus, about {f['Hiatal hernia']['size_mm']} mm.")
        short.append("Hiatal hernia.")
    if "Emphysema" in f:
        say("lung", "Centrilobular emphysematous changes are seen in both upper lobes.")
        short.append("Emphysema.")
    for nod in f.get("Lung nodule", {}).get("nodules", []):
        say("lung", f"A {nod['diameter_mm']} mm solid nodule is seen in the {nod['lobe']}.")
    if "Lung nodule" in f:
        short.append("Pulmonary nodule(s).")
    if "Lung opacity" in f:
        say("lung", f"Ground-glass opacity is seen in the {f['Lung opacity']['lobe']}.")
        short.append("Ground-glass opacity.")
    if "Consolidation" in f:
        say("lung", f"Consolidation is seen in the {f['Consolidation']['lobe']}.")
        short.append("Consolidation.")
    if "Atelectasis" in f:
        say("lung", f"Subsegmental atelectasis is seen in the {f['Atelectasis']['lobe']}.")
        short.append("Atelectasis.")
    if "Pleural effusion" in f:
        pe = f["Pleural effusion"]
        side = {"right": "Right", "left": "Left", "bilateral": "Bilateral"}[pe["side"]]
        say("lung", f"{side} pleural effusion up to {pe['depth_mm']} mm thick is present.")
        short.append(f"{side} pleural effusion.")
    for organ in organs:  # an organ without an abnormal sentence gets a normal one
        if not out.get(organ):
            variants = NORMAL_SENTENCES.get(organ)
            if variants:
                out[organ] = [str(variants[int(rng.integers(len(variants)))])]
    impression = " ".join(short) if short else "No significant abnormality in the chest."
    return {o: s for o, s in out.items() if s}, impression


# ------------------------------------------------------------------------------ writing
def volume_name(split: str, index: int) -> str:
    return f"{split}_{index + 1}_a_1.nii.gz"


def save_nifti(phantom: Phantom, path, orientation: str = "RAS", *, mask_path=None):
    import nibabel as nib

    for p, arr, kind in ((path, phantom.hu, "ct"), (mask_path, phantom.labels, "mask")):
        if p is None:
            continue
        data = phantom.file_array(arr, orientation)
        if kind == "ct":
            data = (data.astype(np.int32) - int(RESCALE_INTERCEPT)).astype(np.int16)  # stored = HU + 1024
        img = nib.Nifti1Image(data, phantom.affine(orientation))
        img.header.set_xyzt_units("mm")
        img.set_qform(img.affine, code=1)
        img.set_sform(img.affine, code=1)
        if kind == "ct":
            img.header.set_data_dtype(np.int16)
            img.header.set_slope_inter(RESCALE_SLOPE, RESCALE_INTERCEPT)
        Path(p).parent.mkdir(parents=True, exist_ok=True)
        nib.save(img, str(p))


def _make_and_write(job):
    out, split, index, seed, config = job
    from sigvlp.data.ctrate import volume_relpath

    vseed = int.from_bytes(hashlib.sha1(f"{seed}/{split}/{index}".encode()).digest()[:4], "little")
    phantom = make_phantom(vseed, config)
    name = volume_name(split, index)
    rel = volume_relpath(name)
    orientation = "LPS" if np.random.default_rng([vseed, 6]).random() < config.lps_fraction else "RAS"
    save_nifti(phantom, Path(out) / "dataset" / rel, orientation, mask_path=Path(out) / "masks" / rel)
    sz, sy, sx = phantom.spacing
    nz, ny, nx = phantom.hu.shape
    report = {"VolumeName": name, "ClinicalInformation_EN": phantom.clinical, "Technique_EN": phantom.technique,
              "Findings_EN": " ".join(s for ss in phantom.organ_sentences.values() for s in ss),
              "Impressions_EN": phantom.impression}
    labels = {"VolumeName": name, **phantom.labels_present}
    meta = {"VolumeName": name, "Manufacturer": phantom.patient["Manufacturer"], "SeriesDescription": "CHEST",
            "ManufacturerModelName": "Phantom", "PatientSex": phantom.patient["PatientSex"],
            "PatientAge": phantom.patient["PatientAge"], "ReconstructionDiameter": round(nx * sx, 1),
            "Rows": ny, "Columns": nx, "RescaleIntercept": int(RESCALE_INTERCEPT), "RescaleSlope": int(RESCALE_SLOPE),
            "XYSpacing": f"[{sy:g}, {sx:g}]", "ZSpacing": sz, "NumberofSlices": nz}
    bank = {"VolumeName": name, "organs": phantom.organ_sentences, "general": phantom.impression}
    return report, labels, meta, bank


def _write_csv(path: Path, columns, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(columns))
        w.writeheader()
        w.writerows(rows)


#: The top-level names write_dataset writes under its folder; synth.json is its marker.
WRITTEN = ("dataset", "masks", "findings", "synth.json")
MARKER = "synth.json"


def written_files(n_train: int, n_valid: int) -> list[str]:
    """Relative paths of the files write_dataset(out, n_train, n_valid, ...) writes (marker excluded)."""
    from sigvlp.data.ctrate import volume_relpath

    files = []
    for split, csv_split, n in (("train", "train", n_train), ("valid", "validation", n_valid)):
        for i in range(n):
            rel = volume_relpath(volume_name(split, i))
            files += [f"dataset/{rel}", f"masks/{rel}"]
        files += [f"dataset/radiology_text_reports/{csv_split}_reports.csv",
                  f"dataset/multi_abnormality_labels/{split}_predicted_labels.csv",
                  f"dataset/metadata/{csv_split}_metadata.csv", f"findings/{split}_findings.jsonl"]
    return files


def _read_marker(out: Path) -> Optional[dict]:
    """The parsed synth.json of `out`, or None when absent. ValueError when it is not synth's."""
    marker = out / MARKER
    if not marker.is_file() or marker.is_symlink():
        if marker.exists() or marker.is_symlink():
            raise ValueError(f"{out}: {MARKER} is not a file written by sigvlp synth; refusing to delete anything")
        return None
    try:
        info = json.loads(marker.read_text())
        n_train, n_valid = info["n_train"], info["n_valid"]
        ok = all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in (n_train, n_valid))
    except (ValueError, TypeError, KeyError, OSError, UnicodeDecodeError):
        ok = False
    if not ok:
        raise ValueError(f"{out}: {MARKER} is not a marker written by sigvlp synth (no n_train/n_valid); "
                         f"refusing to delete anything")
    return info


def check_overwritable(out) -> Optional[dict]:
    """Raise ValueError unless `out` is absent, empty, or a previous sigvlp synth output (has synth's
    synth.json marker); return that marker (None when there is none)."""
    out = Path(out)
    if not out.is_dir() or not any(out.iterdir()):
        return None
    info = _read_marker(out)
    if info is None:
        raise ValueError(f"{out}: folder is not empty and has no {MARKER}: it does not look like a sigvlp synth "
                         f"output, so nothing is overwritten (use an empty or new folder)")
    return info


def clear_previous(out: Path) -> None:
    """Remove the files a previous write_dataset wrote under `out`, as listed by its synth.json
    marker (n_train/n_valid give the layout), then the folders this leaves empty, then the marker.
    Nothing else is touched: a folder without the marker raises ValueError (see check_overwritable)."""
    out = Path(out)
    info = check_overwritable(out)
    if info is None:
        return
    dirs = set()
    for rel in written_files(info["n_train"], info["n_valid"]):
        p = out / rel
        if p.is_symlink() or p.is_file():
            p.unlink()
        parent = p.parent
        while parent != out:
            dirs.add(parent)
            parent = parent.parent
    for d in sorted(dirs, key=lambda d: len(d.parts), reverse=True):  # deepest first; only empty ones
        if d.is_dir() and not d.is_symlink() and not any(d.iterdir()):
            d.rmdir()
    (out / MARKER).unlink()


def write_dataset(out, n_train: int = 200, n_valid: int = 50, seed: int = 0, config: SynthConfig = SynthConfig(),
                  workers: int = 0, progress: bool = False, *, overwrite: bool = False) -> Path:
    """Write a complete CT-RATE-style phantom dataset under `out` (see the module docstring).
    A non-empty `out` is refused (FileExistsError: old volumes would sit beside the new CSVs)
    unless overwrite=True, which first removes the files a previous write_dataset wrote there
    (those its synth.json marker lists, see clear_previous) and nothing else; a non-empty folder
    without that marker is never overwritten (ValueError)."""
    if n_train < 0 or n_valid < 0:
        raise ValueError(f"n_train and n_valid must be >= 0, got {n_train}, {n_valid}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            check_overwritable(out)  # a folder that is not synth's output: say so rather than suggest overwrite
            raise FileExistsError(f"{out}: folder is not empty; pass overwrite=True (--overwrite) to replace "
                                  f"what a previous run wrote")
        clear_previous(out)
    info = {"n_train": n_train, "n_valid": n_valid, "seed": seed, "config": dataclasses.asdict(config)}
    out.mkdir(parents=True, exist_ok=True)
    # Marker first (flagged incomplete) so an interrupted run can still be cleared by the next one;
    # rewritten without the flag at the end, so a half-written dataset never looks complete.
    (out / MARKER).write_text(json.dumps({**info, "complete": False}, indent=1))
    workers = workers or min(os.cpu_count() or 1, 8)
    csv_split = {"train": "train", "valid": "validation"}
    for split, n in (("train", n_train), ("valid", n_valid)):
        jobs = [(str(out), split, i, seed, config) for i in range(n)]
        if workers > 1 and n > 1:
            import multiprocessing as mp

            with mp.get_context("fork" if hasattr(os, "fork") else "spawn").Pool(workers) as pool:
                results = pool.map(_make_and_write, jobs, chunksize=max(1, n // (4 * workers)))
        else:
            results = [_make_and_write(j) for j in jobs]
        if progress:
            print(f"{split}: {n} volumes written")
        reports, labels, metas, banks = zip(*results) if results else ((), (), (), ())
        _write_csv(out / "dataset" / "radiology_text_reports" / f"{csv_split[split]}_reports.csv", REPORT_COLUMNS, reports)
        _write_csv(out / "dataset" / "multi_abnormality_labels" / f"{split}_predicted_labels.csv", LABEL_COLUMNS, labels)
        _write_csv(out / "dataset" / "metadata" / f"{csv_split[split]}_metadata.csv", METADATA_COLUMNS, metas)
        (out / "findings").mkdir(parents=True, exist_ok=True)
        with open(out / "findings" / f"{split}_findings.jsonl", "w", encoding="utf-8") as f:
            for entry in banks:
                f.write(json.dumps(entry) + "\n")
    (out / MARKER).write_text(json.dumps(info, indent=1))
    return out


DEFAULT_DATASET = {"n_train": 64, "n_valid": 16, "seed": 0, "preset": "small"}


def default_dataset_dir() -> Path:
    root = os.environ.get("SIGVLP_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "sigvlp")
    return Path(root) / "phantoms"


def ensure_default_dataset(path=None, *, n_train: int = DEFAULT_DATASET["n_train"],
                           n_valid: int = DEFAULT_DATASET["n_valid"], seed: int = DEFAULT_DATASET["seed"],
                           preset: str = DEFAULT_DATASET["preset"], workers: int = 0) -> Path:
    """The embedded default dataset: generated once (deterministically) under `path`
    (default ~/.cache/sigvlp/phantoms, or $SIGVLP_CACHE/phantoms) and reused while its
    parameters match. It only ever replaces its own output: a non-empty `path` without synth's
    synth.json marker raises ValueError and nothing is deleted."""
    path = Path(path) if path is not None else default_dataset_dir()
    config = SYNTH_PRESETS[preset]
    want = {"n_train": n_train, "n_valid": n_valid, "seed": seed, "config": dataclasses.asdict(config)}
    info = check_overwritable(path)  # ValueError for a folder synth did not write
    if info is not None and info == json.loads(json.dumps(want)):  # an incomplete run has "complete": False
        return path
    return write_dataset(path, n_train, n_valid, seed, config, workers=workers, overwrite=True)


# ------------------------------------------------------------------------------ CLI
def _int_at_least(low: int):
    import argparse

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def _out_folder(text: str) -> str:
    import argparse

    if os.path.exists(text) and not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text} exists and is not a folder")
    return text


def _range_action(low: int):
    """argparse action for MIN MAX pairs: low <= MIN <= MAX, else a one-line usage error."""
    import argparse

    class Range(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            lo, hi = values
            if lo < low or hi < lo:
                parser.error(f"argument {option_string}: expected MIN MAX with {low} <= MIN <= MAX, got {lo} {hi}")
            setattr(namespace, self.dest, (lo, hi))

    return Range


def add_arguments(parser):
    import argparse

    parser.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    parser.add_argument("--out", required=True, type=_out_folder, default=argparse.SUPPRESS,
                        help="output folder (must be empty or absent, unless --overwrite)")
    parser.add_argument("--n-train", type=_int_at_least(0), default=200, help="training volumes")
    parser.add_argument("--n-valid", type=_int_at_least(0), default=50, help="validation volumes")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed")
    parser.add_argument("--preset", default="small", choices=sorted(SYNTH_PRESETS),
                        help="size preset (small: 64-96 px in-plane, 60-400 slices; tiny: 40-48 px, 24-64 slices of "
                             "5-8 mm; demo: 64 px, 3-5 mm slices, lesions drawn twice their size and at least 9 mm "
                             "in radius, as `sigvlp demo` uses)")
    parser.add_argument("--size", type=int, nargs=2, metavar=("MIN", "MAX"), action=_range_action(16),
                        default=argparse.SUPPRESS, help="in-plane matrix range (default: the preset's)")
    parser.add_argument("--slices", type=int, nargs=2, metavar=("MIN", "MAX"), action=_range_action(1),
                        default=argparse.SUPPRESS, help="slice-count range (default: the preset's)")
    parser.add_argument("--workers", type=_int_at_least(0), default=0, help="processes (0: one per core)")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into a previous synth output (a folder with synth.json), first removing only the files "
                             "that run wrote; other folders are refused")


def run(args) -> int:
    import sys
    import time

    config = SYNTH_PRESETS[args.preset]
    if getattr(args, "size", None):
        config = dataclasses.replace(config, size=tuple(args.size))
    if getattr(args, "slices", None):
        config = dataclasses.replace(config, slices=tuple(args.slices))
    out = Path(args.out)
    try:
        check_overwritable(out)
    except ValueError as e:
        print(f"sigvlp synth: error: argument --out: {e}", file=sys.stderr)
        return 2
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        print(f"sigvlp synth: error: argument --out: {out} is not empty; pass --overwrite to replace what a "
              f"previous run wrote there", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    out = write_dataset(out, args.n_train, args.n_valid, args.seed, config, workers=args.workers, progress=True,
                        overwrite=args.overwrite)
    print(f"wrote {args.n_train} + {args.n_valid} phantoms to {out} in {time.perf_counter() - t0:.1f} s")
    return 0
