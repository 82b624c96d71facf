"""Prediction where training ran: tools/predict.py under torchrun, srun or deepspeed, like training.

The processes form the training's layout: ``--tensor-model-parallel-size T`` and
``--channel-parallel-size P`` (default 1: every process a whole model), and the data-parallel
replicas (world / T) share the tiles: per round, replica d predicts tiles [d B, (d + 1) B) of the
round's D x B (B = --batch-size). Rank, world and rendezvous come from the launcher
(``dchag.training.launch``), the process groups from ``dchag.training.initialize`` (megatron's
``parallel_state`` with the channel group), each rank on its device (``dchag.device``).

Each rank reads only its tiles and, of them, only its channels (the model's channel-parallel
partition); the model (:class:`PretrainedDChag` over the distributed ``DChagViT``) returns every
channel's output on every rank of the model-parallel group. The first rank of each model-parallel
group sends its replica's outputs to global rank 0 (one gather per round), which stitches them in
tile order, exactly as one process would, and writes the one output.

The weights: from the export, each rank reads only its shard of every parameter (safetensors
slices); from a DeepSpeed ``--save`` folder (any T, P, DP, ZeRO stage it was saved with), the
shards are merged into full tensors as conversion does (``dchag.checkpointing.reader``), and each
rank keeps its own shard (``dchag.parallel.state_dict``).
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import torch


def launched() -> bool:
    """Whether a launcher (torchrun, deepspeed, srun) started this process."""
    from dchag.training import launch
    return launch.launcher() != "single"


def start(tensor_parallel_size: int, channel_parallel_size: int, seed: int = 1234) -> None:
    """Process groups and megatron's layout for (T, P), as training makes them (the layout checked
    against the world first: T | world, P | T)."""
    from dchag.parallel.partition import LayoutError
    from dchag.training import launch
    T, P = tensor_parallel_size, channel_parallel_size
    world = launch.resolve()["WORLD_SIZE"]
    if T < 1 or P < 1 or world % T or T % P:
        raise LayoutError(f"--tensor-model-parallel-size {T} --channel-parallel-size {P} on {world} process(es): T "
                          f"must divide the number of processes and P must divide T (e.g. --nproc_per_node {T} with "
                          f"--tensor-model-parallel-size {T}).")
    import megatron_patches
    megatron_patches.import_megatron()  # first: on the CPU without megatron's torch.compile fuser (start-up time)
    from dchag.training.initialize import init_distributed, init_model_parallel
    init_distributed()
    megatron_patches.apply()
    init_model_parallel(SimpleNamespace(tensor_model_parallel_size=tensor_parallel_size,
                                        channel_parallel_size=channel_parallel_size, seed=seed))


class TileShare:
    """The data-parallel replicas share the tiles; global rank 0 gathers and writes."""

    def __init__(self, device: torch.device):
        import torch.distributed as dist
        from megatron.core import parallel_state as ps
        self.rank, self.size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        self.writes = dist.get_rank() == 0
        self.leader = ps.get_tensor_model_parallel_rank() == 0  # holds its replica's outputs; sends them
        self.group = ps.get_data_parallel_group()  # the leaders, for the leaders
        self.device = device

    def gather(self, y: np.ndarray, counts: list[int]):
        """This replica's outputs [n, ...] -> on global rank 0, the round's outputs of every
        replica in tile order ([sum(counts), ...]); None elsewhere."""
        import torch.distributed as dist
        if self.size == 1:
            return y if self.writes else None
        if not self.leader:
            return None
        most = max(counts)
        t = torch.zeros((most,) + y.shape[1:], dtype=torch.float32, device=self.device)
        t[:len(y)] = torch.from_numpy(np.ascontiguousarray(y[:most])).to(self.device)
        parts = [torch.empty_like(t) for _ in range(self.size)] if self.writes else None
        dist.gather(t, parts, dst=0, group=self.group)
        if not self.writes:
            return None
        return np.concatenate([p[:n].cpu().numpy() for p, n in zip(parts, counts)])


def load_model(path: str, device: torch.device, dtype: torch.dtype = torch.float32):
    """The model of ``path`` (an export or a DeepSpeed checkpoint folder) in the current layout, as
    a :class:`PretrainedDChag` on ``device``."""
    from dchag.inference.pretrained import PretrainedDChag, read_model
    from dchag.model.vit import DChagViT
    from dchag.parallel.layout import ParallelLayout

    def build(cfg):
        return DChagViT(cfg, ParallelLayout.current())

    model, config = read_model(path, build, dtype)
    model.to(device).eval()
    return PretrainedDChag(model, config, device)


def stop() -> None:
    import torch.distributed as dist
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def rank() -> int:
    return int(os.environ.get("RANK", "0"))
