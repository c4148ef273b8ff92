"""sigvlp.optim: Muon on sigvlp.ops.newton_schulz (batched, distributed), Muon + AdamW in one
optimizer, the parameter split between them, and Newton-Schulz coefficients."""

from sigvlp.optim.muon import ADJUST_LR_FNS, Muon, MuonWithAdamW, adjusted_lr
from sigvlp.optim.ns_coefficients import (KELLER_COEFFICIENTS, POLAR_EXPRESS_COEFFICIENTS, POLAR_EXPRESS_NORM,
                                          POLAR_EXPRESS_PUBLISHED_COEFFICIENTS, fold_normalization)
from sigvlp.optim.split import DEFAULT_ADAMW_PATTERNS, explain_split, split_params

__all__ = ["Muon", "MuonWithAdamW", "split_params", "explain_split", "DEFAULT_ADAMW_PATTERNS", "adjusted_lr",
           "ADJUST_LR_FNS", "KELLER_COEFFICIENTS", "POLAR_EXPRESS_COEFFICIENTS",
           "POLAR_EXPRESS_PUBLISHED_COEFFICIENTS", "POLAR_EXPRESS_NORM",
           "fold_normalization"]
