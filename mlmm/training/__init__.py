"""Training: DeepSpeed engine setup, the Trainer recipe, checkpoints and LR schedules."""
from mlmm.training.trainer import Trainer

__all__ = ["Trainer"]
