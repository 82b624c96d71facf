"""Megatron-style log line, peak memory per rank, TensorBoard writer."""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist


def comm_device() -> torch.device:
    """Where tensors handed to collectives live: the run's GPU under NCCL/RCCL, else the CPU
    (the run's device decides, not whether a GPU exists: ``dchag.device``)."""
    from dchag.device import run_device
    return run_device()


def reset_peak_memory() -> None:
    if comm_device().type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory_mb() -> float:
    """Max over ranks of this interval's peak memory (VmHWM on CPU)."""
    if comm_device().type == "cuda":
        mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        mb = 0.0
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        mb = int(line.split()[1]) / 1024
        except OSError:
            pass
    t = torch.tensor([mb], dtype=torch.float64, device=comm_device())
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def invalid_input_values(local_count: torch.Tensor) -> int:
    """Input values zero-filled and masked (NaN/Inf, no-data) in this interval, over the whole
    global batch: each rank counted its own channels; ranks holding a replica of the same
    channels (T/P channel-stage replicas per TP group) counted the same values, so divide."""
    from megatron.core import parallel_state as ps
    t = local_count.to(device=comm_device(), dtype=torch.float64).reshape(1)
    if dist.is_initialized():
        dist.all_reduce(t)
    replicas = ps.get_tensor_model_parallel_world_size() // ps.get_channel_parallel_world_size()
    return int(round(t.item() / replicas))


def log_line(iteration, train_iters, consumed, ms_per_iter, lr, gbs, loss, grad_norm, sps, mem_mb, skipped, nans,
             invalid=None, empty=None):
    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    gn = "nan" if grad_norm is None else f"{grad_norm:.3f}"
    return (f"[{now}] iteration {iteration:8d}/{train_iters:8d} | consumed samples: {consumed:12d} | "
            f"elapsed time per iteration (ms): {ms_per_iter:.1f} | learning rate: {lr:.6E} | "
            f"global batch size: {gbs:5d} | loss: {loss:.6E} | grad norm: {gn} | "
            f"samples per second: {sps:.1f} | peak memory (MB): {mem_mb:.0f} | "
            f"number of skipped iterations: {skipped:3d} | number of nan iterations: {nans:3d} |"
            + ("" if invalid is None else f" number of invalid input values: {invalid:d} |")
            + ("" if not empty else f" number of samples without a valid value: {empty:d} |"))


def tensorboard_writer(path):
    if not path:
        return None
    from torch.utils.tensorboard import SummaryWriter
    return SummaryWriter(log_dir=path)
