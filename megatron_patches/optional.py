"""megatron-core's notes about absent optional libraries, said once.

Without NVIDIA Apex and Transformer Engine (never on the CPU; optional on a GPU cluster), megatron-core
warns at import and again while building a model that it falls back to its own implementations:
about 18 ``UserWarning`` s per rank per run (fused Adam/SGD -> torch's optimizers; the fused
multi-tensor kernels -> its local ones; FusedLayerNorm -> torch's norms), plus one deprecation note
its own default configuration triggers (``cuda_graph_scope="full"``; dchag passes the replacement,
dchag/model/backbone.py) and, on the CPU, its advice to set ``CUDA_DEVICE_MAX_CONNECTIONS`` (a GPU
setting: on a GPU it stays). :func:`quiet` filters exactly those messages; :func:`startup_line`
says in one line which libraries are absent and what stands in for them (rank 0 prints it at
start-up).
"""

from __future__ import annotations

import importlib.util
import warnings

# The messages megatron-core 0.16 warns with when Apex / Transformer Engine are absent.
MESSAGES = (r".*Transformer Engine and Apex are not installed.*", r".*Apex is not installed.*",
            r".*Transformer Engine is not installed.*", r".*full scope is deprecated.*cuda_graph_scope.*")
LIBRARIES = {"apex": "Apex", "transformer_engine": "Transformer Engine"}
FALLBACKS = ("torch's LayerNorm, torch's AdamW (DeepSpeed steps it) and megatron-core's local multi-tensor "
             "kernels; --transformer-impl local")


CPU_ONLY = (r".*CUDA_DEVICE_MAX_CONNECTIONS.*",)


def quiet(cpu: bool = False) -> None:
    """Filter megatron-core's absent-library notes in this process (idempotent); ``cpu``: also its GPU
    advice (megatron_patches.cpu passes it when the run is on the CPU)."""
    for message in MESSAGES + (CPU_ONLY if cpu else ()):
        warnings.filterwarnings("ignore", message=message, category=UserWarning)


def absent() -> list[str]:
    """The optional libraries megatron-core looks for that this environment does not have."""
    return [name for module, name in LIBRARIES.items() if importlib.util.find_spec(module) is None]


def startup_line() -> str | None:
    missing = absent()
    if not missing:
        return None
    return f"> optional libraries absent: {', '.join(missing)}; in their place: {FALLBACKS}"
