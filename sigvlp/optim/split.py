r"""Which parameters go to Muon and which to AdamW.

Muon is for the hidden weight matrices of a network; embeddings, the input patch embedding,
output heads and projections, norms, biases and scalars belong on AdamW (Keller Jordan's
guidance; the SigVLP authors' code put embeddings and heads on Muon, which we do not repeat).

The default decision is by parameter NAME (and owning module type), not by the role a module
plays: an output layer named `out`, `fc`, `proj_out` or one inside an nn.Sequential does not
match the head/projection patterns below and goes to Muon. Check with explain_split, and pass
your own patterns or a `muon_filter` for such models.

Rules, first match wins, per parameter name from model.named_parameters():
 0. requires_grad=False: left out of both groups.
 1. matches one of the caller's `adamw` patterns -> AdamW; one of the caller's `muon`
    patterns -> Muon (ValueError if it is not >= 2-D, or if it matches both lists).
 1b. muon_filter given: muon_filter(name, param, module) -> True: Muon (ValueError if it is not
    >= 2-D), False: AdamW; module is the nn.Module that owns the parameter. Rules 2-6 are skipped.
 2. fewer than 2 dims (biases, norm weights, logit scale / bias, 1-D tables) -> AdamW.
 3. owned by an embedding module (nn.Embedding, nn.EmbeddingBag) -> AdamW.
 4. owned by a normalisation module (LayerNorm, GroupNorm, RMSNorm, BatchNorm, InstanceNorm,
    LocalResponseNorm) -> AdamW.
 5. matches DEFAULT_ADAMW_PATTERNS (token/position/patch embeddings, class/mask/register tokens,
    heads, classifiers and *_projection output projections) -> AdamW.
 6. everything else (>= 2-D hidden weights: attention, MLP, conv inside the network) -> Muon.
Patterns are regular expressions searched in the full dotted name (re.search), so
r"\.qkv\." or r"^vision\.blocks\.0\." both work; the defaults match whole name components.
"""

from __future__ import annotations

import re
from typing import Callable, Iterable, Optional, Sequence

from torch import nn

__all__ = ["split_params", "explain_split", "DEFAULT_ADAMW_PATTERNS"]

#: Name patterns (rule 5) of parameters that are >= 2-D but still belong on AdamW.
DEFAULT_ADAMW_PATTERNS: tuple[str, ...] = (
    # token and position tables, patch embeddings (the first conv of a vision tower)
    r"(^|\.)(embed|embeds|embedding|embeddings|embed_tokens|tok_embeddings|token_embedding|word_embeddings"
    r"|wte|wpe)(\.|$)",
    r"(^|\.)(patch_embed|patch_embedding|patch_embeddings|patchify)(\.|$)",
    r"(^|\.)(pos_embed|pos_embedding|position_embedding|position_embeddings|positional_embedding)(\.|$)",
    r"(^|\.)(cls_token|mask_token|register_tokens|dist_token)$",
    # outputs: heads, classifiers, projections into the shared embedding space
    r"(^|\.)(head|heads|lm_head|classifier)(\.|$)",
    r"(^|\.)(\w+_)?projection(\.|$)",
    r"(^|\.)(logit_scale|logit_bias)$",
)

_EMBEDDING_TYPES = (nn.Embedding, nn.EmbeddingBag)
_NORM_TYPES = tuple(t for t in (nn.LayerNorm, nn.GroupNorm, getattr(nn, "RMSNorm", None),
                                nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm,
                                nn.LocalResponseNorm) if t is not None)


def _compile(patterns, name: str) -> list[re.Pattern]:
    if isinstance(patterns, str):
        patterns = (patterns,)
    if not isinstance(patterns, Iterable):
        raise TypeError(f"{name}: expected a sequence of regular expressions, got {type(patterns).__name__}")
    out = []
    for p in patterns:
        if not isinstance(p, str):
            raise TypeError(f"{name}: expected regular expressions as str, got {p!r}")
        try:
            out.append(re.compile(p))
        except re.error as exc:
            raise ValueError(f"{name}: invalid regular expression {p!r}: {exc}") from None
    return out


def _owners(model: nn.Module) -> dict[int, nn.Module]:
    owners = {}
    for module in model.modules():
        for p in module._parameters.values():
            if p is not None:
                owners.setdefault(id(p), module)
    return owners


MuonFilter = Callable[[str, nn.Parameter, nn.Module], bool]


def explain_split(model: nn.Module, *, adamw: Sequence[str] = (), muon: Sequence[str] = (),
                  default_adamw_patterns: Sequence[str] = DEFAULT_ADAMW_PATTERNS,
                  muon_filter: Optional[MuonFilter] = None) -> list[tuple]:
    """(name, shape, "muon" | "adamw" | "frozen", reason) for every parameter, by the rules above:
    the decision and the rule that made it, per parameter, in model.named_parameters() order."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if muon_filter is not None and not callable(muon_filter):
        raise TypeError(f"muon_filter: expected a callable (name, param, module) -> bool, got "
                        f"{type(muon_filter).__name__}")
    user_adamw = _compile(adamw, "adamw")
    user_muon = _compile(muon, "muon")
    defaults = _compile(default_adamw_patterns, "default_adamw_patterns")
    owners = _owners(model)
    rows = []
    for name, p in model.named_parameters():
        shape = tuple(p.shape)
        owner = owners.get(id(p))
        if not p.requires_grad:
            rows.append((name, shape, "frozen", "requires_grad=False"))
            continue
        hit_a = next((r.pattern for r in user_adamw if r.search(name)), None)
        hit_m = next((r.pattern for r in user_muon if r.search(name)), None)
        if hit_a and hit_m:
            raise ValueError(f"adamw, muon: parameter {name!r} matches both {hit_a!r} (adamw) and {hit_m!r} (muon)")
        if hit_a:
            rows.append((name, shape, "adamw", f"adamw pattern {hit_a!r}"))
        elif hit_m:
            if p.dim() < 2:
                raise ValueError(f"muon: pattern {hit_m!r} selects {name!r} of shape {shape}; Muon needs >= 2-D")
            rows.append((name, shape, "muon", f"muon pattern {hit_m!r}"))
        elif muon_filter is not None:
            decision = muon_filter(name, p, owner)
            if not isinstance(decision, bool):
                raise TypeError(f"muon_filter: expected a bool for {name!r}, got {type(decision).__name__}")
            if decision and p.dim() < 2:
                raise ValueError(f"muon_filter: selects {name!r} of shape {shape}; Muon needs >= 2-D")
            rows.append((name, shape, "muon" if decision else "adamw", f"muon_filter returned {decision}"))
        elif p.dim() < 2:
            rows.append((name, shape, "adamw", f"{p.dim()}-D (bias, norm, scalar)"))
        elif isinstance(owner, _EMBEDDING_TYPES):
            rows.append((name, shape, "adamw", f"embedding module {type(owner).__name__}"))
        elif isinstance(owner, _NORM_TYPES):
            rows.append((name, shape, "adamw", f"norm module {type(owner).__name__}"))
        else:
            hit = next((r.pattern for r in defaults if r.search(name)), None)
            if hit:
                rows.append((name, shape, "adamw", f"default pattern {hit!r}"))
            else:
                rows.append((name, shape, "muon", "hidden >= 2-D weight"))
    return rows


def split_params(model: nn.Module, *, adamw: Sequence[str] = (), muon: Sequence[str] = (),
                 default_adamw_patterns: Sequence[str] = DEFAULT_ADAMW_PATTERNS,
                 muon_filter: Optional[MuonFilter] = None) -> list[dict]:
    """Param groups for MuonWithAdamW: [{"params": [(name, p), ...], "use_muon": True},
    {"params": [...], "use_muon": False}] (empty groups left out), by the module docstring's rules.

    adamw / muon: extra regular expressions that send matching names to AdamW / Muon before any
    built-in rule. default_adamw_patterns: replace rule 5's patterns (pass () to disable it).
    muon_filter: callable(name, param, module) -> bool deciding every parameter the patterns
    leave open (True: Muon), instead of the built-in rules 2-6.
    Add per-group options (lr, weight_decay, ...) to the returned dicts as with any optimizer.
    """
    rows = explain_split(model, adamw=adamw, muon=muon, default_adamw_patterns=default_adamw_patterns,
                         muon_filter=muon_filter)
    params = dict(model.named_parameters())
    groups = []
    for kind, use_muon in (("muon", True), ("adamw", False)):
        chosen = [(name, params[name]) for name, _, k, _ in rows if k == kind]
        if chosen:
            groups.append({"params": chosen, "use_muon": use_muon})
    if not groups:
        raise ValueError("model: no trainable parameters")
    return groups
