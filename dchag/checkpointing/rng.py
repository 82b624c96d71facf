"""RNG states per rank, saved in the checkpoint's client state so a resume continues exactly.

DeepSpeed keeps one client state per model-parallel rank, so every data-parallel rank's states
are gathered into it: python, numpy, torch, CUDA (when present) and megatron's RNG tracker.
"""

from __future__ import annotations

import random

import numpy as np
import torch
import torch.distributed as dist


def rng_state() -> dict:
    from megatron.core import tensor_parallel
    state = {"random": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def gather_over_data_parallel(obj) -> list:
    from megatron.core import parallel_state as ps
    group = ps.get_data_parallel_group()
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out
