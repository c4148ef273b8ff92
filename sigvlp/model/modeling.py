"""SigVLP: a volume tower (3D patch tokens of any depth, 3D RoPE) and a text tower (1-D RoPE) trained
with SigLIP's sigmoid loss. Every attention runs through ``sigvlp.ops.rope_attention_varlen``."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from sigvlp.fileperm import apply_umask
from sigvlp.model.config import RUNTIME_FIELDS, SigVLPConfig
from sigvlp.model.layers import Block, HUEncoding, MAPPool, _init_linear, last_pool, max_pool, mean_pool
from sigvlp.model.siglip import load_siglip
from sigvlp.ops import cu_seqlens_from_lengths

__all__ = ["SigVLP", "SigVLPOutput", "VolumeEncoder", "TextEncoder"]

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
FORMAT_VERSION = 1


class SigVLPOutput(NamedTuple):
    """What ``SigVLP.forward`` returns (a NamedTuple: attribute access, DDP- and compile-friendly).

    image_emb: (B, embed_dim) float32, L2-normalised, one per chunk.
    text_emb: (M, embed_dim) float32, L2-normalised, one per text (None when the batch has no texts).
    logit_scale: () float32, t = exp(log_logit_scale) (the multiplier sigmoid_loss expects).
    logit_bias: () float32, b.
    tokens: (total_tokens, width) final (normed) token features of the volume tower, in the batch's
        packed t-major order (rows cu_seqlens[b]:cu_seqlens[b+1] belong to chunk b).
    """

    image_emb: torch.Tensor
    text_emb: Optional[torch.Tensor]
    logit_scale: torch.Tensor
    logit_bias: torch.Tensor
    tokens: torch.Tensor


def _check_max_seqlen(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, torch.SymInt)):
        raise TypeError(f"{name}: expected a Python int (from the collate, never a device tensor), "
                        f"got {type(value).__name__}")
    return value


class _Tower(nn.Module):
    def _blocks(self, x, cu_seqlens, max_seqlen, grid_thw):
        for block in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, cu_seqlens, max_seqlen, grid_thw, use_reentrant=False)
            else:
                x = block(x, cu_seqlens, max_seqlen, grid_thw)
        return self.norm(x)

    def _pool(self, x, cu_seqlens, max_seqlen):
        if self.pool_kind == "map":
            return self.pool(x, cu_seqlens, max_seqlen)
        if self.pool_kind == "mean":
            return mean_pool(x, cu_seqlens)
        if self.pool_kind == "max":
            return max_pool(x, cu_seqlens)
        return last_pool(x, cu_seqlens)


class VolumeEncoder(_Tower):
    """Patch embedding (a Linear on the collate's flattened pt*ph*pw patches, identical to a stride =
    kernel Conv3d with 1 input channel: weight.view(width, 1, pt, ph, pw) is that conv's weight), plus
    the HU encoding (``HUEncoding``) when the ``hu`` sub-config is set, pre-norm blocks with 3D RoPE from
    each chunk's grid_thw, final norm, pooling, projection.
    No absolute position embedding: any grid (any number of slices) works."""

    def __init__(self, cfg: SigVLPConfig):
        super().__init__()
        pt, ph, pw = cfg.patch_size
        self.patch_dim = pt * ph * pw
        self.patch_embed = nn.Linear(self.patch_dim, cfg.width)
        nn.init.trunc_normal_(self.patch_embed.weight, std=self.patch_dim ** -0.5)
        nn.init.zeros_(self.patch_embed.bias)
        self.hu_encoding = None
        if cfg.hu is not None:
            self.hu_encoding = HUEncoding(cfg.hu.thresholds, cfg.preprocess_config().hu_window, cfg.patch_size,
                                          cfg.hu.grid, cfg.width)
        attn = dict(theta=cfg.rope_theta, sections=cfg.rope_sections, backend=cfg.attn_backend)
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.heads, cfg.mlp_dim, cfg.norm_eps, **attn)
                                    for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.pool_kind = cfg.pool
        if cfg.pool == "map":
            self.pool = MAPPool(cfg.width, cfg.heads, cfg.mlp_dim, cfg.norm_eps, cfg.attn_backend)
        self.head = nn.Linear(cfg.width, cfg.embed_dim)
        _init_linear(self.head)
        self.grad_checkpointing = cfg.grad_checkpointing

    def forward(self, patches, cu_seqlens, max_seqlen: int, grid_thw):
        """patches (total_tokens, pt*ph*pw) float (voxels in [-1, 1], t-major tokens as the collate packs
        them), cu_seqlens (B + 1,) int32, max_seqlen int, grid_thw (B, 3) int32 (T, H, W) in tokens.
        Returns (pooled (B, embed_dim) un-normalised in the compute dtype, tokens (total_tokens, width))."""
        if patches.dim() != 2 or patches.shape[1] != self.patch_dim:
            raise ValueError(f"patches: expected shape (total_tokens, pt*ph*pw = {self.patch_dim}), "
                             f"got {tuple(patches.shape)} (does the data's patch size match the model's?)")
        x = self.patch_embed(patches)
        if self.hu_encoding is not None:
            x = x + self.hu_encoding(patches)
        tokens = self._blocks(x, cu_seqlens, max_seqlen, grid_thw)
        return self.head(self._pool(tokens, cu_seqlens, max_seqlen)), tokens


class TextEncoder(_Tower):
    """Token embedding, pre-norm blocks with 1-D RoPE over the token index (grid (L, 1, 1), all rotary
    pairs on the t axis, theta = text_rope_theta), final norm, pooling, projection. With
    ``text_positions="learned"``: a (max_text_tokens, text_width) position table added to the token
    embeddings instead of RoPE (SigLIP's text tower)."""

    def __init__(self, cfg: SigVLPConfig, vocab_size: int):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, cfg.text_width)
        nn.init.normal_(self.token_embedding.weight, std=cfg.text_width ** -0.5)
        self.position_embedding = None
        if cfg.text_positions == "learned":
            self.position_embedding = nn.Embedding(cfg.max_text_tokens, cfg.text_width)
            nn.init.normal_(self.position_embedding.weight, std=cfg.text_width ** -0.5)
        sections = (cfg.text_head_dim // 2, 0, 0)
        attn = dict(theta=cfg.text_rope_theta, sections=sections, backend=cfg.attn_backend)
        self.blocks = nn.ModuleList(Block(cfg.text_width, cfg.text_heads, cfg.text_mlp_dim, cfg.norm_eps, **attn)
                                    for _ in range(cfg.text_layers))
        self.norm = nn.LayerNorm(cfg.text_width, eps=cfg.norm_eps)
        self.pool_kind = cfg.text_pool
        if cfg.text_pool == "map":
            self.pool = MAPPool(cfg.text_width, cfg.text_heads, cfg.text_mlp_dim, cfg.norm_eps, cfg.attn_backend)
        self.head = nn.Linear(cfg.text_width, cfg.embed_dim)
        _init_linear(self.head)
        self.grad_checkpointing = cfg.grad_checkpointing

    def forward(self, text_ids, cu_seqlens, max_seqlen: int):
        """text_ids (total_text_tokens,) int64, cu_seqlens (M + 1,) int32, max_seqlen int.
        Returns (M, embed_dim) un-normalised."""
        if text_ids.dim() != 1 or text_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"text_ids: expected a 1-D int64 tensor, got {tuple(text_ids.shape)} {text_ids.dtype}")
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        x = self.token_embedding(text_ids)
        if self.position_embedding is None:
            ones = torch.ones_like(lengths)
            grid = torch.stack([lengths, ones, ones], dim=1).to(torch.int32)
        else:  # learned positions, no rotation
            table = self.position_embedding.num_embeddings
            if max_seqlen > table:
                raise ValueError(f"max_seqlen: {max_seqlen} tokens, more than the {table} learned text positions "
                                 f"(text_positions='learned' caps texts at max_text_tokens)")
            starts = torch.repeat_interleave(cu_seqlens[:-1].long(), lengths.long(), output_size=text_ids.shape[0])
            x = x + self.position_embedding(torch.arange(text_ids.shape[0], device=x.device) - starts)
            grid = None
        x = self._blocks(x, cu_seqlens, max_seqlen, grid)
        return self.head(self._pool(x, cu_seqlens, max_seqlen))


class SigVLP(nn.Module):
    """The SigVLP model: ``SigVLP(SigVLPConfig.preset("tiny"))``.

    Attributes: ``config``, ``tokenizer`` (sigvlp.data ByteTokenizer or HFTokenizer, from
    config.tokenizer), ``visual`` (VolumeEncoder), ``text`` (TextEncoder), ``log_logit_scale``
    (init log(config.logit_scale_init)), ``logit_bias`` (init config.logit_bias_init).
    """

    def __init__(self, config: SigVLPConfig):
        super().__init__()
        if not isinstance(config, SigVLPConfig):
            raise TypeError(f"config: expected a SigVLPConfig, got {type(config).__name__}")
        from sigvlp.data.tokenizers import load_tokenizer

        self.config = config
        self.tokenizer = load_tokenizer(config.tokenizer, vocab=config.vocab)
        vocab = config.vocab_size if config.vocab_size is not None else self.tokenizer.vocab_size
        if vocab < self.tokenizer.vocab_size:
            raise ValueError(f"vocab_size: {vocab} is smaller than the {config.tokenizer!r} tokenizer's "
                             f"{self.tokenizer.vocab_size} ids (None: the tokenizer's)")
        self.visual = VolumeEncoder(config)
        self.text = TextEncoder(config, vocab)
        self.log_logit_scale = nn.Parameter(torch.tensor(math.log(config.logit_scale_init)))
        self.logit_bias = nn.Parameter(torch.tensor(float(config.logit_bias_init)))

    @property
    def device(self) -> torch.device:
        return self.log_logit_scale.device

    # ------------------------------------------------------------------ forward
    def forward(self, batch: dict) -> SigVLPOutput:
        """batch: the dict from sigvlp.data collate_chunks / make_loader (or volume_batch): patches
        (total_tokens, pt*ph*pw) float, cu_seqlens (B + 1,) int32, max_seqlen int, grid_thw (B, 3)
        int32, and optionally text_ids (total_text_tokens,) int64, text_cu_seqlens (M + 1,) int32,
        text_max_seqlen int. Tensors are moved to the model's device. Returns a SigVLPOutput."""
        if not isinstance(batch, dict):
            raise TypeError(f"batch: expected the collate's dict, got {type(batch).__name__}")
        missing = [k for k in ("patches", "cu_seqlens", "max_seqlen", "grid_thw") if k not in batch]
        if missing:
            raise ValueError(f"batch: missing key(s) {missing}")
        image_emb, tokens = self.encode_volume(batch["patches"], batch["cu_seqlens"], batch["max_seqlen"],
                                               batch["grid_thw"])
        text_emb = None
        if batch.get("text_ids") is not None:
            text_emb = self.encode_text(batch["text_ids"], batch["text_cu_seqlens"], batch["text_max_seqlen"])
        return SigVLPOutput(image_emb, text_emb, self.log_logit_scale.float().exp(),
                            self.logit_bias.to(torch.float32, copy=True), tokens)

    def encode_volume(self, patches, cu_seqlens, max_seqlen: int, grid_thw):
        """patches (total_tokens, pt*ph*pw) float, voxels in [-1, 1] (windowed HU), tokens t-major per
        chunk; cu_seqlens (B + 1,) int32; max_seqlen Python int >= the longest chunk in tokens;
        grid_thw (B, 3) int32 (T, H, W) tokens per chunk.
        Returns (pooled (B, embed_dim) float32 L2-normalised, tokens (total_tokens, width) in the
        compute dtype: the final normed token features)."""
        max_seqlen = _check_max_seqlen(max_seqlen, "max_seqlen")
        dev = self.device
        patches = patches.to(dev, non_blocking=True)
        if not torch.is_autocast_enabled(dev.type) or not patches.is_floating_point():
            patches = patches.to(self.visual.patch_embed.weight.dtype)
        pooled, tokens = self.visual(patches, cu_seqlens.to(dev, non_blocking=True), max_seqlen,
                                     grid_thw.to(dev, non_blocking=True))
        return F.normalize(pooled.float(), dim=-1), tokens

    def encode_text(self, text_ids, text_cu_seqlens, max_seqlen: int):
        """text_ids (total_text_tokens,) int64 token ids (each text [BOS] ... [EOS]), text_cu_seqlens
        (M + 1,) int32, max_seqlen Python int. Returns (M, embed_dim) float32, L2-normalised."""
        max_seqlen = _check_max_seqlen(max_seqlen, "max_seqlen")
        dev = self.device
        emb = self.text(text_ids.to(dev, non_blocking=True), text_cu_seqlens.to(dev, non_blocking=True), max_seqlen)
        return F.normalize(emb.float(), dim=-1)

    def tokenize(self, texts: Sequence[str]) -> dict:
        """list[str] -> dict(text_ids (total,) int64, text_cu_seqlens (M + 1,) int32, text_max_seqlen int),
        with the model's tokenizer and config.max_text_tokens (the collate's layout), on the CPU."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("texts: expected a list of str")
        if not texts:
            raise ValueError("texts: expected at least one text")
        ids = [self.tokenizer.encode(t, self.config.max_text_tokens) for t in texts]
        return {"text_ids": torch.tensor([i for r in ids for i in r], dtype=torch.int64),
                "text_cu_seqlens": cu_seqlens_from_lengths([len(r) for r in ids]),
                "text_max_seqlen": max(len(r) for r in ids)}

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """list[str] -> (M, embed_dim) float32 L2-normalised (tokenised with the model's tokenizer)."""
        t = self.tokenize(texts)
        return self.encode_text(t["text_ids"], t["text_cu_seqlens"], t["text_max_seqlen"])

    # ------------------------------------------------------------------ save / load
    def save_pretrained(self, directory) -> Path:
        """Write directory/model.safetensors (weights) and directory/config.json. Returns the folder."""
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
        tmp = d / (WEIGHTS_NAME + ".tmp")
        save_file(state, str(tmp), metadata={"format": "sigvlp", "format_version": str(FORMAT_VERSION)})
        apply_umask(tmp)  # safetensors writes 0600; use the usual 0o666 & ~umask
        os.replace(tmp, d / WEIGHTS_NAME)
        cfg = {"format_version": FORMAT_VERSION, "config": self.config.to_dict()}
        (d / CONFIG_NAME).write_text(json.dumps(cfg, indent=2) + "\n")
        return d

    @staticmethod
    def load_config(directory) -> SigVLPConfig:
        """The SigVLPConfig saved in directory/config.json."""
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file (not a save_pretrained folder?)")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        return SigVLPConfig.from_dict(raw.get("config", raw) if isinstance(raw, dict) else raw)

    @classmethod
    def from_pretrained(cls, directory, map_location="cpu", *, config: Optional[SigVLPConfig] = None,
                        **overrides) -> "SigVLP":
        """Load a save_pretrained folder. config: the config the caller expects (ValueError naming every
        differing field if the checkpoint's differs); overrides: runtime fields only (attn_backend,
        grad_checkpointing); overriding a weight-shaping field is a mismatch too."""
        saved = cls.load_config(directory)
        want = saved.replace(**overrides) if overrides else saved
        if config is not None:
            if not isinstance(config, SigVLPConfig):
                raise TypeError(f"config: expected a SigVLPConfig, got {type(config).__name__}")
            want = config
        _raise_on_mismatch(saved, want, directory)
        model = cls(want)
        model.load_weights(directory)
        return model.to(map_location) if map_location is not None else model

    @classmethod
    def from_siglip(cls, path, *, patch_init: str = "inflate", text_positions: str = "rope",
                    **config_overrides) -> "SigVLP":
        """A SigVLP started from Hugging Face SigLIP / SigLIP-2 weights (``sigvlp.model.siglip``, whose
        docstring has the key mapping), on the CPU in float32.

        path: a local SiglipModel folder (config.json, model.safetensors or sharded safetensors with
        model.safetensors.index.json, tokenizer.json), e.g. google/siglip2-large-patch16-256 fetched
        once with ``hf download``; the NaFlex Siglip2Model is refused. The config comes from the
        checkpoint (``siglip_config``: widths, layers, heads, MLP sizes, norm eps, vocabulary, the
        folder's tokenizer, 64-token texts for SigLIP-2); config_overrides set the other fields
        (e.g. patch_size=(pt, 16, 16), hu); one contradicting the checkpoint is a
        ValueError naming the field. patch_init: "inflate" (the 2-D kernel summed over RGB and
        spread over the pt slices: a z-constant volume embeds as SigLIP embeds the slice as a grey
        image) or "random". text_positions: "rope" (the learned table dropped, 1-D RoPE) or
        "learned" (SigLIP's table kept, no RoPE: its text embeddings for the same token ids).
        Missing or unexpected checkpoint keys are a ValueError naming them, never a partial load."""
        return load_siglip(cls, path, patch_init=patch_init, text_positions=text_positions, **config_overrides)

    def load_weights(self, directory) -> None:
        """Load a save_pretrained folder's weights into this model; its config.json must match this
        model's config (ValueError naming the differing fields), its tensors this model's shapes."""
        from safetensors.torch import load_file

        _raise_on_mismatch(self.load_config(directory), self.config, directory)
        path = Path(directory) / WEIGHTS_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file")
        state = load_file(str(path), device="cpu")
        own = self.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in own if k in state and state[k].shape != own[k].shape]
        if missing or unexpected or shapes:
            raise ValueError(f"{path}: weights do not fit this model's config (missing {missing[:8]}, "
                             f"unexpected {unexpected[:8]}, shape mismatches {shapes[:8]})")
        self.load_state_dict(state)


def short_repr(value, limit: int = 80) -> str:
    """repr(value), cut to about `limit` characters (a long list says how many items it has)."""
    r = repr(value)
    if len(r) <= limit:
        return r
    return r[: limit - 20] + (f"... ({len(value)} items)" if hasattr(value, "__len__") else "...")


def _raise_on_mismatch(saved: SigVLPConfig, wanted: SigVLPConfig, directory) -> None:
    diff = saved.diff(wanted)
    if diff:
        fields = ", ".join(f"{k} (checkpoint {short_repr(a)}, requested {short_repr(b)})"
                           for k, (a, b) in diff.items())
        raise ValueError(f"{directory}: checkpoint config differs from the requested config in field(s): {fields}. "
                         f"Load it with its own config (SigVLP.from_pretrained(dir)); only runtime fields "
                         f"{sorted(RUNTIME_FIELDS)} may differ")
