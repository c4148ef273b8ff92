"""What the phantoms are drawn with: abnormality prevalences, tissue HU, the file encoding, and the
size presets (``SynthConfig``, ``SYNTH_PRESETS``)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

__all__ = ["DRAWN", "HU", "PREVALENCE", "RESCALE_INTERCEPT", "RESCALE_SLOPE", "SYNTH_PRESETS", "SynthConfig"]

#: per-volume probability of each drawn abnormality among non-normal volumes (roughly CT-RATE's
#: label frequencies)
PREVALENCE = {
    "Medical material": 0.10, "Arterial wall calcification": 0.30, "Cardiomegaly": 0.11,
    "Pericardial effusion": 0.08, "Coronary artery wall calcification": 0.27, "Hiatal hernia": 0.14,
    "Emphysema": 0.20, "Atelectasis": 0.25, "Lung nodule": 0.45, "Lung opacity": 0.30,
    "Pleural effusion": 0.13, "Consolidation": 0.17,
}
#: the abnormalities the phantoms draw (12 of CT-RATE's 18)
DRAWN = tuple(PREVALENCE)

#: the files' scl_slope / scl_inter: stored int16 value = HU + 1024
RESCALE_SLOPE, RESCALE_INTERCEPT = 1.0, -1024.0
#: tissue -> HU painted for it
HU = {"air": -1000.0, "lung": -850.0, "fat": -95.0, "muscle": 45.0, "blood": 50.0, "myocardium": 42.0,
      "liver": 60.0, "spleen": 48.0, "kidney": 32.0, "stomach": 38.0, "abdomen": 25.0, "fluid": 8.0,
      "cancellous": 250.0, "cortical": 700.0, "disc": 80.0, "csf": 12.0, "rib": 650.0,
      "sternum": 420.0, "calcium": 600.0, "metal": 3000.0, "ggo": -600.0, "emphysema": -975.0,
      "consolidation": 35.0}


@dataclass(frozen=True)
class SynthConfig:
    """Size, slice and noise ranges of the phantoms, and how lesions are sized (frozen; ValueError for
    a bad lesion_scale / min_lesion_mm)."""

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


#: preset name -> SynthConfig (`sigvlp synth --preset`)
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

