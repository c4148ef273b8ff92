"""Triton kernels of sigvlp, installed as ``sigvlp.kernels``.

Kernels here know nothing of sigvlp: they take tensors and plain numbers and are registered
as torch ops by ``sigvlp.ops``. Import them through ``sigvlp.ops``, not directly.
"""

# A PyPI package named "kernels" exists (Hugging Face's; transformers probes it with
# importlib.util.find_spec("kernels") and imports it), so with the repository root on sys.path
# (Python started in the checkout, pytest's rootdir) this folder is found first under that name.
# It must never pass for that package: imported as "kernels", it loads the real one from the rest
# of sys.path in its own place, or raises ImportError when there is none.
if __name__ != "sigvlp.kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
    _rest = [p for p in sys.path if os.path.realpath(p or os.curdir) != _root]
    _spec = importlib.machinery.PathFinder.find_spec(__name__, _rest) if __name__ == "kernels" else None
    if _spec is None or _spec.loader is None:
        raise ImportError(
            "the folder kernels/ of sigvlp is the package 'sigvlp.kernels', not a top-level module "
            f"(imported here as {__name__!r}); use `import sigvlp.kernels`"
        )
    _real = importlib.util.module_from_spec(_spec)
    sys.modules[__name__] = _real  # the import statement returns sys.modules' entry: the real package
    _spec.loader.exec_module(_real)


def interpreter() -> bool:
    """Whether Triton runs in its CPU interpreter (TRITON_INTERPRET=1): the one place it is read."""
    import os  # noqa: PLC0415

    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
