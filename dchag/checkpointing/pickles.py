"""DeepSpeed checkpoints are pickles: load them with the few types they need, and nothing else.

A ``.pt`` file is a zip of tensors plus a pickle, and a pickle can name any callable to run when
it is loaded (``torch.load(weights_only=False)`` runs it). The checksum manifest does not help
against a deliberate change: whoever can change a file can rewrite the manifest beside it. So
every load dchag makes itself uses ``torch.load(weights_only=True)`` with an explicit allowlist:
the numpy RNG state, and the three DeepSpeed types its ZeRO optimizer states hold. A file that
needs anything else is refused, naming the file and the type, before anything in it runs.

Where DeepSpeed itself calls ``torch.load(weights_only=False)`` and dchag cannot pass an option
(``zero_to_fp32``, the universal-checkpoint loader, ``ds_to_universal``), :func:`vet` first loads
every ``.pt`` file of the folder the restricted way: a pickle that the restricted loader accepts
calls only allowed types when DeepSpeed loads it again, so nothing else can run.
"""

from __future__ import annotations

import glob
import os
import pickle
import pickletools
import re

import torch

from dchag.checkpointing.errors import CheckpointError

TRUST_NOTE = ("A DeepSpeed checkpoint is a pickle, which can run code when it is loaded: load checkpoints only from "
              "a source you trust, and share a model as the consolidated export (safetensors + JSON: "
              "tools/convert_checkpoint.py --format consolidated).")


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file asks for a type outside the allowlist (it could run code when loaded)."""


def allowed_globals() -> list:
    """What pretrain_dchag.py's checkpoints hold besides tensors and plain containers: numpy arrays
    (numpy's RNG state, in every rank's RNG states) and DeepSpeed's ZeRO/bf16 optimizer metadata."""
    import numpy as np
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    core = getattr(np, "_core", None) or np.core  # numpy 2: numpy._core; numpy 1: numpy.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32)), LossScaler, ZeroStageEnum,
            fragment_address]


def load(path: str, map_location="cpu", mmap: bool = False, allowed: list | None = None,
         holder: str = "a checkpoint of pretrain_dchag.py", note: str = TRUST_NOTE):
    """``torch.load`` of a checkpoint file, restricted to :func:`allowed_globals` (or ``allowed``).
    Raises :class:`UnsafeCheckpointError` naming the file and the refused global (``posix.system``),
    which ``holder`` never holds."""
    allowed = allowed_globals() if allowed is None else allowed
    with torch.serialization.safe_globals(allowed):
        try:
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as e:
            raise UnsafeCheckpointError(f"refused to load {path}: {_refused_type(e, path, allowed)}, which {holder} "
                                        f"never holds, so nothing of it was run. {note}") from e


def _name(g) -> str:
    return f"{getattr(g, '__module__', '')}.{getattr(g, '__qualname__', getattr(g, '__name__', ''))}"


def _refused_type(e: Exception, path: str, allowed: list) -> str:
    """What the pickle asked for: the globals it names outside the allowlist, read without running
    anything (torch's scan of a zip checkpoint, else the pickle's opcodes), else torch's words."""
    ok = {_name(g) for g in allowed} | {"collections.OrderedDict", "torch._utils._rebuild_tensor_v2",
                                        "torch._utils._rebuild_parameter", "torch.FloatStorage"}
    named = [g for g in pickle_globals(path) if g not in ok]
    if named:
        return f"it asks for {', '.join(named[:5])}"
    text = str(e)
    m = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL|Trying to call reduce for|Unsupported class) "
                  r"([\w.]+)", text)
    if m:
        return f"it asks for {m.group(1)}"
    m = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\n|$)", text, re.S)
    return f"its pickle is not plain data ({(m.group(1).strip() if m else type(e).__name__)[:200]})"


def pickle_globals(path: str) -> list[str]:
    """Every ``module.name`` a pickle file asks to import (``posix.system``), in order, found by
    reading its opcodes: nothing is imported or run. A torch zip checkpoint is read by torch's own
    scan (which leaves out what torch loads by default); any other file as a stream of pickles."""
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # not a torch zip: the legacy format or a bare pickle
        pass
    try:
        with open(path, "rb") as f:
            data = f.read(64 << 20)
    except OSError:
        return []
    import io
    stream, found = io.BytesIO(data), []
    while stream.tell() < len(data):  # the legacy torch format is several pickles in a row
        start = stream.tell()
        try:
            found += _globals_of_one(stream)
        except Exception:  # not a pickle (any more): tensor bytes follow
            break
        if stream.tell() == start:
            break
    return list(dict.fromkeys(found))


def _globals_of_one(stream) -> list[str]:
    found, memo, strings = [], {}, []  # strings: the string values pushed, for STACK_GLOBAL
    for op, arg, _ in pickletools.genops(stream):
        name = op.name
        if name in ("GLOBAL", "INST"):
            found.append(arg.replace(" ", "."))
        elif name in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING",
                      "STRING"):
            strings.append(arg)
        elif name == "MEMOIZE" and strings:
            memo[len(memo)] = strings[-1]
        elif name in ("BINPUT", "LONG_BINPUT", "PUT") and strings:
            memo[int(arg)] = strings[-1]
        elif name in ("BINGET", "LONG_BINGET", "GET") and int(arg) in memo:
            strings.append(memo[int(arg)])
        elif name == "STACK_GLOBAL" and len(strings) >= 2:
            found.append(f"{strings[-2]}.{strings[-1]}")
        if name == "STOP":
            break
    return found


def vet(folder: str) -> None:
    """Load every ``.pt`` file under ``folder`` the restricted way (tensors memory-mapped, not
    read) before DeepSpeed loads them with ``weights_only=False``; raises on the first refused one."""
    for path in sorted(glob.glob(os.path.join(folder, "**", "*.pt"), recursive=True)):
        load(path, mmap=True)
