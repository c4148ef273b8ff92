"""Newton-Schulz coefficients for Muon: the (a, b, c) of each iteration step.

Each step maps every singular value s of X by the odd quintic p(s) = a s + b s^3 + c s^5. A
constant here is either one triple used at every step or a sequence of per-step triples, the two
forms `sigvlp.ops.newton_schulz(coefficients=...)` and Muon's `ns_coefficients` accept.
"""

from __future__ import annotations

from sigvlp.ops.newton_schulz import DEFAULT_COEFFICIENTS

#: Keller Jordan's quintic, used for every step (torch.optim.Muon's default). After 5 steps
#: singular values s/||G||_F >= 0.003 land in about [0.68, 1.21], not at 1: by design. (The op's
#: default; declared once, in sigvlp.ops.newton_schulz.)
KELLER_COEFFICIENTS = DEFAULT_COEFFICIENTS

#: Polar Express (Amsel et al. 2025): the 5 per-step triples of modded-nanogpt, as published. They
#: expect X_0 = G / (||G||_F * POLAR_EXPRESS_NORM + 1e-6) rather than G / ||G||_F.
POLAR_EXPRESS_PUBLISHED_COEFFICIENTS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
#: The safety factor of Polar Express's normalisation (keeps s_max below 1 under bf16 rounding).
POLAR_EXPRESS_NORM = 1.02


def fold_normalization(coefficients, factor: float):
    """Per-step triples that, on X_0 = G / ||G||_F, compute what `coefficients` compute on X_0 / factor.

    p(s / f) = (a / f) s + (b / f^3) s^3 + (c / f^5) s^5, so dividing the first step's a, b, c by
    f, f^3, f^5 is the same map in exact arithmetic: no extra pass over the matrix.
    """
    (a, b, c), *rest = [tuple(float(v) for v in t) for t in coefficients]
    f = float(factor)
    if not f > 0:
        raise ValueError(f"factor: expected > 0, got {factor!r}")
    return ((a / f, b / f**3, c / f**5), *rest)


#: Polar Express with its 1.02 normalisation folded into the first step: pass it as
#: `ns_coefficients` (Muon) or `coefficients` (sigvlp.ops.newton_schulz) with 5 steps.
#: (The published "+ 1e-6" in the denominator is replaced by the op's eps clamp: the two scale
#: X_0 differently by a relative 1e-6 / ||G||_F, which matters only for near-zero updates.)
POLAR_EXPRESS_COEFFICIENTS = fold_normalization(POLAR_EXPRESS_PUBLISHED_COEFFICIENTS, POLAR_EXPRESS_NORM)

__all__ = ["KELLER_COEFFICIENTS", "POLAR_EXPRESS_COEFFICIENTS", "POLAR_EXPRESS_PUBLISHED_COEFFICIENTS", "POLAR_EXPRESS_NORM",
           "fold_normalization"]
