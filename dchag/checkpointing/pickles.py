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


def load(path: str, map_location="cpu", mmap: bool = False):
    """``torch.load`` of a checkpoint file, restricted to :func:`allowed_globals`. Raises
    :class:`UnsafeCheckpointError` naming the file and the refused type."""
    with torch.serialization.safe_globals(allowed_globals()):
        try:
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as e:
            raise UnsafeCheckpointError(f"refused to load {path}: {_refused_type(e)}, which a checkpoint of "
                                        f"pretrain_dchag.py never holds, so nothing of it was run. {TRUST_NOTE}") from e


def _refused_type(e: Exception) -> str:
    text = str(e)
    m = re.search(r"(?:Unsupported global: GLOBAL|Trying to call reduce for|Unsupported class) ([\w.]+)", text)
    if m:
        return f"it asks for {m.group(1)}"
    m = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\n|$)", text, re.S)
    return f"its pickle is not plain data ({(m.group(1).strip() if m else type(e).__name__)[:200]})"


def vet(folder: str) -> None:
    """Load every ``.pt`` file under ``folder`` the restricted way (tensors memory-mapped, not
    read) before DeepSpeed loads them with ``weights_only=False``; raises on the first refused one."""
    for path in sorted(glob.glob(os.path.join(folder, "**", "*.pt"), recursive=True)):
        load(path, mmap=True)
