"""The SigVLP model (``SigVLP``, ``SigVLPConfig``) and ``volume_batch``.

    from sigvlp.model import SigVLP, SigVLPConfig
    model = SigVLP(SigVLPConfig.preset("tiny"))
    out = model(batch)          # batch: the sigvlp.data collate dict

The model calls only ``sigvlp.ops`` (rope_attention_varlen for every attention). Names are
imported on first use, so ``sigvlp.model.config`` (preset names for command-line help) imports
no torch.
"""

from sigvlp.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "sigvlp.model.batch": ["volume_batch"],
    "sigvlp.model.config": ["HUEncodingConfig", "PRESETS", "RUNTIME_FIELDS", "SigVLPConfig"],
    "sigvlp.model.modeling": ["SigVLP", "SigVLPOutput", "TextEncoder", "VolumeEncoder"],
}, globals())
