"""sigvlp: kernels and model for SigVLP (3D CT volume-language pretraining).

Subpackages: sigvlp.ops (torch ops with torch/Triton/CUDA backends), sigvlp.kernels (Triton),
and the model, data, training and evaluation code built on them.
"""

__version__ = "0.1.0"
