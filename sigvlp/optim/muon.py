"""Muon (and Muon + AdamW in one optimizer), batched and distributed, on sigvlp.ops.newton_schulz.

Per Muon parameter p with gradient g (torch.optim.Muon's semantics):
    buf = lerp(buf, g, 1 - momentum)                     (EMA momentum)
    u   = lerp(g, buf, momentum) if nesterov else buf
    O   = NS(u viewed as (shape[0], prod(shape[1:])))    (sigvlp.ops.newton_schulz)
    p  *= 1 - lr * weight_decay                          (decoupled, unadjusted lr)
    p  -= adjust(lr, rows, cols) * O
adjust: "original"/None lr * sqrt(max(1, rows/cols)); "match_rms_adamw" lr * 0.2 * sqrt(max(rows,
cols)); "spectral_unclamped" lr * sqrt(rows/cols); rows, cols of the flattened shape.

Beyond torch.optim.Muon:
- parameters with ndim > 2 (conv filters, a Conv3d patch embedding) are flattened to
  (shape[0], prod(rest)); the lr adjustment uses that flattened shape;
- all updates of one step with the same matrix shape (tall ones transposed to wide, since
  NS(G^T) = NS(G)^T) and NS settings are orthogonalised in one batched op call;
- the NS input is a fresh copy in `ns_dtype` (default bf16 on CUDA, fp32 on CPU): no gradient or
  momentum buffer is ever modified by the orthogonalisation (torch's bf16 aliasing defect);
- `backend=` picks the sigvlp.ops.newton_schulz backend;
- `process_group=`: each rank orthogonalises a share of the matrices (largest first, each to the
  least-loaded rank, the same deterministic plan on every rank), then the results are
  all-gathered (as raw bytes, in ns_dtype), and every rank applies every update. Momentum is kept
  for all parameters on every rank (gradients are assumed identical across ranks, as after a DDP
  all-reduce), so all ranks hold identical weights and optimizer state, equal to the
  single-process result.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Iterable
from typing import Optional

import torch
import torch.distributed as dist
from torch.optim import Optimizer

from sigvlp.ops import newton_schulz
from sigvlp.ops.newton_schulz import DEFAULT_COEFFICIENTS, resolve_coefficients
from sigvlp.optim.split import split_params

__all__ = ["Muon", "MuonWithAdamW", "ADJUST_LR_FNS", "adjusted_lr"]

ADJUST_LR_FNS = (None, "original", "match_rms_adamw", "spectral_unclamped")

_MUON_DEFAULTS = dict(lr=1e-3, weight_decay=0.1, momentum=0.95, nesterov=True,
                      ns_coefficients=DEFAULT_COEFFICIENTS, eps=1e-7, ns_steps=5, adjust_lr_fn=None,
                      ns_dtype=None)
_NS_DTYPES = (None, torch.float32, torch.bfloat16, torch.float16, torch.float64)


def adjusted_lr(lr: float, adjust_lr_fn: Optional[str], rows: int, cols: int) -> float:
    """The lr applied to the orthogonalised update of a (rows, cols) matrix."""
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return lr * math.sqrt(max(1.0, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    if adjust_lr_fn == "spectral_unclamped":
        return lr * math.sqrt(rows / cols)
    raise ValueError(f"adjust_lr_fn: expected one of {ADJUST_LR_FNS}, got {adjust_lr_fn!r}")


def _scalar(v):
    return v.item() if isinstance(v, torch.Tensor) else v


def _check_number(name: str, v, *, lo: float = 0.0, hi: Optional[float] = None, hi_open: bool = False):
    v = _scalar(v)
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name}: expected a number, got {type(v).__name__}")
    if not math.isfinite(v) or v < lo or (hi is not None and (v >= hi if hi_open else v > hi)):
        bound = "" if hi is None else (f" and < {hi}" if hi_open else f" and <= {hi}")
        raise ValueError(f"{name}: expected a finite number >= {lo}{bound}, got {v!r}")


def _check_muon_group(group: dict) -> None:
    lr = group["lr"]
    if isinstance(lr, torch.Tensor) and lr.numel() != 1:
        raise ValueError(f"lr: a tensor lr must have 1 element, got shape {tuple(lr.shape)}")
    _check_number("lr", lr)
    _check_number("weight_decay", group["weight_decay"])
    _check_number("momentum", group["momentum"], hi=1.0, hi_open=True)
    if not isinstance(group["nesterov"], bool):
        raise TypeError(f"nesterov: expected a bool, got {type(group['nesterov']).__name__}")
    _check_number("eps", group["eps"])
    if not _scalar(group["eps"]) > 0:
        raise ValueError(f"eps: expected > 0, got {group['eps']!r}")
    steps = group["ns_steps"]
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral):
        raise TypeError(f"ns_steps: expected an int, got {type(steps).__name__}")
    resolve_coefficients(group["ns_coefficients"], int(steps), name="ns_coefficients", steps_name="ns_steps")
    if group["adjust_lr_fn"] not in ADJUST_LR_FNS:
        raise ValueError(f"adjust_lr_fn: expected one of {ADJUST_LR_FNS}, got {group['adjust_lr_fn']!r}")
    if group["ns_dtype"] not in _NS_DTYPES:
        raise TypeError(f"ns_dtype: expected one of {_NS_DTYPES}, got {group['ns_dtype']!r}")


def _check_adamw_group(group: dict) -> None:
    _check_number("lr", group["lr"])
    _check_number("weight_decay", group["weight_decay"])
    _check_number("eps", group["eps"])
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"betas: expected a pair (beta1, beta2), got {betas!r}")
    for i, beta in enumerate(betas):
        _check_number(f"betas[{i}]", beta, hi=1.0, hi_open=True)


def _check_muon_param(p: torch.Tensor, name: str) -> None:
    if p.is_complex():
        raise TypeError(f"params: Muon does not support complex parameters, got {name} of dtype {p.dtype}")
    if not p.is_floating_point():
        raise TypeError(f"params: Muon needs floating-point parameters, got {name} of dtype {p.dtype}")
    if p.dim() < 2:
        raise ValueError(f"params: Muon needs parameters with >= 2 dims (matrices, conv filters); got {name} "
                         f"of shape {tuple(p.shape)} (put it on AdamW, e.g. with MuonWithAdamW)")


@dataclasses.dataclass
class _Work:
    """One matrix to orthogonalise: the momentum update in wide orientation."""

    param: torch.Tensor
    group: dict
    update: torch.Tensor      # (p, q), p <= q: the flattened update, transposed if it was tall
    transposed: bool
    rows: int                 # the flattened parameter's shape, for the lr adjustment
    cols: int
    key: tuple                # batching key: shape, device, ns dtype, NS settings
    result: Optional[torch.Tensor] = None

    @property
    def cost(self) -> int:
        p, q = self.update.shape
        return p * p * q


def _ns_dtype(group: dict, device: torch.device) -> torch.dtype:
    dtype = group.get("ns_dtype")
    if dtype is not None:
        return dtype
    return torch.bfloat16 if device.type == "cuda" else torch.float32


class Muon(Optimizer):
    """Muon, with torch.optim.Muon's constructor and semantics plus batching, flattening of
    >2-D parameters, a backend choice and optional distribution of the NS work.

    Args (torch.optim.Muon's): lr, weight_decay, momentum, nesterov, ns_coefficients (one (a, b, c)
        triple or a schedule of ns_steps triples, e.g. sigvlp.optim.POLAR_EXPRESS_COEFFICIENTS), eps, ns_steps,
        adjust_lr_fn (None/"original", "match_rms_adamw", "spectral_unclamped").
    Extra keyword-only args:
        ns_dtype: dtype of the NS operands (None: bf16 on CUDA, fp32 on CPU); a group option.
        backend: sigvlp.ops.newton_schulz backend (None/"auto", "torch", "triton", "cuda").
        process_group: a torch.distributed group to split the NS work over (None: this process does all).
    """

    _allows_adamw = False

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.1, momentum: float = 0.95,
                 nesterov: bool = True, ns_coefficients=DEFAULT_COEFFICIENTS, eps: float = 1e-7,
                 ns_steps: int = 5, adjust_lr_fn: Optional[str] = None, *, ns_dtype: Optional[torch.dtype] = None,
                 backend: Optional[str] = None, process_group=None):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_coefficients=ns_coefficients, eps=eps, ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn,
                        ns_dtype=ns_dtype)
        _check_muon_group(defaults)
        self._setup(backend, process_group)
        super().__init__(params, defaults)

    # -- construction ----------------------------------------------------------------------

    def _setup(self, backend, process_group):
        if backend not in (None, "auto", "torch", "triton", "cuda"):
            raise ValueError(f"backend: expected None, 'auto', 'torch', 'triton' or 'cuda', got {backend!r}")
        self.backend = backend
        self.process_group = process_group

    def _kind_defaults(self, use_muon: bool) -> dict:
        return self.defaults

    def add_param_group(self, param_group: dict) -> None:
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        use_muon = param_group.setdefault("use_muon", True)
        if not isinstance(use_muon, bool):
            raise TypeError(f"use_muon: expected a bool, got {type(use_muon).__name__}")
        if not use_muon and not self._allows_adamw:
            raise ValueError("use_muon: Muon only takes Muon groups; use MuonWithAdamW for AdamW groups")
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            for k, v in self._kind_defaults(use_muon).items():
                group.setdefault(k, v)
            names = group.get("param_names") or [f"params[{i}]" for i in range(len(group["params"]))]
            if use_muon:
                _check_muon_group(group)
                for p, name in zip(group["params"], names):
                    _check_muon_param(p, name)
            else:
                _check_adamw_group(group)
                for p, name in zip(group["params"], names):
                    if p.is_complex():
                        raise TypeError(f"params: complex parameters are not supported, got {name}")
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise

    # -- step ------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        """One optimisation step over all groups; returns closure()'s loss if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        muon_groups = [g for g in self.param_groups if g.get("use_muon", True)]
        adamw_groups = [g for g in self.param_groups if not g.get("use_muon", True)]
        if muon_groups:
            self._muon_step(muon_groups)
        for group in adamw_groups:
            self._adamw_step(group)
        return loss

    def _collect(self, groups) -> list[_Work]:
        work = []
        for group in groups:
            momentum = _scalar(group["momentum"])
            triples = tuple(resolve_coefficients(group["ns_coefficients"], int(group["ns_steps"]),
                                                 name="ns_coefficients", steps_name="ns_steps"))
            for p in group["params"]:
                if p.grad is None or p.numel() == 0:
                    continue
                grad = p.grad
                if grad.is_sparse:
                    raise RuntimeError("Muon does not support sparse gradients")
                if grad.is_complex():
                    raise TypeError("params: Muon does not support complex gradients")
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
                buf = state["momentum_buffer"]
                buf.lerp_(grad, 1 - momentum)
                update = grad.lerp(buf, momentum) if group["nesterov"] else buf
                rows = p.shape[0]
                cols = p.numel() // rows
                mat = update.reshape(rows, cols)
                transposed = rows > cols
                if transposed:
                    mat = mat.mT
                ns_dtype = _ns_dtype(group, p.device)
                key = (tuple(mat.shape), p.device, ns_dtype, int(group["ns_steps"]), triples,
                       float(_scalar(group["eps"])))
                work.append(_Work(p, group, mat, transposed, rows, cols, key))
        return work

    def _orthogonalise(self, work: list[_Work]) -> None:
        """Fill w.result = NS(w.update) for each item, one batched op call per key."""
        buckets: dict[tuple, list[_Work]] = {}
        for w in work:
            buckets.setdefault(w.key, []).append(w)
        for key, items in buckets.items():
            _, _, ns_dtype, steps, triples, eps = key
            # torch.stack copies: the op never sees (and cannot alias) a gradient or buffer.
            stacked = torch.stack([w.update.to(ns_dtype) for w in items])
            out = newton_schulz(stacked, steps, list(triples), eps, backend=self.backend, precision="input")
            for i, w in enumerate(items):
                w.result = out[i]

    def _muon_step(self, groups) -> None:
        work = self._collect(groups)
        if not work:
            return
        pg = self.process_group
        if pg is None:
            self._orthogonalise(work)
        else:
            self._distributed_orthogonalise(work, pg)
        for w in work:
            group = w.group
            lr = _scalar(group["lr"])
            o = w.result.mT if w.transposed else w.result
            o = o.reshape(w.param.shape).to(w.param.dtype)
            w.param.mul_(1 - lr * _scalar(group["weight_decay"]))
            w.param.add_(o, alpha=-adjusted_lr(lr, group["adjust_lr_fn"], w.rows, w.cols))

    # -- distribution ----------------------------------------------------------------------

    @staticmethod
    def plan(costs: list[int], world_size: int) -> list[int]:
        """Rank of each work item: largest first, each to the least-loaded rank (ties: lowest
        rank, then original order), so every rank computes the same plan from the shapes alone."""
        order = sorted(range(len(costs)), key=lambda i: (-costs[i], i))
        load = [0] * world_size
        owner = [0] * len(costs)
        for i in order:
            r = min(range(world_size), key=lambda k: (load[k], k))
            owner[i] = r
            load[r] += costs[i]
        return owner

    def _distributed_orthogonalise(self, work: list[_Work], pg) -> None:
        world = dist.get_world_size(pg)
        rank = dist.get_rank(pg)
        owner = self.plan([w.cost for w in work], world)
        mine = [w for w, r in zip(work, owner) if r == rank]
        self._orthogonalise(mine)
        # Each rank's results, packed as bytes in a fixed order: sizes are known on every rank.
        device = work[0].update.device

        def padded_bytes(w):  # each item starts 16-byte aligned, whatever dtypes precede it
            return -(-w.update.numel() * w.key[2].itemsize // 16) * 16

        nbytes = [0] * world
        for w, r in zip(work, owner):
            nbytes[r] += padded_bytes(w)
        size = max(nbytes)
        if size == 0:
            return
        send = torch.empty(size, dtype=torch.uint8, device=device)
        offset = 0
        for w in mine:
            flat = w.result.contiguous().view(-1).view(torch.uint8)
            send[offset: offset + flat.numel()] = flat
            offset += padded_bytes(w)
        recv = [torch.empty(size, dtype=torch.uint8, device=device) for _ in range(world)]
        dist.all_gather(recv, send, group=pg)
        offsets = [0] * world
        for w, r in zip(work, owner):
            n = w.update.numel() * w.key[2].itemsize
            chunk = recv[r][offsets[r]: offsets[r] + n]
            offsets[r] += padded_bytes(w)
            w.result = chunk.view(w.key[2]).view(w.update.shape)

    # -- AdamW (MuonWithAdamW's non-matrix groups) -----------------------------------------

    def _adamw_step(self, group: dict) -> None:
        lr = _scalar(group["lr"])
        beta1, beta2 = (_scalar(b) for b in group["betas"])
        eps = _scalar(group["eps"])
        wd = _scalar(group["weight_decay"])
        for p in group["params"]:
            if p.grad is None:
                continue
            grad = p.grad
            if grad.is_sparse:
                raise RuntimeError("AdamW does not support sparse gradients")
            state = self.state[p]
            if "step" not in state:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] = state["step"] + 1  # out of place: a loaded state may share the tensor
            step = state["step"].item()
            exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
            p.mul_(1 - lr * wd)
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            bias1 = 1 - beta1 ** step
            bias2_sqrt = math.sqrt(1 - beta2 ** step)
            denom = (exp_avg_sq.sqrt() / bias2_sqrt).add_(eps)
            p.addcdiv_(exp_avg, denom, value=-lr / bias1)


class MuonWithAdamW(Muon):
    """Muon for matrix parameters and AdamW for the rest, as one optimizer with one state_dict.

    params: an nn.Module (split by sigvlp.optim.split_params with its default rules), or param
    groups, each with "use_muon": True (Muon; keys as Muon's) or False (AdamW; keys lr, betas,
    eps, weight_decay). Group keys override the defaults below; Muon defaults are Muon's
    arguments (torch.optim.Muon's), AdamW defaults the adamw_* arguments, which default to
    torch.optim.AdamW's (lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight_decay 1e-2); the SigVLP
    recipe's values are in docs/ops.md. LR schedulers see every group's "lr".
    """

    _allows_adamw = True

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.1, momentum: float = 0.95,
                 nesterov: bool = True, ns_coefficients=DEFAULT_COEFFICIENTS, eps: float = 1e-7,
                 ns_steps: int = 5, adjust_lr_fn: Optional[str] = None, *, adamw_lr: float = 1e-3,
                 adamw_betas=(0.9, 0.999), adamw_eps: float = 1e-8, adamw_weight_decay: float = 1e-2,
                 ns_dtype: Optional[torch.dtype] = None, backend: Optional[str] = None, process_group=None):
        if isinstance(params, torch.nn.Module):
            params = split_params(params)
        params = list(params) if isinstance(params, Iterable) else params
        if params and not all(isinstance(g, dict) for g in params):
            raise TypeError("params: expected an nn.Module or param groups (dicts with 'use_muon')")
        for i, g in enumerate(params):
            if "use_muon" not in g:
                raise ValueError(f"params[{i}]: every group needs 'use_muon' (True: Muon, False: AdamW)")
        self._muon_defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                                   ns_coefficients=ns_coefficients, eps=eps, ns_steps=ns_steps,
                                   adjust_lr_fn=adjust_lr_fn, ns_dtype=ns_dtype)
        self._adamw_defaults = dict(lr=adamw_lr, betas=tuple(adamw_betas), eps=adamw_eps,
                                    weight_decay=adamw_weight_decay)
        _check_muon_group(self._muon_defaults)
        try:
            _check_adamw_group(self._adamw_defaults)
        except (TypeError, ValueError) as exc:
            raise type(exc)("adamw_" + str(exc)) from None
        self._setup(backend, process_group)
        # Defaults are per kind of group, filled in add_param_group: the base class gets none.
        Optimizer.__init__(self, params, {})

    def _kind_defaults(self, use_muon: bool) -> dict:
        return self._muon_defaults if use_muon else self._adamw_defaults
