"""SigVLPConfig: the model's geometry, positions, pooling, tokenizer and the data presets it expects."""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Optional

__all__ = ["HUEncodingConfig", "SigVLPConfig", "PRESETS", "RUNTIME_FIELDS"]

#: fields that change how the model runs, not its weights (free to differ from a checkpoint's)
RUNTIME_FIELDS = frozenset({"attn_backend", "grad_checkpointing"})
#: config keys of the HU encoding before it became the ``hu`` sub-config (and the dotted form of
#: ``--set model.hu.thresholds=...``) -> its field; SigVLPConfig.from_dict maps them into ``hu``
_HU_KEYS = {"hu_thresholds": "thresholds", "hu_grid": "grid", "hu.thresholds": "thresholds", "hu.grid": "grid"}


@dataclass
class HUEncodingConfig:
    """The optional HU (intensity) encoding of patch tokens (sigvlp.model.layers.HUEncoding):
    ``thresholds``: increasing finite HU values; per token and per ``grid`` (gt, gh, gw) sub-block of
    the patch, the fraction of voxels in each interval between consecutive thresholds, below the
    first and above the last, is embedded and added to the patch embedding. ``grid`` must divide
    the model's patch_size and every threshold lie inside its preprocess preset's HU window (both
    checked by SigVLPConfig). ValueError for a bad value, naming ``hu.thresholds`` / ``hu.grid``."""

    thresholds: tuple[float, ...]
    grid: tuple[int, int, int] = (1, 4, 4)

    def __post_init__(self):
        t = self.thresholds
        if hasattr(t, "tolist") and not isinstance(t, (str, bytes)):
            t = t.tolist()  # a numpy array
        if not (isinstance(t, (tuple, list)) and len(t) > 0
                and all(isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) for v in t)
                and all(b > a for a, b in zip(t, t[1:]))):
            raise ValueError(f"hu.thresholds: expected a non-empty increasing list of finite HU values, "
                             f"got {self.thresholds!r}")
        self.thresholds = tuple(float(v) for v in t)
        g = self.grid
        if not (isinstance(g, (tuple, list)) and len(g) == 3
                and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1 for v in g)):
            raise ValueError(f"hu.grid: expected three positive ints (gt, gh, gw), got {g!r}")
        self.grid = tuple(int(v) for v in g)

    @classmethod
    def coerce(cls, value) -> "HUEncodingConfig":
        """An HUEncodingConfig from itself or a mapping of its fields (a config.json's ``hu``);
        TypeError for anything else or an unknown key."""
        if isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise TypeError(f"hu: expected None, an HUEncodingConfig or a mapping with 'thresholds' (and 'grid'), "
                            f"got {type(value).__name__}")
        unknown = sorted(set(value) - {"thresholds", "grid"})
        if unknown or "thresholds" not in value:
            raise TypeError(f"hu: expected the keys 'thresholds' and optionally 'grid', got {sorted(value)}")
        return cls(**value)

    def check(self, patch_size, preprocess: str, window) -> None:
        """ValueError unless grid divides patch_size and every threshold lies inside `window` (the HU
        window of the preprocess preset named `preprocess`)."""
        if not all(p % v == 0 for v, p in zip(self.grid, patch_size)):
            raise ValueError(f"hu.grid: expected three positive ints dividing patch_size {patch_size}, "
                             f"got {self.grid!r}")
        if not all(window[0] < v < window[1] for v in self.thresholds):
            raise ValueError(f"hu.thresholds: every threshold must lie inside the preprocess preset "
                             f"{preprocess!r}'s HU window {tuple(window)} (outside it a bin is always "
                             f"empty or full), got {self.thresholds}")


def _map_hu_keys(d: dict) -> dict:
    """`d` with the older top-level hu_thresholds / hu_grid keys (config.json files written before the
    ``hu`` sub-config) and dotted hu.thresholds / hu.grid keys moved into ``hu``. Thresholds None
    (encoding off) drops them, grid included. ValueError when ``hu`` is given as well."""
    keys = [k for k in d if k in _HU_KEYS]
    if not keys:
        return d
    d = dict(d)
    sub = {_HU_KEYS[k]: d.pop(k) for k in keys}
    if sub.get("thresholds") is None:
        return d  # the HU encoding is off: the old always-stored hu_grid meant nothing
    if d.get("hu") is not None:
        raise ValueError(f"hu: the HU encoding is given twice ({sorted(keys)} and hu); give only hu")
    d["hu"] = sub
    return d


@dataclass
class SigVLPConfig:
    """Geometry and options of a SigVLP model. Build with ``SigVLPConfig.preset(name, **overrides)``
    or ``SigVLPConfig(**fields)``; an unknown field raises TypeError listing the valid ones.

    Volume tower: ``patch_size`` (pt, ph, pw) voxels per token (t = slice axis), ``width``,
    ``layers``, ``heads``, ``mlp_dim``; 3D RoPE with ``rope_theta`` and ``rope_sections`` (rotary
    pairs for (t, h, w); None = 2:3:3 of head_dim/2, remainder to t). ``pool``: "map" (learned
    probe, SigLIP's attention pooling), "mean" or "max" (per-channel max over the tokens).
    ``hu``: the optional HU encoding added to the patch embedding (``HUEncodingConfig``: thresholds
    and sub-block grid; a mapping of its fields is accepted; None: off, and nothing of it is stored).
    Text tower: ``text_width``, ``text_layers``, ``text_heads``, ``text_mlp_dim``; ``text_positions``:
    "rope" (1-D RoPE over the token index with ``text_rope_theta``) or "learned" (a table of
    ``max_text_tokens`` position embeddings added to the token embeddings, no RoPE: SigLIP's text
    tower, see ``SigVLP.from_siglip``); ``text_pool``: "last" (the EOS token, SigLIP), "mean"
    or "map". ``tokenizer``: "byte" (sigvlp.data ByteTokenizer), "word" (sigvlp.data WordTokenizer
    over the word list ``vocab``, which ``sigvlp train`` builds from the training texts when None)
    or a local Hugging Face tokenizer folder; ``vocab_size`` None = the tokenizer's;
    ``max_text_tokens`` per text incl. BOS/EOS.
    Both towers project to ``embed_dim``. ``logit_scale_init`` is the initial t (stored as log t),
    ``logit_bias_init`` the initial b of the sigmoid loss.
    Data: ``preprocess`` names a sigvlp.data.preprocess preset, ``chunk`` a sigvlp.data.chunks
    preset (``chunk_config()`` returns it with this config's patch size).
    Runtime only (not part of the weights): ``attn_backend`` (None/"auto", "torch", "cpu", "triton"),
    ``grad_checkpointing``.
    """

    # volume tower
    patch_size: tuple[int, int, int] = (16, 16, 16)
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    rope_theta: float = 10000.0
    rope_sections: Optional[tuple[int, int, int]] = None
    pool: str = "map"
    hu: Optional[HUEncodingConfig] = None
    # text tower
    text_width: int = 768
    text_layers: int = 12
    text_heads: int = 12
    text_mlp_dim: int = 3072
    text_rope_theta: float = 1000.0
    text_positions: str = "rope"
    text_pool: str = "last"
    tokenizer: str = "byte"
    vocab: Optional[tuple[str, ...]] = None
    vocab_size: Optional[int] = None
    max_text_tokens: int = 256
    # shared
    embed_dim: int = 768
    norm_eps: float = 1e-6
    logit_scale_init: float = 10.0
    logit_bias_init: float = -10.0
    # data presets this model is trained with
    preprocess: str = "sigvlp"
    chunk: str = "sigvlp"
    # runtime
    attn_backend: Optional[str] = None
    grad_checkpointing: bool = False

    def __new__(cls, *args, **kwargs):
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(kwargs) - set(valid))
        if unknown:
            raise TypeError(f"SigVLPConfig: unknown field(s) {unknown}; valid fields: {valid}")
        return super().__new__(cls)

    def __post_init__(self):
        self.patch_size = tuple(self.patch_size)
        if len(self.patch_size) != 3 or not all(isinstance(p, int) and not isinstance(p, bool) and p >= 1
                                                 for p in self.patch_size):
            raise ValueError(f"patch_size: expected three positive ints (pt, ph, pw), got {self.patch_size!r}")
        if self.rope_sections is not None:
            self.rope_sections = tuple(self.rope_sections)
        # import cost: sigvlp.ops imports torch, and the preset names (command-line help) must not
        from sigvlp.ops import SUPPORTED_HEAD_DIMS as _HEAD_DIMS  # head_dim values the attention op serves

        for prefix, width, heads in (("", self.width, self.heads), ("text_", self.text_width, self.text_heads)):
            if not (isinstance(heads, int) and heads >= 1 and isinstance(width, int) and width % heads == 0):
                raise ValueError(f"{prefix}width ({width}) must be a positive multiple of {prefix}heads ({heads})")
            if width // heads not in _HEAD_DIMS:
                raise ValueError(f"{prefix}head_dim = {prefix}width / {prefix}heads = {width // heads} must be one of "
                                 f"{_HEAD_DIMS} "
                                 f"(the head_dims the attention op serves)")
        for name in ("layers", "text_layers", "mlp_dim", "text_mlp_dim", "embed_dim", "max_text_tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < (0 if name.endswith("layers") else 1):
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        if self.max_text_tokens < 2:
            raise ValueError(f"max_text_tokens: expected >= 2 (BOS and EOS), got {self.max_text_tokens}")
        if self.pool not in ("map", "mean", "max"):
            raise ValueError(f"pool: expected 'map', 'mean' or 'max', got {self.pool!r}")
        if self.hu is not None:
            self.hu = HUEncodingConfig.coerce(self.hu)
        if self.text_positions not in ("rope", "learned"):
            raise ValueError(f"text_positions: expected 'rope' or 'learned', got {self.text_positions!r}")
        if self.text_pool not in ("last", "mean", "map"):
            raise ValueError(f"text_pool: expected 'last', 'mean' or 'map', got {self.text_pool!r}")
        for name in ("rope_theta", "text_rope_theta"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 1):
                raise ValueError(f"{name}: expected a finite number > 1, got {v!r}")
        if not (self.logit_scale_init > 0):
            raise ValueError(f"logit_scale_init: expected > 0 (it is stored as its log), got {self.logit_scale_init}")
        if self.vocab_size is not None and (not isinstance(self.vocab_size, int) or self.vocab_size < 1):
            raise ValueError(f"vocab_size: expected None or a positive int, got {self.vocab_size!r}")
        if not isinstance(self.tokenizer, str) or not self.tokenizer:
            raise ValueError(f"tokenizer: expected 'byte', 'word' or a tokenizer folder path, got {self.tokenizer!r}")
        if self.vocab is not None:
            from sigvlp.data.tokenizers import WordTokenizer

            v = self.vocab
            if self.tokenizer != "word":
                raise ValueError(f"vocab: only the 'word' tokenizer has a word list (tokenizer is {self.tokenizer!r})")
            if (isinstance(v, (str, bytes)) or not isinstance(v, (tuple, list)) or not v
                    or not all(isinstance(w, str) and w for w in v) or len(set(v)) != len(v)
                    or set(WordTokenizer.SPECIALS) & set(v)):
                raise ValueError("vocab: expected None or a non-empty list of distinct non-empty strings, none "
                                 f"of them a special token {WordTokenizer.SPECIALS}, got "
                                 f"{type(v).__name__} {str(v)[:80]}")
            self.vocab = tuple(v)
        from sigvlp.data.chunks import CHUNK_PRESETS
        from sigvlp.data.preprocess import PRESETS as PREPROCESS_PRESETS

        if self.preprocess not in PREPROCESS_PRESETS:
            raise ValueError(f"preprocess: unknown preset {self.preprocess!r}; known: {sorted(PREPROCESS_PRESETS)}")
        if self.chunk not in CHUNK_PRESETS:
            raise ValueError(f"chunk: unknown preset {self.chunk!r}; known: {sorted(CHUNK_PRESETS)}")
        if self.hu is not None:
            self.hu.check(self.patch_size, self.preprocess, PREPROCESS_PRESETS[self.preprocess].hu_window)
        size = PREPROCESS_PRESETS[self.preprocess].size
        if size % self.patch_size[1] or size % self.patch_size[2]:
            raise ValueError(f"patch_size {self.patch_size}: in-plane patch must divide the preprocess preset "
                             f"{self.preprocess!r}'s size {size}")

    # -------------------------------------------------------------- construction
    @classmethod
    def fields(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def preset(cls, name: str, **overrides) -> "SigVLPConfig":
        """A named preset ("tiny", "small", "base", "large", "siglip2-large") with fields overridden.
        Unknown preset -> ValueError listing presets; unknown field -> TypeError listing fields."""
        if name not in PRESETS:
            raise ValueError(f"unknown SigVLP preset {name!r}; presets: {sorted(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, d: dict) -> "SigVLPConfig":
        if not isinstance(d, dict):
            raise TypeError(f"SigVLPConfig.from_dict: expected a dict, got {type(d).__name__}")
        return cls(**_map_hu_keys(d))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["patch_size"] = list(self.patch_size)
        if self.hu is None:
            del d["hu"]  # a model without the HU encoding stores none of its fields
        else:
            d["hu"] = {"thresholds": list(self.hu.thresholds), "grid": list(self.hu.grid)}
        if self.rope_sections is not None:
            d["rope_sections"] = list(self.rope_sections)
        if self.vocab is not None:
            d["vocab"] = list(self.vocab)
        return d

    def replace(self, **changes) -> "SigVLPConfig":
        return self.from_dict({**dataclasses.asdict(self), **changes})

    def diff(self, other: "SigVLPConfig", *, include_runtime: bool = False) -> dict[str, tuple]:
        """field -> (self's value, other's value) for fields that differ (runtime fields skipped)."""
        a, b = self.to_dict(), other.to_dict()
        keys = list(a) + [k for k in b if k not in a]  # "hu" is only stored when set
        return {k: (a.get(k), b.get(k)) for k in keys
                if a.get(k) != b.get(k) and (include_runtime or k not in RUNTIME_FIELDS)}

    # -------------------------------------------------------------- derived
    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def text_head_dim(self) -> int:
        return self.text_width // self.text_heads

    def preprocess_config(self):
        """The sigvlp.data PreprocessConfig named by ``preprocess``."""
        from sigvlp.data.preprocess import preset

        return preset(self.preprocess)

    def chunk_config(self, **overrides):
        """The sigvlp.data ChunkConfig named by ``chunk``, with patch = this config's patch_size."""
        from sigvlp.data.chunks import CHUNK_PRESETS

        return dataclasses.replace(CHUNK_PRESETS[self.chunk], **{"patch": self.patch_size, **overrides})


def _tower(width, layers, heads, mlp):
    return dict(width=width, layers=layers, heads=heads, mlp_dim=mlp,
                text_width=width, text_layers=layers, text_heads=heads, text_mlp_dim=mlp, embed_dim=width)


#: preset name -> field values (everything else: the dataclass defaults)
PRESETS: dict[str, dict] = {
    # CPU tests and the CPU demo: 64^2 in-plane, 3 mm slices, 4 x 16 x 16 patches
    "tiny": {**_tower(64, 2, 2, 256), "patch_size": (4, 16, 16),
             "preprocess": "tiny", "chunk": "tiny"},
    # ViT-S geometry
    "small": _tower(384, 12, 6, 1536),
    # ViT-B geometry
    "base": _tower(768, 12, 12, 3072),
    # SigLIP-2 Large (the public SigVLP checkpoint's shape): head_dim 64, MLP 4096
    "large": _tower(1024, 24, 16, 4096),
    # google/siglip2-large-patch16-256's geometry (what SigVLP.from_siglip derives for it, with its
    # Gemma tokenizer folder as tokenizer): "large" with SigLIP-2's vocabulary and 64-token texts
    "siglip2-large": {**_tower(1024, 24, 16, 4096), "vocab_size": 256000, "max_text_tokens": 64},
}
