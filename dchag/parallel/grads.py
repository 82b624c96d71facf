"""Gradient fix-ups that megatron's own DDP would do, done in autograd so any optimizer
wrapper (DeepSpeed ZeRO 0-3 included) sees correct gradients."""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps


def allreduce_sequence_parallel_grads(module: torch.nn.Module) -> int:
    """Under sequence parallelism each TP rank's layer norms (and row-parallel biases) see only
    its L/T tokens, so their gradient is a partial sum; megatron marks them
    ``sequence_parallel=True`` and its DDP all-reduces them over TP after backward
    (``finalize_model_grads``). We do it in a gradient hook instead, so the reduced gradient is
    what DeepSpeed accumulates and partitions. Returns the number of hooked parameters."""
    if ps.get_tensor_model_parallel_world_size() == 1:
        return 0
    group = ps.get_tensor_model_parallel_group()

    def reduce(grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=group)
        return grad

    hooked = 0
    for param in module.parameters():
        if getattr(param, "sequence_parallel", False) and param.requires_grad:
            param.register_hook(reduce)
            hooked += 1
    return hooked
