"""Training: the nested loss, the trainer (DDP-ready), checkpoints that resume."""
from .loss import SAMPLINGS, nested_loss, sample_levels
from .trainer import TrainConfig, TrainResult, evaluate, train

__all__ = ["nested_loss", "sample_levels", "SAMPLINGS", "TrainConfig", "TrainResult", "train", "evaluate"]
