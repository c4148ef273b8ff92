"""sigvlp ops: torch custom ops (namespace ``sigvlp``) with torch, Triton and CUDA backends.

Import this module in any model to use the ops; it never touches a GPU at import time.
"""

from sigvlp.ops import attention as _attention
from sigvlp.ops import newton_schulz as _newton_schulz
from sigvlp.ops import rope as _rope
from sigvlp.ops import sigmoid_loss as _sigmoid_loss
from sigvlp.ops.backends import BACKEND_NAMES, BackendError, dispatch_log
from sigvlp.ops.attention import rope_attention_varlen, rope_attention_varlen_reference
from sigvlp.ops.newton_schulz import newton_schulz, newton_schulz_reference
from sigvlp.ops.rope import default_sections, rope3d, rope3d_reference
from sigvlp.ops.sigmoid_loss import sigmoid_loss, sigmoid_loss_reference
from sigvlp.ops.varlen import SUPPORTED_HEAD_DIMS, cu_seqlens_from_lengths

#: every op family, name -> its BackendSet (for sigvlp.info and tests)
OPS = {
    "rope3d": _rope.BACKENDS,
    "rope_attention_varlen": _attention.BACKENDS,
    "sigmoid_loss": _sigmoid_loss.BACKENDS,
    "newton_schulz": _newton_schulz.BACKENDS,
}

__all__ = [
    "BACKEND_NAMES",
    "BackendError",
    "OPS",
    "SUPPORTED_HEAD_DIMS",
    "cu_seqlens_from_lengths",
    "default_sections",
    "dispatch_log",
    "newton_schulz",
    "newton_schulz_reference",
    "rope3d",
    "rope3d_reference",
    "rope_attention_varlen",
    "rope_attention_varlen_reference",
    "sigmoid_loss",
    "sigmoid_loss_reference",
]
