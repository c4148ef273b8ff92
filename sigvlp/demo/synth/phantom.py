"""``make_phantom``: one synthetic chest CT (``Phantom``), a pure function of (seed, config), built
by running the anatomy steps, the painters of its abnormalities and the report writer over one
shared scene."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from sigvlp.data.ctrate import CTRATE_LABELS
from sigvlp.demo.synth.anatomy import ANATOMY_STEPS, noise_and_quantise
from sigvlp.demo.synth.canvas import Scene
from sigvlp.demo.synth.config import DRAWN, SynthConfig
from sigvlp.demo.synth.lesions import ABNORMALITY_STEPS, sample_findings
from sigvlp.demo.synth.reports import report_fields

__all__ = ["Phantom", "make_phantom"]


@dataclass
class Phantom:
    """One synthetic chest CT: the image, its organ labels, geometry, and what its report states."""

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


def make_phantom(seed: int = 0, config: SynthConfig = SynthConfig(), *, findings: Optional[Sequence[str]] = None,
                 anatomy_seed: Optional[int] = None) -> Phantom:
    """One synthetic chest CT. findings: force exactly these abnormalities (names from DRAWN)
    instead of drawing them; the anatomy, geometry and noise depend only on the seed, so the
    same seed with and without a finding differs only by that finding.

    Runs the steps over one Scene: ANATOMY_STEPS (sigvlp.demo.synth.anatomy), the painters of
    the present abnormalities (ABNORMALITY_STEPS, sigvlp.demo.synth.lesions), noise and
    quantisation, then the report text (sigvlp.demo.synth.reports). ValueError for a finding
    name that is not in DRAWN."""
    seed = int(seed if anatomy_seed is None else anatomy_seed)
    if findings is None:
        present = sample_findings(seed, config)
    else:
        present = set(findings)
        if present - set(DRAWN):
            raise ValueError(f"findings: {sorted(present - set(DRAWN))} are not drawn by the phantoms; drawn: {list(DRAWN)}")
    sc = Scene(seed=seed, config=config, present=present, big_heart="Cardiomegaly" in present,
               rng=np.random.default_rng([seed, 1]),  # anatomy and geometry
               lrng=np.random.default_rng([seed, 3]),  # lesion placement
               trng=np.random.default_rng([seed, 4]))  # wording
    for step in ANATOMY_STEPS:
        step(sc)
    sc.set(stated={}, lung_mask=(sc.labels >= 10) & (sc.labels <= 14))
    for name, step in ABNORMALITY_STEPS.items():
        if name in present:
            step(sc)
    hu = noise_and_quantise(sc)
    return Phantom(hu=hu, labels=sc.labels, spacing=sc.spacing, origin=sc.origin, **report_fields(sc))

