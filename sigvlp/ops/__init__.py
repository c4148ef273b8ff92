"""sigvlp ops: torch custom ops (namespace ``sigvlp``) with torch, Triton and CUDA backends.

Import this module in any model to use the ops; it never touches a GPU at import time.
"""

from sigvlp.ops._backend import BACKEND_NAMES, BackendError
from sigvlp.ops.rope import rope3d, rope3d_reference, default_sections

#: every op family, name -> its BackendSet (for sigvlp.info and tests)
from sigvlp.ops import rope as _rope

OPS = {"rope3d": _rope.BACKENDS}

__all__ = ["rope3d", "rope3d_reference", "default_sections", "BackendError", "BACKEND_NAMES", "OPS"]
