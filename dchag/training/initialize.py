"""Process groups and seeds: torch.distributed from the launcher's env, then megatron's layout."""

from __future__ import annotations

import os

import torch


def init_distributed() -> None:
    """The run's device decides (``dchag.device``): gloo on the CPU; NCCL/RCCL and the local
    rank's GPU otherwise. DeepSpeed is told the same through ``DS_ACCELERATOR``."""
    from dchag.device import comm_backend, run_device
    device = run_device()  # raises a DeviceError naming the fix
    os.environ.setdefault("DS_ACCELERATOR", device.type)
    import deepspeed
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    deepspeed.init_distributed(dist_backend=comm_backend(), verbose=False)


def init_model_parallel(args) -> None:
    import megatron_patches
    from megatron.core import parallel_state as ps, tensor_parallel
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    megatron_patches.initialize_model_parallel_with_channels(args.tensor_model_parallel_size,
                                                            args.channel_parallel_size)
    tensor_parallel.model_parallel_cuda_manual_seed(args.seed)
    torch.manual_seed(args.seed)
