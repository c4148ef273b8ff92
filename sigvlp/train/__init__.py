"""sigvlp.train: the training loop (``Trainer``, ``train``), its config (``TrainConfig``),
checkpoints (sigvlp.checkpoint), prompt supervision and the ``sigvlp train`` command (``sigvlp demo`` is
sigvlp.demo.run).

    from sigvlp.train import TrainConfig, train
    train(TrainConfig(data="phantoms", out="runs/tiny", steps=200))
"""

from sigvlp.train.config import TrainConfig, apply_overrides, load_config, parse_override, save_config
from sigvlp.train.trainer import Trainer, TrainingDiverged, lr_factor, train

__all__ = ["TrainConfig", "Trainer", "TrainingDiverged", "apply_overrides", "load_config", "lr_factor",
           "parse_override", "save_config", "train"]
