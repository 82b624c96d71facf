"""The process groups of an N-rank job, seen from one rank, without the other N - 1 processes.

torch's fake backend (``FakeStore`` + backend "fake") returns from every collective at once and
moves no data, so megatron's ``initialize_model_parallel`` and our channel groups are built for
the full world in one process: group sizes and ranks are those of rank R in the real job.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist


@contextlib.contextmanager
def fake_world(world_size: int, rank: int, tensor_parallel: int, channel_parallel: int, seed: int = 1234):
    """Inside: ``torch.distributed`` is rank ``rank`` of ``world_size`` with megatron's TP/DP groups
    and the channel-parallel groups of (T, P) built. Refuses to run inside a real process group."""
    from dchag.parallel.partition import LayoutError
    if dist.is_initialized():
        raise RuntimeError("a process group is already initialized: the simulation needs a process of its own "
                           "(run tools/simulate_scale.py, not inside a training job).")
    if world_size < 1 or not 0 <= rank < world_size:
        raise LayoutError(f"--rank {rank} is not a rank of --world-size {world_size}: choose 0 <= rank < world size.")
    from torch.testing._internal.distributed.fake_pg import FakeStore  # registers the "fake" backend
    import megatron_patches
    from megatron.core import parallel_state as ps, tensor_parallel as mtp
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        megatron_patches.initialize_model_parallel_with_channels(tensor_parallel, channel_parallel)
        mtp.model_parallel_cuda_manual_seed(seed)
        torch.manual_seed(seed)
        yield
    finally:
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        dist.destroy_process_group()
