"""Drawing primitives of the phantoms: a world-coordinate voxel grid, painting a mask into the HU
and label arrays, tubes along polylines, and the scene the drawing steps share."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np

__all__ = ["Grid", "Scene", "paint", "tube"]


class Grid:
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


def paint(hu, labels, sl, mask, value=None, label=None, where=None):
    """Set hu[sl] to `value` and labels[sl] to `label` (each when not None) where `mask` (broadcast to
    the box) and `where[sl]` hold; nothing for an empty box (sl None)."""
    if sl is None:
        return
    mask = np.broadcast_to(mask, hu[sl].shape)
    if where is not None:
        mask = mask & where[sl]
    if value is not None:
        hu[sl][mask] = value
    if label is not None:
        labels[sl][mask] = label


def tube(grid, hu, labels, points, radius, value, label=None, where=None):
    """Spheres of `radius` along a polyline of (z, y, x) points, spaced finer than a voxel."""
    points = np.asarray(points, dtype=np.float64)
    step = max(0.5 * min(grid.spacing), radius * 0.5)
    for p, q in zip(points[:-1], points[1:]):
        n = max(1, int(np.linalg.norm(q - p) / step))
        for t in np.linspace(0, 1, n + 1):
            c = p + t * (q - p)
            sl, m = grid.ellipsoid(c, (radius,) * 3)
            paint(hu, labels, sl, m, value, label, where)


class Scene(SimpleNamespace):
    """What the drawing steps of make_phantom share: random generators, geometry, the HU and
    label arrays being painted, and the stated findings."""

    def set(self, **values):
        self.__dict__.update(values)

