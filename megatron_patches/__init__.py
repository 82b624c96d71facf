"""Small, version-guarded patches to megatron-core (see each module's docstring for the
upstream line it works around):

- ``channel_parallel``: the channel-parallel dimension registered in ``parallel_state``;
- ``cpu``: run megatron-core on the CPU (applied when the run's device is the CPU, as
  ``dchag.device`` decides: ``DS_ACCELERATOR=cpu``, or no GPU present);
- ``torch_norm``: sequence parallel with torch norms (applied on every device: any host without
  apex builds torch norms);
- ``deepspeed_mpu``: the ``mpu`` adapter DeepSpeed needs;
- ``jit``: megatron-core imported without its ``torch.compile`` fuser on the CPU (start-up time).

Call ``apply()`` once per process before building models.
"""

from __future__ import annotations

from megatron_patches.jit import import_megatron
from megatron_patches.version import require_megatron

_applied = False


def apply() -> None:
    """Register the channel dimension, the torch-norm sequence-parallel patch and, when the run
    is on the CPU, the CPU patches (idempotent)."""
    global _applied
    if _applied:
        return
    import_megatron()
    require_megatron()
    from dchag.device import runs_on_cpu
    from megatron_patches import channel_parallel
    from megatron_patches.torch_norm import patch_torch_norm_sequence_parallel
    channel_parallel.register()
    patch_torch_norm_sequence_parallel()
    if runs_on_cpu():
        from megatron_patches.cpu import apply_cpu_patches
        apply_cpu_patches()
    _applied = True


def initialize_model_parallel_with_channels(tensor_model_parallel_size: int = 1,
                                            channel_parallel_size: int = 1, **kwargs) -> None:
    apply()
    from megatron_patches.channel_parallel import initialize_model_parallel_with_channels as init
    init(tensor_model_parallel_size, channel_parallel_size, **kwargs)
