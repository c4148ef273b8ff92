"""Newton-Schulz coefficient schedules for Muon (one (a, b, c) triple per step).

Each step maps every singular value s of X by the odd quintic p(s) = a s + b s^3 + c s^5.
"""

from __future__ import annotations

#: Keller Jordan's quintic, used for every step (torch.optim.Muon's default). After 5 steps
#: singular values s/||G||_F >= 0.003 land in about [0.68, 1.21], not at 1: by design.
KELLER = (3.4445, -4.7750, 2.0315)

#: Polar Express (Amsel et al. 2025), the 5-step schedule of modded-nanogpt, as published. It
#: expects X_0 = G / (||G||_F * POLAR_EXPRESS_NORM + 1e-6) rather than G / ||G||_F.
POLAR_EXPRESS_RAW = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
#: The safety factor of Polar Express's normalisation (keeps s_max below 1 under bf16 rounding).
POLAR_EXPRESS_NORM = 1.02


def fold_normalization(schedule, factor: float):
    """The schedule that, on X_0 = G / ||G||_F, computes what `schedule` computes on X_0 / factor.

    p(s / f) = (a / f) s + (b / f^3) s^3 + (c / f^5) s^5, so dividing the first step's a, b, c by
    f, f^3, f^5 is the same map in exact arithmetic: no extra pass over the matrix.
    """
    (a, b, c), *rest = [tuple(float(v) for v in t) for t in schedule]
    f = float(factor)
    if not f > 0:
        raise ValueError(f"factor: expected > 0, got {factor!r}")
    return ((a / f, b / f**3, c / f**5), *rest)


#: Polar Express with its 1.02 normalisation folded into the first step: pass it as
#: `ns_coefficients` (Muon) or `coefficients` (sigvlp.ops.newton_schulz) with 5 steps.
#: (The published "+ 1e-6" in the denominator is replaced by the op's eps clamp: the two scale
#: X_0 differently by a relative 1e-6 / ||G||_F, which matters only for near-zero updates.)
POLAR_EXPRESS = fold_normalization(POLAR_EXPRESS_RAW, POLAR_EXPRESS_NORM)

__all__ = ["KELLER", "POLAR_EXPRESS", "POLAR_EXPRESS_RAW", "POLAR_EXPRESS_NORM", "fold_normalization"]
