"""Before allocating: the sizes a config claims against the tensors it declares, and against the
memory this machine has. A config that claims hidden size 10^7 is refused in milliseconds
instead of trying to allocate the model it describes.

The shapes a config implies come from building its model on PyTorch's ``meta`` device (shapes
only, nothing allocated); the shapes of a safetensors file come from its header.
"""

from __future__ import annotations

import math
import os

from dchag.checkpointing.errors import CheckpointError


def available_bytes() -> int | None:
    """Memory available to a new allocation on this machine (Linux ``MemAvailable``), or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _gb(n: float) -> str:
    return f"{n / 1e9:,.1f} GB" if n >= 1e8 else f"{n / 2**20:,.1f} MB"


def check_memory(nbytes: int, what: str) -> None:
    """Refuse ``what`` (a phrase: "loading X") when it needs more than the available memory."""
    free = available_bytes()
    if free is not None and nbytes > free:
        raise CheckpointError(f"{what} needs {_gb(nbytes)}, more than the {_gb(free)} of memory available here; nothing "
                              "was allocated.")


def header_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """{name: shape} of a safetensors file, from its header (no tensor is read)."""
    from safetensors import safe_open
    try:
        with safe_open(path, framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own types for a bad header
        raise CheckpointError(f"cannot read the header of {path} ({e}); the file is damaged.") from e


def header_dtypes(path: str) -> dict[str, str]:
    """{name: safetensors dtype ('F32', 'BF16', 'BOOL', ...)} from a safetensors file's header."""
    from safetensors import safe_open
    try:
        with safe_open(path, framework="pt") as f:
            return {k: f.get_slice(k).get_dtype() for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own types for a bad header
        raise CheckpointError(f"cannot read the header of {path} ({e}); the file is damaged.") from e


def nbytes(shapes: dict[str, tuple[int, ...]], itemsize: int = 4) -> int:
    return sum(math.prod(s) for s in shapes.values()) * itemsize


def compare(expected: dict, actual: dict, expected_what: str, actual_what: str) -> None:
    """Refuse when the two {name: shape} tables differ, naming the first difference."""
    missing, extra = sorted(set(expected) - set(actual)), sorted(set(actual) - set(expected))
    if missing or extra:
        raise CheckpointError(f"{expected_what} does not fit {actual_what}: {len(missing)} tensor(s) missing "
                              f"{missing[:3]}, {len(extra)} unexpected {extra[:3]}; nothing was allocated.")
    for name in sorted(expected):
        if tuple(expected[name]) != tuple(actual[name]):
            raise CheckpointError(f"{expected_what} does not fit {actual_what}: {name} would be {list(expected[name])} "
                                  f"but is {list(actual[name])}; nothing was allocated.")


def config_summary(model: dict) -> str:
    keys = ("hidden_size", "num_layers", "num_attention_heads", "ffn_hidden_size", "num_channels", "img_h", "img_w",
            "patch_dim", "groups")
    return ", ".join(f"{k.replace('_', ' ')} {model[k]}" for k in keys if model.get(k) is not None)
