"""Training: arguments -> process groups -> DeepSpeed engine -> loop with logs and checkpoints."""

from .loop import pretrain, release, run, shutdown

__all__ = ["pretrain", "release", "run", "shutdown"]
