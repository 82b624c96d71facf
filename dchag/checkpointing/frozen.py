"""Frozen parameters (--freeze-encoder, LoRA's base weights) in a universal checkpoint.

DeepSpeed's ``ds_to_universal`` writes ``zero/NAME/{fp32,exp_avg,exp_avg_sq,step}.pt`` for what
the optimizer holds, merged over the model-parallel ranks; for a parameter the optimizer does not
hold it writes ``fp32.pt`` alone, copied from model-parallel rank 0's model-states file: only that
rank's shard of a tensor- or channel-parallel parameter. And its universal loader restores only
what the optimizer holds: a frozen parameter would silently keep this run's initialization.

:func:`add_to_universal` (re)writes ``zero/NAME/fp32.pt`` (the full fp32 tensor as
``{"param": ...}``, ds_to_universal's own form) for every parameter without optimizer state, merged
from the source checkpoint (``dchag.checkpointing.reader``: the model-states files or ZeRO's frozen
fragments); :func:`restore_from_universal` copies each into this rank's frozen parameter after
DeepSpeed's load.
"""

from __future__ import annotations

import os

import torch

from dchag.checkpointing import pickles
from dchag.checkpointing.errors import CheckpointError

FP32 = "fp32.pt"


def _path(universal_folder: str, name: str) -> str:
    return os.path.join(universal_folder, "zero", name, FP32)


def _has_optimizer_state(universal_folder: str, name: str) -> bool:
    return os.path.exists(os.path.join(universal_folder, "zero", name, "exp_avg.pt"))


def add_to_universal(source_folder: str, universal_folder: str, names: list[str]) -> list[str]:
    """Write the parameters among ``names`` (every parameter of the model) that have no optimizer state
    in ``universal_folder`` whole; returns their names."""
    from dchag.checkpointing.reader import read_full_state_dict
    missing = [n for n in names if not _has_optimizer_state(universal_folder, n)]
    if missing:
        tensors, _ = read_full_state_dict(source_folder, missing)
        for name in missing:
            os.makedirs(os.path.dirname(_path(universal_folder, name)), exist_ok=True)
            torch.save({"param": tensors[name].float().contiguous()}, _path(universal_folder, name))
    return missing


@torch.no_grad()
def restore_from_universal(engine, universal_folder: str) -> int:
    """Copy every frozen parameter of ``engine.module`` (its shard for this layout) from the
    universal checkpoint; returns how many. A frozen parameter without its file is refused."""
    import deepspeed
    from dchag.parallel.state_dict import shard_of
    frozen = [(n, p) for n, p in engine.module.named_parameters() if not p.requires_grad]
    lost = [n for n, _ in frozen if not os.path.exists(_path(universal_folder, n))]
    if lost:
        raise CheckpointError(f"{universal_folder} holds no values for {len(lost)} frozen parameter(s) of this run, "
                              f"e.g. {lost[:3]} (converted before frozen parameters were kept?): convert the "
                              "original checkpoint again with tools/convert_checkpoint.py --format universal.")
    zero3 = [p for _, p in frozen if hasattr(p, "ds_id")]
    with deepspeed.zero.GatheredParameters(zero3, modifier_rank=0, enabled=bool(zero3)):
        for name, p in frozen:
            full = pickles.load(_path(universal_folder, name))["param"]
            piece = shard_of(p, full)
            shape = tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape)
            if tuple(piece.shape) != shape:
                raise CheckpointError(f"{universal_folder}: frozen {name} has {tuple(full.shape)} values there, which "
                                      f"do not cut into this layout's {shape}.")
            p.data.copy_(piece.to(p.dtype))
    return len(frozen)
