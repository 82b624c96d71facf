"""Training: arguments -> pre-flight -> process groups -> DeepSpeed engine -> loop with logs and checkpoints.

``pretrain``, ``run``, ``release`` and ``shutdown`` are loaded on first use, so importing a light
part of training (``dchag.training.preflight``, ``ds_config``, ``launch``) does not import torch,
DeepSpeed or megatron-core.
"""

_EXPORTS = {"pretrain": "dchag.training.entry", "run": "dchag.training.loop", "release": "dchag.training.loop",
            "shutdown": "dchag.training.loop"}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dchag.training' has no attribute {name!r}")
