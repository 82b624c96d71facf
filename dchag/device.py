"""Which device a run uses, decided once, from what the launcher asked for and what is present.

The run's device, not ``torch.cuda.is_available()``, decides everything device-specific: the
megatron CPU patches, the CPU TransformerConfig overrides, the communication backend (gloo on
CPU; NCCL on NVIDIA, RCCL on AMD, both named ``nccl`` by torch), where collectives' tensors and
the batch live, and how peak memory is read. So ``DS_ACCELERATOR=cpu`` (``make test``, the CPU
examples) runs entirely on the CPU even on a machine that has GPUs.

Rules (DeepSpeed's own accelerator variable, so DeepSpeed and we always agree):

* ``DS_ACCELERATOR=cpu``  -> CPU;
* ``DS_ACCELERATOR=cuda`` -> the GPU ``LOCAL_RANK`` (CUDA or ROCm build); an error without a GPU;
* unset                   -> the GPU ``LOCAL_RANK`` when torch sees one, else the CPU;
* anything else           -> an error naming the supported values.
"""

from __future__ import annotations

import os

import torch

SUPPORTED = ("cpu", "cuda")


class DeviceError(RuntimeError):
    """The requested device cannot be used here."""


def device_type() -> str:
    """'cpu' or 'cuda' (ROCm builds of torch also call their GPUs 'cuda')."""
    requested = os.environ.get("DS_ACCELERATOR", "").strip().lower()
    if requested and requested not in SUPPORTED:
        raise DeviceError(f"DS_ACCELERATOR={requested!r} is not supported by dchag: use one of {SUPPORTED} "
                          "(or leave it unset to use a GPU when one is present).")
    if requested == "cuda" and not torch.cuda.is_available():
        raise DeviceError("DS_ACCELERATOR=cuda but torch sees no GPU (torch.cuda.is_available() is False): "
                          "install a CUDA/ROCm build of torch, or set DS_ACCELERATOR=cpu to run on the CPU.")
    if requested:
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def runs_on_cpu() -> bool:
    return device_type() == "cpu"


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def run_device() -> torch.device:
    """The device this process computes on: the CPU, or the GPU of its local rank."""
    if runs_on_cpu():
        return torch.device("cpu")
    n = torch.cuda.device_count()
    if local_rank() >= n:
        raise DeviceError(f"LOCAL_RANK={local_rank()} but this node has {n} visible GPU(s): launch at most {n} "
                          "processes per node (--nproc_per_node / --num_gpus) or fix CUDA_VISIBLE_DEVICES.")
    return torch.device("cuda", local_rank())


def comm_backend() -> str:
    """gloo on the CPU; 'nccl' on GPUs (torch's name for NCCL, and for RCCL on ROCm)."""
    return "gloo" if runs_on_cpu() else "nccl"


def to_device(batch: dict, device: torch.device) -> dict:
    """A batch's tensors on ``device`` (no copy on the CPU)."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
