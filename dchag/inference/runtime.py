"""One plain process, no launcher: the 1-rank process group and megatron layout a serial
(T = P = 1) DChagViT needs, created on demand and left alone when a run already has them."""

from __future__ import annotations

import os

import torch


class RuntimeLayoutError(RuntimeError):
    pass


def default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def ensure_serial_process(seed: int = 1234) -> None:
    """Make this process able to build the serial model: a 1-rank gloo group (no launcher, no
    port: an in-memory store) and megatron's parallel state with T = P = 1. Inside a run that
    already initialized them with T = 1 nothing changes; with T > 1 it refuses (the serial
    model would not match the run's tensor-parallel groups)."""
    import torch.distributed as dist
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import megatron_patches
    megatron_patches.import_megatron()  # first: on the CPU without megatron's torch.compile fuser (start-up time)
    from megatron.core import parallel_state as ps, tensor_parallel
    megatron_patches.apply()
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    if ps.model_parallel_is_initialized():
        if ps.get_tensor_model_parallel_world_size() != 1:
            raise RuntimeLayoutError(
                "this process already runs a tensor-parallel layout (T = "
                f"{ps.get_tensor_model_parallel_world_size()}); the serial model needs T = 1. Load it in a "
                "separate process, or use the distributed model itself.")
        return
    if dist.get_world_size() != 1:
        raise RuntimeLayoutError("the serial model is built in a single process; this one belongs to a "
                                 f"{dist.get_world_size()}-rank job without a model-parallel layout.")
    megatron_patches.initialize_model_parallel_with_channels(1, 1)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def build_serial_model(cfg):
    """DChagViT(cfg) at T = P = 1 in this process (see :func:`ensure_serial_process`)."""
    ensure_serial_process(cfg.init_seed)  # before the model's modules import megatron-core
    from dchag.model.vit import DChagViT
    from dchag.parallel.layout import ParallelLayout
    return DChagViT(cfg, ParallelLayout.serial())
