"""sigvlp.train: the training loop (``Trainer``, ``train``), its config (``TrainConfig``),
checkpoints (sigvlp.checkpoint), prompt supervision and the ``sigvlp train`` command (``sigvlp demo`` is
sigvlp.demo.run).

    from sigvlp.train import TrainConfig, train
    train(TrainConfig(data="phantoms", out="runs/tiny", steps=200))

Names are imported on first use, so the command-line parser (sigvlp.train.cli) imports no torch.
"""

from sigvlp.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "sigvlp.train.config": ["TrainConfig", "apply_overrides", "load_config", "parse_override", "save_config"],
    "sigvlp.train.trainer": ["Trainer", "TrainingDiverged", "lr_factor", "train"],
}, globals())
