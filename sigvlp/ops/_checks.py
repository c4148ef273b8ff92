"""Argument checks shared by the ops: each raises TypeError/ValueError naming the argument.

Metadata checks (dtype, shape, device) are safe under torch.compile and run in the public
wrappers. Value checks (cu_seqlens monotonic, grid products) read tensor data, so they run
inside the op implementations, in eager mode.
"""

from __future__ import annotations

import torch


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_tensor(t, name: str, *, dtypes=None, ndim: int | None = None, device: torch.device | None = None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        expected = " or ".join(_dtype_name(d) for d in dtypes)
        raise TypeError(f"{name}: expected dtype {expected}, got {_dtype_name(t.dtype)}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got shape {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (the device of the inputs), got {t.device}")


def check_cu_seqlens(cu_seqlens, device: torch.device, name: str = "cu_seqlens"):
    check_tensor(cu_seqlens, name, dtypes=(torch.int32,), ndim=1, device=device)
    if cu_seqlens.shape[0] < 2:
        raise ValueError(f"{name}: expected shape (batch + 1,) with batch >= 1, got {tuple(cu_seqlens.shape)}")


def check_cu_seqlens_values(cu_seqlens: torch.Tensor, total_tokens: int, name: str = "cu_seqlens") -> None:
    cu = cu_seqlens.detach().to("cpu", torch.int64)
    if int(cu[0]) != 0:
        raise ValueError(f"{name}: must start at 0, got {int(cu[0])}")
    if bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(f"{name}: must be non-decreasing, got {cu.tolist()[:16]}")
    if int(cu[-1]) != total_tokens:
        raise ValueError(f"{name}: must end at total_tokens={total_tokens}, got {int(cu[-1])}")


def check_grid_thw(grid_thw, batch: int, device: torch.device, name: str = "grid_thw"):
    check_tensor(grid_thw, name, dtypes=(torch.int32,), ndim=2, device=device)
    if tuple(grid_thw.shape) != (batch, 3):
        raise ValueError(f"{name}: expected shape (batch, 3) = ({batch}, 3), got {tuple(grid_thw.shape)}")


def check_grid_thw_values(grid_thw: torch.Tensor, cu_seqlens: torch.Tensor, name: str = "grid_thw") -> None:
    grid = grid_thw.detach().to("cpu", torch.int64)
    cu = cu_seqlens.detach().to("cpu", torch.int64)
    if bool((grid < 0).any()):
        raise ValueError(f"{name}: entries must be >= 0, got {grid.tolist()[:8]}")
    lengths = cu[1:] - cu[:-1]
    products = grid.prod(dim=1)
    bad = (products != lengths).nonzero().flatten()
    if bad.numel():
        i = int(bad[0])
        raise ValueError(
            f"{name}: T*H*W must equal each sequence's length; sequence {i} has grid {grid[i].tolist()} "
            f"(product {int(products[i])}) but length {int(lengths[i])}"
        )


def check_positions(positions, total_tokens: int, device: torch.device, name: str = "positions"):
    check_tensor(positions, name, dtypes=(torch.float32,), ndim=2, device=device)
    if tuple(positions.shape) != (total_tokens, 3):
        raise ValueError(f"{name}: expected shape (total_tokens, 3) = ({total_tokens}, 3), got {tuple(positions.shape)}")
