"""The normal anatomy of a phantom, drawn step by step into a shared ``Scene``: geometry (body
size, field of view, slices, spacing), body wall, abdomen, lungs with lobes, heart, skeleton,
vessels and airway; then noise and int16 quantisation. Each step takes its random draws from
``sc.rng`` in a fixed order (``ANATOMY_STEPS``), so a seed always gives the same body."""

from __future__ import annotations

import math

import numpy as np

from sigvlp.data.organs import RIB_IDS, TS_IDS, VERTEBRA_IDS
from sigvlp.demo.synth.canvas import Grid, Scene, paint, tube
from sigvlp.demo.synth.config import HU

__all__ = ["ANATOMY_STEPS", "abdomen", "body_wall", "geometry", "heart", "lungs", "noise_and_quantise", "skeleton",
           "vessels_airway"]


def geometry(sc: Scene) -> None:
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
    g = Grid(shape, spacing, origin)
    hu = np.full(shape, HU["air"], dtype=np.float32)
    labels = np.zeros(shape, dtype=np.uint8)

    # Lesions smaller than a voxel would vanish: every drawn radius is at least this.
    min_r = max(0.75 * max(spacing), config.min_lesion_mm or 0.0)
    sc.set(ls=float(config.lesion_scale), a=a, b=b, fat=fat, wall=wall, ac=ac, bc=bc, yc=yc, apex=apex, z_top=z_top,
           z_bot=z_bot, sz=sz, n_xy=n_xy, sxy=sxy, y_shift=y_shift, shape=shape, spacing=spacing, origin=origin, g=g,
           hu=hu, labels=labels, min_r=min_r)


def body_wall(sc: Scene) -> None:
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


def abdomen(sc: Scene) -> None:
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
    paint(hu, labels, sl, m, HU["spleen"], TS_IDS["spleen"], where=below)
    st_c = (dome_l - 45, yc + 0.35 * bc, -0.4 * ac)
    st_r = (40, 0.35 * bc, 0.3 * ac)
    sl, m = g.ellipsoid(st_c, st_r)
    paint(hu, labels, sl, m, HU["stomach"], TS_IDS["stomach"], where=below)
    sl, m = g.ellipsoid((st_c[0] + 0.5 * st_r[0], st_c[1], st_c[2]), (0.45 * st_r[0], 0.7 * st_r[1], 0.7 * st_r[2]))
    paint(hu, labels, sl, m, HU["air"], None, where=below & (labels == TS_IDS["stomach"]))  # gas bubble
    for side, tid in ((1, TS_IDS["kidney_right"]), (-1, TS_IDS["kidney_left"])):
        sl, m = g.ellipsoid((dome_r - 120, yc - 0.62 * bc, side * 0.42 * ac), (55, 0.22 * bc, 0.17 * ac))
        paint(hu, labels, sl, m, HU["kidney"], tid, where=below)
    sc.set(dome_r=dome_r, dome_l=dome_l, z_diaph=z_diaph, st_c=st_c, st_r=st_r)


def lungs(sc: Scene) -> None:
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


def heart(sc: Scene) -> None:
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
        paint(hu, labels, sl, m, HU["fluid"], TS_IDS["heart"], where=above_diaph & cavity)
    else:
        rng.uniform(6, 15)
    sl, m = g.ellipsoid(h_c, h_r)
    paint(hu, labels, sl, m, HU["myocardium"], TS_IDS["heart"], where=above_diaph & cavity)
    sl, m = g.ellipsoid(h_c, tuple(0.72 * r for r in h_r))
    paint(hu, labels, sl, m, HU["blood"], None, where=above_diaph)
    heart_width = 2 * h_r[2]
    sc.set(h_r=h_r, h_c=h_c, heart_width=heart_width, pe_t=pe_t)


def skeleton(sc: Scene) -> None:
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
            paint(hu, labels, sl, body, HU["cancellous"], vid)
            paint(hu, labels, sl, body & (rr > spine_r - 2.5), HU["cortical"], None)
        sl = g.box((z1 - 5, spine_y - spine_r, -spine_r), (z1, spine_y + spine_r, spine_r))
        if sl is not None:
            z, y, x = g.local(sl)
            paint(hu, labels, sl, np.broadcast_to(np.sqrt(x ** 2 + (y - spine_y) ** 2) <= spine_r,
                                                   (z.shape[0], y.shape[1], x.shape[2])), HU["disc"], 0)
        sl = g.box((z0, canal_y - 20, -spine_r), (z1 - 3, canal_y + 12, spine_r))
        if sl is not None:
            z, y, x = g.local(sl)
            rr = np.sqrt(x ** 2 + (y - canal_y) ** 2)
            arch = ((rr <= 13) | ((np.abs(x) < 4) & (y < canal_y) & (y > canal_y - 20))) & (rr > 7)
            paint(hu, labels, sl, np.broadcast_to(arch, (z.shape[0],) + arch.shape[1:]), HU["cortical"], vid)
            paint(hu, labels, sl, np.broadcast_to(rr <= 7, (z.shape[0],) + rr.shape[1:]), HU["csf"], 0)
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
        paint(hu, labels, sl, np.ones(tuple(s.stop - s.start for s in sl), bool), HU["sternum"], TS_IDS["sternum"])


def vessels_airway(sc: Scene) -> None:
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
    tube(g, hu, labels, aorta_path, r_ao, HU["blood"], TS_IDS["aorta"])
    tr_y = spine_y + spine_r + 28
    eso_y = spine_y + spine_r + 9
    tube(g, hu, labels, [(z_top + 5, eso_y, -5), (dome_l + 5, eso_y, -8), (st_c[0] + 10, st_c[1] - 10, st_c[2] + 10)],
         7, HU["muscle"], TS_IDS["esophagus"])
    tube(g, hu, labels, [(z_top + 5, tr_y, 0), (z_carina, tr_y, 0)], 9.5, HU["muscle"], TS_IDS["trachea"])
    tube(g, hu, labels, [(z_top + 5, tr_y, 0), (z_carina, tr_y, 0)], 7.5, HU["air"], None)
    for side in (1, -1):  # main bronchi: air lumen, labelled by what they pass through
        tube(g, hu, labels, [(z_carina, tr_y, 0), (z_carina - 30, tr_y - 10, side * 45)], 5.5, HU["air"], None)
    sc.set(z_arch=z_arch, desc_x=desc_x, desc_y=desc_y, r_ao=r_ao, eso_y=eso_y)


#: the anatomy steps of make_phantom, in drawing order (their draws from sc.rng follow it)
ANATOMY_STEPS = (geometry, body_wall, abdomen, lungs, heart, skeleton, vessels_airway)


def noise_and_quantise(sc: Scene) -> np.ndarray:
    """Gaussian noise, -1024 outside the reconstruction circle, int16 HU."""
    seed, config, shape, hu, fov_circle = sc.seed, sc.config, sc.shape, sc.hu, sc.fov_circle
    noise_rng = np.random.default_rng([seed, 5])
    hu += noise_rng.standard_normal(shape, dtype=np.float32) * np.float32(config.noise_hu)
    hu[:, ~fov_circle] = -1024.0
    hu_i16 = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
    return hu_i16
