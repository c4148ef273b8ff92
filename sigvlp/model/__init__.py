"""The SigVLP model (``SigVLP``, ``SigVLPConfig``) and ``volume_batch``.

    from sigvlp.model import SigVLP, SigVLPConfig
    model = SigVLP(SigVLPConfig.preset("tiny"))
    out = model(batch)          # batch: the sigvlp.data collate dict

The model calls only ``sigvlp.ops`` (rope_attention_varlen for every attention).
"""

from sigvlp.model.batch import volume_batch
from sigvlp.model.config import PRESETS, RUNTIME_FIELDS, HUEncodingConfig, SigVLPConfig
from sigvlp.model.modeling import SigVLP, SigVLPOutput, TextEncoder, VolumeEncoder

__all__ = ["HUEncodingConfig", "PRESETS", "RUNTIME_FIELDS", "SigVLP", "SigVLPConfig", "SigVLPOutput", "TextEncoder", "VolumeEncoder",
           "volume_batch"]
