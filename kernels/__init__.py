"""Triton kernels of sigvlp, installed as ``sigvlp.kernels``.

Kernels here know nothing of sigvlp: they take tensors and plain numbers and are registered
as torch ops by ``sigvlp.ops``. Import them through ``sigvlp.ops``, not directly.
"""

# A PyPI package named "kernels" exists (transformers imports it), so the source folder must
# never pass for it when the repository root happens to be on sys.path.
if __name__ != "sigvlp.kernels":
    raise ImportError(
        "the folder kernels/ of sigvlp is the package 'sigvlp.kernels', not a top-level module "
        f"(imported here as {__name__!r}); use `import sigvlp.kernels`"
    )


def interpreter() -> bool:
    """Whether Triton runs in its CPU interpreter (TRITON_INTERPRET=1): the one place it is read."""
    import os  # noqa: PLC0415

    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
