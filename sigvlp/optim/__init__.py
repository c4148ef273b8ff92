"""sigvlp.optim: Muon on sigvlp.ops.newton_schulz (batched, distributed), Muon + AdamW in one
optimizer, the parameter split between them, and NS coefficient schedules."""

from sigvlp.optim.muon import ADJUST_LR_FNS, Muon, MuonWithAdamW, adjusted_lr
from sigvlp.optim.schedules import (KELLER, POLAR_EXPRESS, POLAR_EXPRESS_NORM, POLAR_EXPRESS_RAW,
                                    fold_normalization)
from sigvlp.optim.split import DEFAULT_ADAMW_PATTERNS, explain_split, split_params

__all__ = ["Muon", "MuonWithAdamW", "split_params", "explain_split", "DEFAULT_ADAMW_PATTERNS", "adjusted_lr",
           "ADJUST_LR_FNS", "KELLER", "POLAR_EXPRESS", "POLAR_EXPRESS_RAW", "POLAR_EXPRESS_NORM",
           "fold_normalization"]
