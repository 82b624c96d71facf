"""Training: arguments -> process groups -> DeepSpeed engine -> loop with logs and checkpoints."""

from .loop import pretrain, run

__all__ = ["pretrain", "run"]
