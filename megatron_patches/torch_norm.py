"""Sequence parallel with torch norms (``megatron/core/transformer/torch_norm.py``), on any device.

Without apex / transformer-engine (always on CPU; also on any GPU node where apex is not
installed) every LayerNorm/RMSNorm of megatron's local spec is a ``WrappedTorchNorm``, which
upstream refuses under sequence parallel (``assert not config.sequence_parallel, "sequence
parallel not supported by torch LayerNorm"``) because it does not tag its parameters. A norm acts
per token, so it is correct on a sequence shard; :func:`patch_torch_norm_sequence_parallel`
builds it as upstream and tags weight/bias with ``sequence_parallel=<config.sequence_parallel>``
exactly like apex ``FusedLayerNorm`` does, so their grads are summed over the TP group like every
other SP-replicated parameter (``dchag.parallel.grads``).

It changes nothing else (a norm built without sequence parallel is untouched but for the
``sequence_parallel=False`` tag) and is applied by :func:`megatron_patches.apply` on every device.
Version-guarded like the CPU patches (megatron-core 0.16.x).
"""

from __future__ import annotations

import copy
import functools

from megatron_patches.version import require_megatron


# --------------------------------------------------------------------------------------------
# sequence parallel with torch LayerNorm/RMSNorm (megatron/core/transformer/torch_norm.py)
# --------------------------------------------------------------------------------------------


def _wrap_torch_norm_new(original_new):
    @functools.wraps(original_new)
    def __new__(cls, config, hidden_size, *args, **kwargs):
        """Wraps ``WrappedTorchNorm.__new__``.

        Upstream: ``assert not config.sequence_parallel, f"sequence parallel not supported by
        torch LayerNorm"``.  Builds the norm from a shallow config copy with
        ``sequence_parallel=False`` (the only field that assert reads; the norm itself does not
        depend on it), then tags the parameters like apex ``FusedLayerNorm.__init__`` does:
        ``setattr(self.weight, 'sequence_parallel', self.sequence_parallel)``.
        """
        sequence_parallel = bool(getattr(config, "sequence_parallel", False))
        if sequence_parallel:
            config = copy.copy(config)
            config.sequence_parallel = False
        norm = original_new(cls, config, hidden_size, *args, **kwargs)
        for param in norm.parameters(recurse=False):
            setattr(param, "sequence_parallel", sequence_parallel)
        return norm

    __new__.__megatron_cpu_patch__ = True
    return __new__


def patch_torch_norm_sequence_parallel() -> None:
    """Idempotent; see the module docstring."""
    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    require_megatron("megatron_patches/torch_norm.py")

    current = WrappedTorchNorm.__dict__["__new__"]
    current = current.__func__ if isinstance(current, staticmethod) else current
    if not getattr(current, "__megatron_cpu_patch__", False):
        WrappedTorchNorm.__new__ = staticmethod(_wrap_torch_norm_new(current))
