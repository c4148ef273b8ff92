"""sigvlp ops: torch custom ops (namespace ``sigvlp``) with torch, Triton and CUDA backends.

Import this module in any model to use the ops; it never touches a GPU at import time.
"""

# Each op module registers its OpSpec (sigvlp.ops.registry) when imported, in this order: these four
# lines are the one list of ops in the project; everything else reads sigvlp.ops.registry.SPECS.
from sigvlp.ops import rope as _rope  # noqa: F401, I001
from sigvlp.ops import attention as _attention  # noqa: F401
from sigvlp.ops import sigmoid_loss as _sigmoid_loss  # noqa: F401
from sigvlp.ops import newton_schulz as _newton_schulz  # noqa: F401
from sigvlp.ops.backends import BACKEND_NAMES, BackendError, dispatch_log
from sigvlp.ops.attention import rope_attention_varlen, rope_attention_varlen_reference
from sigvlp.ops.newton_schulz import newton_schulz, newton_schulz_reference
from sigvlp.ops.registry import SPECS
from sigvlp.ops.rope import default_sections, rope3d, rope3d_reference
from sigvlp.ops.sigmoid_loss import sigmoid_loss, sigmoid_loss_reference
from sigvlp.ops.varlen import SUPPORTED_HEAD_DIMS, cu_seqlens_from_lengths

#: every op, name -> its BackendSet (for sigvlp.info and tests), derived from the registry
OPS = {name: spec.backends for name, spec in SPECS.items()}

__all__ = [
    "BACKEND_NAMES",
    "BackendError",
    "OPS",
    "SPECS",
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
