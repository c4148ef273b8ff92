"""What a launcher needs to know about the device it launches on. No GPU calls at import.

Launch configurations are chosen so that their shared memory fits the device's opt-in limit
per block (an out-of-resources error at launch is a hard failure): 163 KiB on sm_80, 99 KiB on
sm_86 / sm_89 / sm_120, 227 KiB on sm_90. tests/test_launch_limits.py compiles each launcher's
choice for these targets and checks the compiled size against the limit.
"""

from __future__ import annotations

import functools

#: Opt-in shared memory per block (bytes) of the targets the tests compile for.
SHARED_MEMORY_LIMITS = {80: 166912, 86: 101376, 89: 101376, 90: 232448}

#: Shared memory Triton adds beyond the operand tiles (reduction and layout-conversion scratch);
#: an estimate must include it to be an upper bound.
SCRATCH_BYTES = 16 * 1024


@functools.lru_cache(maxsize=None)
def _optin_limit(index: int) -> int:
    import torch  # noqa: PLC0415

    limit = getattr(torch.cuda.get_device_properties(index), "shared_memory_per_block_optin", 0)
    if not limit:
        from triton.runtime import driver  # noqa: PLC0415

        limit = driver.active.utils.get_device_properties(index)["max_shared_mem"]
    return int(limit)


def shared_memory_limit(device) -> int:
    """Bytes of shared memory one program may use on `device` (the opt-in maximum per block).

    Non-CUDA devices (CPU tensors under the Triton interpreter) have no such limit: a large number.
    """
    if device.type != "cuda":
        return 1 << 30
    if device.index is None:
        import torch  # noqa: PLC0415

        return _optin_limit(torch.cuda.current_device())
    return _optin_limit(device.index)


@functools.lru_cache(maxsize=None)
def _arch(index: int) -> int:
    import torch  # noqa: PLC0415

    major, minor = torch.cuda.get_device_capability(index)
    return 10 * major + minor


def arch(device) -> int:
    """Compute capability of `device` as an int (90 for sm_90); 0 for non-CUDA devices."""
    if device.type != "cuda":
        return 0
    if device.index is None:
        import torch  # noqa: PLC0415

        return _arch(torch.cuda.current_device())
    return _arch(device.index)


def pick_config(candidates, estimate, limit: int):
    """The first of `candidates` (ordered by preference) whose estimated shared memory
    `estimate(candidate)` fits `limit`; the last (smallest) candidate if none does."""
    for cand in candidates:
        if estimate(cand) <= limit:
            return cand
    return candidates[-1]
