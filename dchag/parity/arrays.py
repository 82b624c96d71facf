"""A study's pictures (nested dicts and lists of numbers, strings and numpy arrays) stored without
pickle: ``pictures.npz``, the arrays as plain ``.npy`` members and the nesting as JSON (the member
``__tree__``, its UTF-8 bytes). Read back with ``np.load(allow_pickle=False)``: a planted object
array is refused, nothing in the file can run.

Study folders written before this format hold ``pictures.pt`` (a torch pickle): it is read with
``torch.load(weights_only=True)`` allowing numpy's plain arrays only, so a planted payload is
refused naming what it asked for (``posix.system``).
"""

from __future__ import annotations

import json
import os

import numpy as np

from dchag.parallel.partition import LayoutError

FILE = "pictures.npz"
LEGACY = "pictures.pt"
_TREE = "__tree__"


def _encode(value, arrays: dict):
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise TypeError(f"picture keys must be strings, got {sorted(map(repr, value))[:3]}")
        return {k: _encode(v, arrays) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(v, arrays) for v in value]
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf":
            raise TypeError(f"picture arrays must be numeric, got dtype {value.dtype}")
        key = f"a{len(arrays)}"
        arrays[key] = value
        return {"__array__": key}
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store a {type(value).__name__} in {FILE}")


def _decode(value, arrays):
    if isinstance(value, dict):
        if set(value) == {"__array__"}:
            return arrays[value["__array__"]]
        return {k: _decode(v, arrays) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v, arrays) for v in value]
    return value


def save(path: str, tree: dict) -> str:
    arrays: dict = {}
    doc = json.dumps(_encode(tree, arrays))
    with open(path, "wb") as f:
        np.savez(f, **{_TREE: np.frombuffer(doc.encode(), np.uint8)}, **arrays)
    return path


def load(path: str) -> dict:
    """A ``pictures.npz`` written by :func:`save`; :class:`LayoutError` naming the file when it is
    not one (an object array, which would need pickle, included)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        tree = json.loads(arrays.pop(_TREE).tobytes().decode())
        return _decode(tree, arrays)
    except (OSError, ValueError, KeyError, UnicodeDecodeError) as e:  # ValueError: an object array, bad zip
        raise LayoutError(f"--merge: {path} is not a pictures file of tools/parity.py ({e}); nothing of it was "
                          "run. Remove it to merge without its pictures, or rerun that study.") from e


def _legacy_allowed() -> list:
    """numpy's plain arrays: what pictures.pt held (numeric and boolean arrays, nothing else)."""
    core = getattr(np, "_core", None) or np.core
    kinds = [np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64, np.float16,
             np.float32, np.float64]
    return [core.multiarray._reconstruct, np.ndarray, np.dtype] + [type(np.dtype(k)) for k in kinds]


def load_legacy(path: str) -> dict:
    from dchag.checkpointing import pickles
    try:
        return pickles.load(path, allowed=_legacy_allowed(), holder="a study's pictures",
                            note="Remove it to merge without its pictures, or rerun that study (it now writes "
                                 f"{FILE}, which needs no pickle).")
    except pickles.UnsafeCheckpointError as e:
        raise LayoutError(f"--merge: {e}") from e


def load_from(directory: str) -> dict:
    """The pictures of a study folder: ``pictures.npz``, else an older ``pictures.pt``, else none."""
    if os.path.isfile(os.path.join(directory, FILE)):
        return load(os.path.join(directory, FILE))
    if os.path.isfile(os.path.join(directory, LEGACY)):
        return load_legacy(os.path.join(directory, LEGACY))
    return {}
