"""Import megatron-core without its JIT fuser when the run is on the CPU.

megatron-core decorates about 30 functions with ``megatron.core.jit.jit_fuser`` while its modules
are imported; on torch >= 2.2 that is ``torch.compile``, and the decorator imports torch._dynamo and
torch._inductor: half of megatron-core's import time (``python -X importtime -c "import megatron.core"``:
about 3-5 of 6-10 s on the shared 2-core machine, docs/BENCHMARKS.md section 7). The decorated
functions are the bias-activation and bias-dropout fusions and some MoE, gated-attention and L2-norm
helpers. A CPU run turns every fusion off (``megatron_patches.cpu.cpu_transformer_config_overrides``)
and uses none of the others, so on the CPU megatron-core is imported with ``torch.compile``
standing in as the identity decorator, then upstream's own ``disable_jit_fuser()`` makes
``jit_fuser`` its ``noop_decorator`` for modules imported later. A run on a GPU imports stock
megatron-core. Call :func:`import_megatron` before anything imports megatron-core (the training
run, the serial runtime of ``dchag.load_pretrained`` and the scale simulation do); once
megatron-core is imported it changes nothing.
"""

from __future__ import annotations

import sys


def _identity_compile(model=None, **kwargs):
    """``torch.compile``'s two call forms, compiling nothing: ``compile(fn)`` and ``compile(**kw)(fn)``."""
    return model if model is not None else (lambda fn: fn)


def import_megatron() -> None:
    from megatron_patches.optional import quiet
    quiet()  # megatron-core's notes about absent Apex / Transformer Engine: one start-up line instead
    if "megatron.core" in sys.modules:
        return
    from dchag.device import runs_on_cpu
    if not runs_on_cpu():
        import megatron.core  # noqa: F401 - stock megatron-core, fusers compiled
        return
    import torch
    compile_fn = torch.compile
    torch.compile = _identity_compile
    try:
        import megatron.core  # noqa: F401
    finally:
        torch.compile = compile_fn
    from megatron.core import jit
    jit.disable_jit_fuser()
