"""Put this folder first on PYTHONPATH to run Python as on a bare GPU image: `import nibabel` and
`import pydicom` raise ImportError (a sys.meta_path finder), whether or not they are installed.
Any other sitecustomize later on the path still runs. Used by tests/test_benches.py and for
rehearsing `GPU_CHECK_FORCE_CPU=1 bash benches/gpu_check.sh` (docs/benchmarks.md)."""

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys

BLOCKED = ("nibabel", "pydicom")


class _Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"No module named {name!r} (blocked by {__file__})", name=name)
        return None


sys.meta_path.insert(0, _Blocked())
_here = os.path.dirname(os.path.abspath(__file__))
_rest = [p for p in sys.path if os.path.abspath(p or ".") != _here]
_next = importlib.machinery.PathFinder.find_spec("sitecustomize", _rest)
if _next is not None and _next.loader is not None:
    _module = importlib.util.module_from_spec(_next)
    _next.loader.exec_module(_module)
