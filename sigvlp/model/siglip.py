"""Hugging Face SigLIP / SigLIP-2 weights -> SigVLP (``SigVLP.from_siglip``), as the SigVLP paper
starts both towers from SigLIP-2 and only the 3D patch embedding is new.

Reads a local folder in Hugging Face's layout: ``config.json`` of a ``SiglipModel`` (model_type
"siglip": SigLIP and SigLIP-2's fixed-resolution checkpoints such as
google/siglip2-large-patch16-256), ``model.safetensors`` or shards listed in
``model.safetensors.index.json``, and ``tokenizer.json``. Weights are read with safetensors and
the tokenizer with the tokenizers library (``sigvlp.data.HFTokenizer``); transformers is not
needed. The NaFlex ``Siglip2Model`` (model_type "siglip2") is refused with a message naming the
supported variants.

Mapping (SigVLP key <- SigLIP key). ``T`` is a tower: ``visual`` <- ``vision_model``, ``text`` <-
``text_model``; ``L`` every encoder layer; ``.weight`` and ``.bias`` alike unless named.

==============================  ============================================  ==========================
SigVLP                          SigLIP                                        how
==============================  ============================================  ==========================
T.blocks.L.norm1                T.encoder.layers.L.layer_norm1                as is
T.blocks.L.attn.qkv             T.encoder.layers.L.self_attn.{q,k,v}_proj     rows concatenated q, k, v
T.blocks.L.attn.proj            T.encoder.layers.L.self_attn.out_proj         as is
T.blocks.L.norm2                T.encoder.layers.L.layer_norm2                as is
T.blocks.L.mlp.fc1 / fc2        T.encoder.layers.L.mlp.fc1 / fc2              as is
visual.patch_embed              vision_model.embeddings.patch_embedding       patch_init (below)
visual.norm                     vision_model.post_layernorm                   as is
visual.pool.probe               vision_model.head.probe                       (1, 1, w) -> (w,)
visual.pool.q                   vision_model.head.attention.in_proj_*         rows [0, w)
visual.pool.kv                  vision_model.head.attention.in_proj_*         rows [w, 3w) (k, then v)
visual.pool.proj                vision_model.head.attention.out_proj          as is
visual.pool.norm                vision_model.head.layernorm                   as is
visual.pool.mlp.fc1 / fc2       vision_model.head.mlp.fc1 / fc2               as is
visual.head                     (none: SigLIP's image embedding is the MAP    identity if width ==
                                output)                                       embed_dim, else new
visual.hu_encoding.embed        (none)                                        zero (when hu)
text.token_embedding            text_model.embeddings.token_embedding         as is
text.position_embedding         text_model.embeddings.position_embedding      text_positions="learned":
                                                                              first max_text_tokens rows
text.norm                       text_model.final_layer_norm                   as is
text.head                       text_model.head                               as is
log_logit_scale                 logit_scale                                   (1,) -> () (both log t)
logit_bias                      logit_bias                                    (1,) -> ()
==============================  ============================================  ==========================

Dropped on purpose: ``vision_model.embeddings.position_embedding.weight`` (the 2-D position table:
3D RoPE replaces it), ``text_model.embeddings.position_embedding.weight`` with
text_positions="rope" (1-D RoPE replaces it), the patch embedding with patch_init="random", and
``*.embeddings.position_ids`` buffers of older saves. Any other key the mapping does not name,
or a key it names that the checkpoint lacks, is a ValueError naming it: never a partial load.

``patch_init``: "inflate" (default) sums the 2-D kernel (width, 3, p, p) over RGB and spreads it
evenly over the pt slices (weight[:, t] = sum_c W[:, c] / pt), bias as is: a volume that is constant
along z embeds exactly as SigLIP embeds that slice as a grey RGB image (voxels in [-1, 1], like
SigLIP's normalised pixels). The in-plane patch must equal the checkpoint's (no resampling).
"random" keeps a new embedding (the paper's new Conv3d).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sigvlp.model.config import SigVLPConfig

__all__ = ["SUPPORTED", "siglip_config", "load_siglip"]

SUPPORTED = ("Hugging Face SiglipModel folders (config.json model_type 'siglip': SigLIP, and SigLIP-2's "
             "fixed-resolution checkpoints such as google/siglip2-large-patch16-256) with safetensors weights "
             "and a tokenizer.json")
PATCH_INITS = ("inflate", "random")
#: activations SigVLP's MLP computes (GELU, tanh approximation)
_GELU_TANH = ("gelu_pytorch_tanh", "gelu_new")
#: config fields from_siglip derives from the checkpoint's weights, not options
_FROM_WEIGHTS = ("logit_scale_init", "logit_bias_init")


def _read_json(path: Path) -> dict:
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file (from_siglip expects a Hugging Face model folder)") from None
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(d).__name__}")
    return d


def read_hf_config(folder) -> dict:
    """The folder's config.json, checked to be a supported SigLIP model (else ValueError naming
    its model_type / architectures and the supported variants)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder (from_siglip takes a local Hugging Face model folder)")
    hf = _read_json(folder / "config.json")
    kind, arch = hf.get("model_type"), hf.get("architectures")
    if kind == "siglip2":
        raise ValueError(f"{folder}: a NaFlex Siglip2Model (model_type 'siglip2', architectures {arch}) is not "
                         f"supported; supported: {SUPPORTED}")
    if kind != "siglip" or not isinstance(hf.get("vision_config"), dict) or not isinstance(hf.get("text_config"),
                                                                                          dict):
        raise ValueError(f"{folder}: config.json is model_type {kind!r} (architectures {arch}), not a SigLIP "
                         f"model with vision_config and text_config; supported: {SUPPORTED}")
    vis, txt = hf["vision_config"], hf["text_config"]
    for name, tower in (("vision_config", vis), ("text_config", txt)):
        act = tower.get("hidden_act", "gelu_pytorch_tanh")
        if act not in _GELU_TANH:
            raise ValueError(f"{folder}: {name}.hidden_act is {act!r}; SigVLP's MLP computes {_GELU_TANH}")
    if vis.get("num_channels", 3) != 3 or not vis.get("vision_use_head", True):
        raise ValueError(f"{folder}: vision_config needs num_channels 3 and vision_use_head true (the MAP head), "
                         f"got {vis.get('num_channels', 3)} and {vis.get('vision_use_head', True)}")
    if vis.get("layer_norm_eps", 1e-6) != txt.get("layer_norm_eps", 1e-6):
        raise ValueError(f"{folder}: the towers' layer_norm_eps differ ({vis.get('layer_norm_eps')} vs "
                         f"{txt.get('layer_norm_eps')}); SigVLP has one norm_eps")
    return hf


def _derived(folder: Path, hf: dict, pt: int) -> dict:
    """SigVLPConfig fields the checkpoint fixes -> (value, where it comes from)."""
    vis, txt = hf["vision_config"], hf["text_config"]
    p = vis.get("patch_size", 16)
    return {
        "width": (vis["hidden_size"], "vision_config.hidden_size"),
        "layers": (vis["num_hidden_layers"], "vision_config.num_hidden_layers"),
        "heads": (vis["num_attention_heads"], "vision_config.num_attention_heads"),
        "mlp_dim": (vis["intermediate_size"], "vision_config.intermediate_size"),
        "patch_size": ((pt, p, p), f"vision_config.patch_size {p} in-plane (pt is free)"),
        "pool": ("map", "vision_model.head, SigLIP's MAP head"),
        "text_width": (txt["hidden_size"], "text_config.hidden_size"),
        "text_layers": (txt["num_hidden_layers"], "text_config.num_hidden_layers"),
        "text_heads": (txt["num_attention_heads"], "text_config.num_attention_heads"),
        "text_mlp_dim": (txt["intermediate_size"], "text_config.intermediate_size"),
        "text_pool": ("last", "SigLIP's last-token text pooling"),
        "tokenizer": (str(folder.resolve()), "the folder's own tokenizer.json"),
        "vocab": (None, "the folder's own tokenizer.json"),
        "vocab_size": (txt["vocab_size"], "text_config.vocab_size"),
        "embed_dim": (txt.get("projection_size") or txt["hidden_size"], "text_config.projection_size"),
        "norm_eps": (vis.get("layer_norm_eps", 1e-6), "layer_norm_eps"),
    }


def siglip_config(path, *, text_positions: str = "rope", **overrides) -> SigVLPConfig:
    """The SigVLPConfig ``from_siglip`` builds for the SigLIP folder ``path``: the checkpoint's
    widths, layers, heads, MLP sizes, norm eps, vocabulary size and tokenizer (the folder), MAP
    pooling, last-token text pooling, max_text_tokens = its text position table's length
    (text_config.max_position_embeddings, 64 for SigLIP-2), the HU encoding off; ``overrides`` set
    any other field. An override contradicting the checkpoint is a ValueError naming the field
    (max_text_tokens may be larger only with text_positions="rope"; patch_size's pt is free)."""
    folder = Path(path)
    hf = read_hf_config(folder)
    bad = sorted(set(overrides) & set(_FROM_WEIGHTS))
    if bad:
        raise ValueError(f"{bad}: from_siglip takes them from the checkpoint's logit_scale / logit_bias weights")
    pt = tuple(overrides.get("patch_size", SigVLPConfig.patch_size))[0]
    derived = _derived(folder, hf, pt)
    for name, (value, source) in derived.items():
        given = overrides.get(name, value)
        if (tuple(given) if name == "patch_size" else given) != value:
            raise ValueError(f"{name}: {given!r} contradicts the checkpoint's {value!r} ({source}); leave it to "
                             f"from_siglip")
    table = hf["text_config"].get("max_position_embeddings", 64)
    max_text = overrides.get("max_text_tokens", table)
    if text_positions == "learned" and isinstance(max_text, int) and max_text > table:
        raise ValueError(f"max_text_tokens: {max_text} is more than the checkpoint's {table} learned text "
                         f"positions (text_config.max_position_embeddings); text_positions='learned' caps texts "
                         f"there")
    fields = {**{k: v for k, (v, _) in derived.items()}, "max_text_tokens": table, **overrides,
              "text_positions": text_positions}
    return SigVLPConfig.from_dict(fields)  # older hu_thresholds / hu_grid overrides map into hu


# ---------------------------------------------------------------------------- checkpoint files
def checkpoint_files(folder) -> dict[str, Path]:
    """key -> the safetensors file holding it: model.safetensors.index.json's weight_map (sharded)
    or model.safetensors' keys. FileNotFoundError naming what is missing."""
    from safetensors import safe_open

    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index}: expected a non-empty 'weight_map' object (key -> shard file)")
        files = {k: folder / str(f) for k, f in weight_map.items()}
        absent = sorted({str(f) for f in files.values() if not f.is_file()})
        if absent:
            raise FileNotFoundError(f"{index}: shard file(s) {absent} not in {folder}")
        return files
    single = folder / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"{folder}: neither model.safetensors nor model.safetensors.index.json (from_siglip "
                                f"reads safetensors weights only)")
    with safe_open(str(single), framework="pt") as f:
        return {k: single for k in f.keys()}


def _read_tensors(files: dict[str, Path], keys) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    by_file: dict[Path, list[str]] = {}
    for k in keys:
        by_file.setdefault(files[k], []).append(k)
    out = {}
    for path, names in by_file.items():
        with safe_open(str(path), framework="pt") as f:
            for k in names:
                out[k] = f.get_tensor(k)
    return out


# ---------------------------------------------------------------------------- the mapping
def _same(t):
    return t


def _cat(*ts):
    return torch.cat(ts, 0)


def _pair(plan: dict, ours: str, theirs: str, fn=_same) -> None:
    """ours.{weight,bias} <- theirs.{weight,bias}."""
    for p in ("weight", "bias"):
        plan[f"{ours}.{p}"] = ((f"{theirs}.{p}",), fn)


def _tower_plan(plan: dict, ours: str, theirs: str, layers: int) -> None:
    for i in range(layers):
        o, t = f"{ours}.blocks.{i}", f"{theirs}.encoder.layers.{i}"
        for a, b in (("norm1", "layer_norm1"), ("attn.proj", "self_attn.out_proj"), ("norm2", "layer_norm2"),
                     ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
            _pair(plan, f"{o}.{a}", f"{t}.{b}")
        for p in ("weight", "bias"):
            plan[f"{o}.attn.qkv.{p}"] = (tuple(f"{t}.self_attn.{n}_proj.{p}" for n in "qkv"), _cat)


def _inflate(pt: int):
    def fn(w):
        """(width, 3, p, p) -> (width, pt*p*p): summed over RGB, spread evenly over the pt slices."""
        flat = w.sum(1, keepdim=True).div(pt).expand(-1, pt, -1, -1)
        return flat.reshape(w.shape[0], -1)
    return fn


def mapping(cfg: SigVLPConfig, patch_init: str) -> tuple[dict, tuple[str, ...]]:
    """(plan, dropped): plan maps each SigVLP state key to (SigLIP keys, fn making our tensor from
    theirs); dropped lists the SigLIP keys read on purpose by no one (the module docstring's table)."""
    plan: dict = {}
    _tower_plan(plan, "visual", "vision_model", cfg.layers)
    _tower_plan(plan, "text", "text_model", cfg.text_layers)
    w, head = cfg.width, "vision_model.head"
    _pair(plan, "visual.norm", "vision_model.post_layernorm")
    plan["visual.pool.probe"] = ((f"{head}.probe",), lambda t: t.reshape(-1))
    plan["visual.pool.q.weight"] = ((f"{head}.attention.in_proj_weight",), lambda t: t[:w])
    plan["visual.pool.q.bias"] = ((f"{head}.attention.in_proj_bias",), lambda t: t[:w])
    plan["visual.pool.kv.weight"] = ((f"{head}.attention.in_proj_weight",), lambda t: t[w:])
    plan["visual.pool.kv.bias"] = ((f"{head}.attention.in_proj_bias",), lambda t: t[w:])
    for a, b in (("proj", "attention.out_proj"), ("norm", "layernorm"), ("mlp.fc1", "mlp.fc1"),
                 ("mlp.fc2", "mlp.fc2")):
        _pair(plan, f"visual.pool.{a}", f"{head}.{b}")
    dropped = ["vision_model.embeddings.position_embedding.weight", "vision_model.embeddings.position_ids",
               "text_model.embeddings.position_ids"]
    patch = "vision_model.embeddings.patch_embedding"
    if patch_init == "inflate":
        plan["visual.patch_embed.weight"] = ((f"{patch}.weight",), _inflate(cfg.patch_size[0]))
        plan["visual.patch_embed.bias"] = ((f"{patch}.bias",), _same)
    else:
        dropped += [f"{patch}.weight", f"{patch}.bias"]
    plan["text.token_embedding.weight"] = (("text_model.embeddings.token_embedding.weight",), _same)
    table = "text_model.embeddings.position_embedding.weight"
    if cfg.text_positions == "learned":
        plan["text.position_embedding.weight"] = ((table,), lambda t: t[: cfg.max_text_tokens])
    else:
        dropped.append(table)
    _pair(plan, "text.norm", "text_model.final_layer_norm")
    _pair(plan, "text.head", "text_model.head")
    plan["log_logit_scale"] = (("logit_scale",), lambda t: t.reshape(()))
    plan["logit_bias"] = (("logit_bias",), lambda t: t.reshape(()))
    return plan, tuple(dropped)


def _check_keys(folder, present, plan: dict, dropped) -> None:
    needed = {k for keys, _ in plan.values() for k in keys}
    missing = sorted(needed - set(present))
    unexpected = sorted(set(present) - needed - set(dropped))
    for what, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            raise ValueError(f"{folder}: {len(keys)} {what} checkpoint key(s) {keys[:6]}"
                             f"{' ...' if len(keys) > 6 else ''} for the SigLIP mapping (a partial or "
                             f"different model; supported: {SUPPORTED})")


def _new_weights(model, state: dict, own: dict) -> None:
    """The weights SigLIP has no counterpart for: the volume head (identity when square) and the
    HU encoding's projection (zero, so the inflate property holds)."""
    cfg = model.config
    new = ("visual.head.", "visual.hu_encoding.", "visual.patch_embed.")
    unmapped = sorted(k for k in own if k not in state and not k.startswith(new))
    if unmapped:  # a SigVLP weight this mapping does not know: it must be added to it, never left random
        raise RuntimeError(f"from_siglip: no SigLIP source or initialisation for {unmapped}")
    if cfg.width == cfg.embed_dim:
        state["visual.head.weight"] = torch.eye(cfg.width, dtype=own["visual.head.weight"].dtype)
        state["visual.head.bias"] = torch.zeros_like(own["visual.head.bias"])
    for k in own:
        if k.startswith("visual.hu_encoding."):
            state[k] = torch.zeros_like(own[k])


def load_siglip(cls, path, *, patch_init: str = "inflate", text_positions: str = "rope", **overrides):
    """``cls`` (SigVLP) built by ``siglip_config(path, text_positions=..., **overrides)`` with the
    folder's SigLIP weights mapped in (module docstring). patch_init: "inflate" or "random".
    Errors: FileNotFoundError (folder, config.json, weights, tokenizer.json), ValueError naming the
    architecture, an override, or the missing/unexpected/mis-shaped keys."""
    if patch_init not in PATCH_INITS:
        raise ValueError(f"patch_init: expected one of {PATCH_INITS}, got {patch_init!r}")
    folder = Path(path)
    cfg = siglip_config(folder, text_positions=text_positions, **overrides)
    if not (folder / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{folder / 'tokenizer.json'}: no such file; from_siglip reads the folder's own "
                                f"tokenizer from it (SigLIP-1 folders ship only spiece.model); supported: {SUPPORTED}")
    files = checkpoint_files(folder)
    plan, dropped = mapping(cfg, patch_init)
    _check_keys(folder, files, plan, dropped)
    theirs = _read_tensors(files, sorted({k for keys, _ in plan.values() for k in keys}))
    model = cls(cfg)
    own = model.state_dict()
    state = {}
    for key, (names, fn) in plan.items():
        t = fn(*(theirs[n] for n in names))
        if tuple(t.shape) != tuple(own[key].shape):
            raise ValueError(f"{folder}: {names[0]} gives {key} of shape {tuple(t.shape)}, the model (built from "
                             f"config.json) expects {tuple(own[key].shape)}")
        state[key] = t.to(own[key].dtype).contiguous()
    _new_weights(model, state, own)
    model.load_state_dict({**own, **state}, strict=True)
    return model

