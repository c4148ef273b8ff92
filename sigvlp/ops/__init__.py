"""sigvlp ops: torch custom ops (namespace ``sigvlp``) with torch, Triton and CUDA backends.

Import this module in any model to use the ops; it never touches a GPU at import time.
"""

from sigvlp.ops._backend import BACKEND_NAMES, BackendError
from sigvlp.ops.rope import rope3d, rope3d_reference, default_sections
from sigvlp.ops.newton_schulz import newton_schulz, newton_schulz_reference
from sigvlp.ops.attention import rope_attention_varlen, rope_attention_varlen_reference

#: every op family, name -> its BackendSet (for sigvlp.info and tests)
from sigvlp.ops import rope as _rope
from sigvlp.ops.newton_schulz import BACKENDS as _NEWTON_SCHULZ_BACKENDS

OPS = {"rope3d": _rope.BACKENDS}
OPS["newton_schulz"] = _NEWTON_SCHULZ_BACKENDS
from sigvlp.ops.attention import BACKENDS as _ATTENTION_BACKENDS  # noqa: E402
OPS["rope_attention_varlen"] = _ATTENTION_BACKENDS

__all__ = ["rope3d", "rope3d_reference", "default_sections", "BackendError", "BACKEND_NAMES", "OPS"]
__all__ += ["newton_schulz", "newton_schulz_reference"]
__all__ += ["rope_attention_varlen", "rope_attention_varlen_reference"]
from sigvlp.ops.sigmoid_loss import sigmoid_loss, sigmoid_loss_reference  # noqa: E402
from sigvlp.ops.sigmoid_loss import BACKENDS as _SIGMOID_LOSS_BACKENDS  # noqa: E402
OPS["sigmoid_loss"] = _SIGMOID_LOSS_BACKENDS
__all__ += ["sigmoid_loss", "sigmoid_loss_reference"]
