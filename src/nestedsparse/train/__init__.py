"""Training: the nested loss, the trainer (DDP-ready), checkpoints that resume."""
from .consensus import CONSENSUS_MODES, LevelConsensus, consensus_accuracy, fit_consensus
from .loss import SAMPLINGS, Hierarchy, coarse_logits, nested_loss, sample_levels
from .trainer import TrainConfig, TrainResult, evaluate, train

__all__ = ["nested_loss", "sample_levels", "SAMPLINGS", "Hierarchy", "coarse_logits", "TrainConfig", "TrainResult",
           "train", "evaluate", "LevelConsensus", "fit_consensus", "consensus_accuracy", "CONSENSUS_MODES"]
