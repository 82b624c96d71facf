"""Small, version-guarded patches to megatron-core (see each module's docstring for the
upstream line it works around):

- ``channel_parallel``: the channel-parallel dimension registered in ``parallel_state``;
- ``cpu``: run megatron-core on a CPU-only torch build (applied only when no GPU is present);
- ``deepspeed_mpu``: the ``mpu`` adapter DeepSpeed needs.

Call ``apply()`` once per process before building models.
"""

from __future__ import annotations

import torch

from megatron_patches.version import require_megatron

_applied = False


def apply() -> None:
    """Register the channel dimension and, without a GPU, the CPU patches (idempotent)."""
    global _applied
    if _applied:
        return
    require_megatron()
    from megatron_patches import channel_parallel
    channel_parallel.register()
    if not torch.cuda.is_available():
        from megatron_patches.cpu import apply_cpu_patches
        apply_cpu_patches()
    _applied = True


def initialize_model_parallel_with_channels(tensor_model_parallel_size: int = 1,
                                            channel_parallel_size: int = 1, **kwargs) -> None:
    apply()
    from megatron_patches.channel_parallel import initialize_model_parallel_with_channels as init
    init(tensor_model_parallel_size, channel_parallel_size, **kwargs)
