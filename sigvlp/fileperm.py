"""File-mode helper for atomic writers: tempfile.mkstemp and safetensors.save_file create files
0600 whatever the umask; ``apply_umask(path)`` gives a freshly written file the mode a plain
``open(path, "w")`` would (0o666 & ~umask)."""

from __future__ import annotations

import os
import threading

__all__ = ["apply_umask", "default_file_mode"]

_lock = threading.Lock()


def default_file_mode() -> int:
    """0o666 & ~umask (the umask read without changing it for more than an instant)."""
    with _lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return 0o666 & ~mask


def apply_umask(path) -> None:
    """chmod path to 0o666 & ~umask."""
    os.chmod(path, default_file_mode())
