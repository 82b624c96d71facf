"""Process groups and seeds: torch.distributed from the launcher's env, then megatron's layout."""

from __future__ import annotations

import os

import torch

from dchag.parallel.partition import LayoutError


def check_world(args, world_size: int) -> None:
    """The world must split into T-rank model replicas (checked before the data-parallel size is used)."""
    T, P = args.tensor_model_parallel_size, args.channel_parallel_size
    if T < 1 or P < 1:
        raise LayoutError("--tensor-model-parallel-size and --channel-parallel-size must be >= 1.")
    if world_size % T:
        raise LayoutError(f"the world size {world_size} is not divisible by --tensor-model-parallel-size {T}: "
                          f"launch a multiple of {T} processes.")


def check_layout(args, cfg, world_size: int) -> None:
    """Layout errors before any process group is created (every rank raises the same)."""
    T, P = args.tensor_model_parallel_size, args.channel_parallel_size
    if T < 1 or P < 1:
        raise LayoutError("--tensor-model-parallel-size and --channel-parallel-size must be >= 1.")
    if world_size % T:
        raise LayoutError(f"the world size {world_size} is not divisible by --tensor-model-parallel-size {T}.")
    cfg.validate_layout(T, P)


def init_distributed() -> None:
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    deepspeed.init_distributed(dist_backend=backend, verbose=False)


def init_model_parallel(args) -> None:
    import megatron_patches
    from megatron.core import parallel_state as ps, tensor_parallel
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    megatron_patches.initialize_model_parallel_with_channels(args.tensor_model_parallel_size,
                                                            args.channel_parallel_size)
    tensor_parallel.model_parallel_cuda_manual_seed(args.seed)
    torch.manual_seed(args.seed)
