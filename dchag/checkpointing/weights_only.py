"""``--no-load-optim``: load a checkpoint's weights (and iteration, consumed samples, LR
schedule), start the optimizer moments fresh.

Works for every ZeRO stage on both sides: this rank's weights come from its model-parallel
rank's files (the fp32 master weights where ZeRO has them, via :mod:`dchag.checkpointing.reader`),
are copied into the module (ZeRO 3: gathered, changed, re-partitioned), and the optimizer's
fp32 master copy is refreshed from them (``refresh_fp32_params``).
"""

from __future__ import annotations

import glob
import os

import torch

from dchag.checkpointing import pickles
from dchag.checkpointing.errors import CheckpointError


def has_optimizer_state(folder: str) -> bool:
    """ZeRO optimizer shards, a ZeRO 0 optimizer state in the model-states file, or a universal
    checkpoint's zero/ folder."""
    if glob.glob(os.path.join(folder, "*optim_states.pt")) or os.path.isdir(os.path.join(folder, "zero")):
        return True
    files = sorted(glob.glob(os.path.join(folder, "mp_rank_*_model_states.pt")))
    if not files:
        return False
    state = pickles.load(files[0], mmap=True)
    return state.get("optimizer") is not None


def refuse_without_optimizer_state(folder: str) -> None:
    if not has_optimizer_state(folder):
        raise CheckpointError(f"{folder} holds model weights but no optimizer state (a converted checkpoint?). Pass "
                              "--no-load-optim to start the optimizer moments fresh from these weights (iteration, "
                              "consumed samples and LR schedule are kept).")


def _own_client_state(folder: str, mp: int) -> dict:
    files = sorted(glob.glob(os.path.join(folder, f"*mp_rank_{mp:02d}_model_states.pt")))
    if not files:
        raise CheckpointError(f"{folder} has no model-states file for model-parallel rank {mp}.")
    return pickles.load(files[0])


@torch.no_grad()
def load_weights_only(engine, folder: str) -> dict:
    """Copy this rank's weights from ``folder`` into ``engine``; returns the client state."""
    import deepspeed
    from megatron.core import parallel_state as ps
    from dchag.checkpointing.reader import _fp32_weights_of_rank
    mp = ps.get_tensor_model_parallel_rank()
    weights = _fp32_weights_of_rank(folder, mp)
    params = dict(engine.module.named_parameters())
    missing = [n for n in params if n not in weights]
    if missing:
        raise CheckpointError(f"{folder} lacks {len(missing)} parameter(s) of this model, e.g. {missing[:3]}.")
    zero3 = [p for p in params.values() if hasattr(p, "ds_id")]
    with deepspeed.zero.GatheredParameters(zero3, modifier_rank=0, enabled=bool(zero3)):
        for name, p in params.items():
            src = weights[name]
            shape = tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape)
            if tuple(src.shape) != shape:
                raise CheckpointError(f"{folder}: {name} has shape {tuple(src.shape)} there but {shape} in this "
                                      "layout; convert the checkpoint to this layout (tools/convert_checkpoint.py).")
            p.data.copy_(src.to(p.dtype))
    if engine.optimizer is not None and hasattr(engine.optimizer, "refresh_fp32_params"):
        engine.optimizer.refresh_fp32_params()
    state = _own_client_state(folder, mp)
    engine.global_steps = int(state.get("iteration", 0))
    engine.global_samples = int(state.get("consumed_samples", 0))
    return state
