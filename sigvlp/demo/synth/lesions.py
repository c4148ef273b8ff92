"""The abnormalities of the phantoms: which ones a seed draws (``sample_findings``) and one
painter per abnormality (``ABNORMALITY_STEPS``, in drawing order) that draws it into the scene's
HU and labels and records what a report states about it in ``sc.stated``. Lesion placement draws
from ``sc.lrng`` only, so adding or removing a finding leaves the anatomy unchanged."""

from __future__ import annotations

import math

import numpy as np

from sigvlp.data.organs import TS_IDS, VERTEBRA_IDS
from sigvlp.demo.synth.canvas import Scene, paint, tube
from sigvlp.demo.synth.config import HU, PREVALENCE, SynthConfig

__all__ = ["ABNORMALITY_STEPS", "LOBE_NAMES", "lung_points", "sample_findings"]

LOBE_NAMES = {10: "left upper lobe", 11: "left lower lobe", 12: "right upper lobe", 13: "right middle lobe",
              14: "right lower lobe"}


def sample_findings(seed: int, config: SynthConfig = SynthConfig()) -> set[str]:
    """The abnormalities a phantom of this seed is drawn with: none for a normal volume
    (probability config.normal_fraction), else each independently with PREVALENCE."""
    rng = np.random.default_rng([int(seed), 2])
    normal = rng.random() < config.normal_fraction
    draws = {name: rng.random() < p for name, p in PREVALENCE.items()}
    return set() if normal else {k for k, v in draws.items() if v}


def lung_points(sc: Scene, lobes=None, tries=50):
    """Up to `tries` random lung voxels (world (z, y, x) mm, lobe label), of `lobes` or any lobe."""
    labels, lung_mask, lrng, shape, g = sc.labels, sc.lung_mask, sc.lrng, sc.shape, sc.g
    cand = np.flatnonzero(np.isin(labels, lobes) if lobes is not None else lung_mask)
    if cand.size == 0:
        return None
    for _ in range(tries):
        idx = np.unravel_index(int(cand[lrng.integers(cand.size)]), shape)
        yield tuple(ax[i] for ax, i in zip(g.axes, idx)), int(labels[idx])


def lung_nodule(sc: Scene) -> None:
    """Lung nodule: drawn into the image and stated."""
    lrng, g, hu, labels, lung_mask, min_r, stated = sc.lrng, sc.g, sc.hu, sc.labels, sc.lung_mask, sc.min_r, sc.stated
    nodules = []
    for _ in range(int(lrng.integers(1, 4))):
        r = max(lrng.uniform(2.5, 8.0) * sc.ls, min_r)
        for c, lab in lung_points(sc) or ():
            sl, m = g.ellipsoid(c, (r, r, r))
            inside = lung_mask[sl][m]
            if inside.size and inside.mean() > 0.8:
                paint(hu, labels, sl, m, HU["consolidation"] + lrng.uniform(-10, 10), None, where=lung_mask)
                nodules.append({"diameter_mm": round(2 * r), "lobe": LOBE_NAMES[lab], "center": c})
                break
    if nodules:
        stated["Lung nodule"] = {"nodules": nodules}


def emphysema(sc: Scene) -> None:
    """Emphysema: drawn into the image and stated."""
    lrng, g, hu, labels, min_r, stated = sc.lrng, sc.g, sc.hu, sc.labels, sc.min_r, sc.stated
    n = int(lrng.integers(40, 90))
    upper = np.isin(labels, (10, 12))
    for c, _lab in list(lung_points(sc, (10, 12), tries=n) or ())[:n]:
        r = max(lrng.uniform(5, 12) * sc.ls, min_r)
        sl, m = g.ellipsoid(c, (r, r, r))
        paint(hu, labels, sl, m, HU["emphysema"], None, where=upper)
    stated["Emphysema"] = {}


def lung_opacity(sc: Scene) -> None:
    """Lung opacity: drawn into the image and stated."""
    lrng, g, hu, labels, lung_mask, min_r, stated = sc.lrng, sc.g, sc.hu, sc.labels, sc.lung_mask, sc.min_r, sc.stated
    for c, lab in lung_points(sc) or ():
        r = (lrng.uniform(15, 35), lrng.uniform(15, 30), lrng.uniform(15, 30))
        sl, m = g.ellipsoid(c, tuple(max(ri * sc.ls, 2 * min_r) for ri in r))
        paint(hu, labels, sl, m, HU["ggo"], None, where=lung_mask & (labels == lab))
        stated["Lung opacity"] = {"lobe": LOBE_NAMES[lab]}
        break


def consolidation(sc: Scene) -> None:
    """Consolidation: drawn into the image and stated."""
    lrng, g, hu, labels, min_r, stated = sc.lrng, sc.g, sc.hu, sc.labels, sc.min_r, sc.stated
    for c, lab in lung_points(sc, (11, 14)) or ():
        r = (lrng.uniform(20, 40), lrng.uniform(15, 30), lrng.uniform(15, 30))
        sl, m = g.ellipsoid(c, tuple(max(ri * sc.ls, 2 * min_r) for ri in r))
        paint(hu, labels, sl, m, HU["consolidation"], None, where=labels == lab)
        stated["Consolidation"] = {"lobe": LOBE_NAMES[lab]}
        break


def atelectasis(sc: Scene) -> None:
    """Atelectasis: drawn into the image and stated."""
    lrng, g, hu, labels, sz, z_diaph, yc = sc.lrng, sc.g, sc.hu, sc.labels, sc.sz, sc.z_diaph, sc.yc
    stated = sc.stated
    lab = int(lrng.choice([11, 14]))
    t = max(lrng.uniform(6, 12) * sc.ls, 1.2 * sz)
    band = (labels == lab) & (g.z < z_diaph + t) & (g.y < yc)
    hu[band] = HU["consolidation"] - 5
    stated["Atelectasis"] = {"lobe": LOBE_NAMES[lab]}


def pleural_effusion(sc: Scene) -> None:
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


def cardiomegaly(sc: Scene) -> None:
    """Cardiomegaly: drawn into the image and stated."""
    heart_width, ac, stated = sc.heart_width, sc.ac, sc.stated
    stated["Cardiomegaly"] = {"ctr": round(heart_width / (2 * ac), 2)}


def pericardial_effusion(sc: Scene) -> None:
    """Pericardial effusion: drawn into the image and stated."""
    pe_t, stated = sc.pe_t, sc.stated
    stated["Pericardial effusion"] = {"thickness_mm": round(pe_t)}


def arterial_wall_calcification(sc: Scene) -> None:
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
        paint(hu, labels, sl, m, HU["calcium"] + lrng.uniform(-200, 200), None, where=desc)
    stated["Arterial wall calcification"] = {}


def coronary_artery_wall_calcification(sc: Scene) -> None:
    """Coronary artery wall calcification: drawn into the image and stated."""
    lrng, g, hu, labels, h_c, h_r, min_r = sc.lrng, sc.g, sc.hu, sc.labels, sc.h_c, sc.h_r, sc.min_r
    stated = sc.stated
    heart = labels == TS_IDS["heart"]
    for _ in range(int(lrng.integers(1, 4))):
        ang = lrng.uniform(0.2, 1.4)  # anterior-superior surface: coronary territory
        c = (h_c[0] + 0.5 * h_r[0], h_c[1] + 0.85 * h_r[1] * math.sin(ang), h_c[2] + 0.85 * h_r[2] * math.cos(ang))
        r = max(lrng.uniform(2, 3.5) * sc.ls, min_r)
        sl, m = g.ellipsoid(c, (r, r, r))
        paint(hu, labels, sl, m, HU["calcium"] - 100 + lrng.uniform(-100, 200), None, where=heart)
    stated["Coronary artery wall calcification"] = {}


def hiatal_hernia(sc: Scene) -> None:
    """Hiatal hernia: drawn into the image and stated."""
    lrng, g, hu, labels, sz, sxy, dome_l, eso_y = sc.lrng, sc.g, sc.hu, sc.labels, sc.sz, sc.sxy, sc.dome_l, sc.eso_y
    cavity, stated = sc.cavity, sc.stated
    r = (max(lrng.uniform(18, 28) * sc.ls, 2 * sz), max(lrng.uniform(14, 22) * sc.ls, 2 * sxy),
         max(lrng.uniform(14, 22) * sc.ls, 2 * sxy))
    c = (dome_l + 0.8 * r[0], eso_y + 4, -12)
    sl, m = g.ellipsoid(c, r)
    free = cavity & ~np.isin(labels, (TS_IDS["aorta"], TS_IDS["heart"], *VERTEBRA_IDS.values()))
    paint(hu, labels, sl, m, HU["stomach"], TS_IDS["stomach"], where=free)
    sl, m = g.ellipsoid((c[0] + 0.4 * r[0], c[1], c[2]), tuple(0.5 * ri for ri in r))
    paint(hu, labels, sl, m, HU["air"], None, where=free)
    stated["Hiatal hernia"] = {"size_mm": round(2 * r[0])}


def medical_material(sc: Scene) -> None:
    """Medical material: drawn into the image and stated."""
    g, hu, labels, h_c, h_r, yc, a, b, fat = sc.g, sc.hu, sc.labels, sc.h_c, sc.h_r, sc.yc, sc.a, sc.b, sc.fat
    sxy, spacing, stated = sc.sxy, sc.spacing, sc.stated
    box_c = (h_c[0] + 90, yc + b - fat / 2 - 3, -0.5 * a)  # left anterior chest wall
    sl = g.box((box_c[0] - 20, box_c[1] - max(4, sxy), box_c[2] - 25), (box_c[0] + 20, box_c[1] + max(4, sxy), box_c[2] + 25))
    if sl is not None:
        paint(hu, labels, sl, np.ones(tuple(s.stop - s.start for s in sl), bool), HU["metal"], None)
    tube(g, hu, labels, [box_c, (h_c[0] + 0.9 * h_r[0], h_c[1], h_c[2] + 0.3 * h_r[2]), (h_c[0], h_c[1], h_c[2] + 0.4 * h_r[2])],
         max(1.5, 0.55 * max(spacing)), HU["metal"] - 500, None, where=labels != TS_IDS["aorta"])
    stated["Medical material"] = {"device": "pacemaker"}


#: abnormality -> its painter, in drawing order (the lesion generator's draws follow it)
ABNORMALITY_STEPS = {
    "Lung nodule": lung_nodule,
    "Emphysema": emphysema,
    "Lung opacity": lung_opacity,
    "Consolidation": consolidation,
    "Atelectasis": atelectasis,
    "Pleural effusion": pleural_effusion,
    "Cardiomegaly": cardiomegaly,
    "Pericardial effusion": pericardial_effusion,
    "Arterial wall calcification": arterial_wall_calcification,
    "Coronary artery wall calcification": coronary_artery_wall_calcification,
    "Hiatal hernia": hiatal_hernia,
    "Medical material": medical_material,
}
