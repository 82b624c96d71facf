"""Which process does a checkpoint check's one side effect (moving a folder aside, taking the
lock), before or after torch.distributed is initialized."""

from __future__ import annotations

import os


def is_first_rank() -> bool:
    """Rank 0 of the process group, or (before one exists) of the launcher's environment:
    ``RANK`` (torchrun, deepspeed, mp.spawn), else ``SLURM_PROCID`` (srun); a lone process is."""
    import torch.distributed as dist
    if dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) == 0


def say(msg: str) -> None:
    """Print a checkpoint check's message once (on the first rank)."""
    if is_first_rank():
        print(msg, flush=True)
