"""Read a DeepSpeed checkpoint of pretrain_dchag.py (any T, P, DP, ZeRO 0-3, fp32/bf16) into
full, layout-free tensors.

Per model-parallel rank, DeepSpeed's own ``zero_to_fp32`` rebuilds the fp32 master weights from
the ZeRO shards (it handles one model-parallel rank at a time, so it is pointed at a folder of
links to that rank's files); without ZeRO the weights are the model-states file's ``module``.
The tensor- and channel-parallel shards of each parameter are then merged with the affine
maps every checkpoint carries in ``universal_checkpoint_info`` (DeepSpeed's ParamAffineMap),
replicas checked equal.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import io
import os
import re
import tempfile

import torch

from dchag.checkpointing import manifest, pickles
from dchag.checkpointing.errors import CheckpointError
from dchag.checkpointing.tags import TAG_RE, check_own, folder_hint, is_complete, is_universal_folder, resume_point

_MP_RE = re.compile(r"mp_rank_(\d+)_model_states\.pt$")


def resolve_folder(path: str) -> str:
    """``RUN`` (its newest complete checkpoint, as a resume would pick) or ``RUN/iter_NNNNNNN`` ->
    the checkpoint folder. An interrupted save (no manifest) is refused."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path} is not a folder: give a run folder (with a 'latest' file) or one of its "
                              "iter_NNNNNNN folders.")
    if glob.glob(os.path.join(path, "*model_states.pt")):
        parent, name = os.path.split(os.path.normpath(os.path.abspath(path)))
        if TAG_RE.match(name):  # RUN/iter_N named directly: it must be RUN's own
            check_own(parent, name)
        if not is_complete(path) and not is_universal_folder(path):
            raise CheckpointError(f"{path} is an interrupted save (it has no {manifest.MANIFEST}: the save did not "
                                  "finish); convert a complete checkpoint of that run.")
        return path
    tag, note = resume_point(path, pick=folder_hint)  # the converter and a fine-tune take no --ckpt-step
    if tag is None:
        tags = sorted(n for n in os.listdir(path) if TAG_RE.match(n))
        raise CheckpointError(f"{path} holds no model-states files and no complete checkpoint"
                              + (f"; its folders ({', '.join(tags[-3:])}) are interrupted saves" if tags
                                 else "; it is not a checkpoint of pretrain_dchag.py") + ".")
    if note:
        print(f"{note}: converting {tag}", flush=True)
    return os.path.join(path, tag)


def check_integrity(folder: str, require: bool = False) -> bool:
    """Raise naming the damaged file; False when the folder has no manifest (and not required)."""
    has = manifest.read_manifest(folder) is not None
    manifest.raise_problems(folder, manifest.verify(folder, require=require),
                            "Restore the file from a copy, or convert an earlier checkpoint.")
    return has


def _model_state_files(folder: str) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for path in sorted(glob.glob(os.path.join(folder, "*model_states.pt"))):
        m = _MP_RE.search(os.path.basename(path))
        if m:
            out.setdefault(int(m.group(1)), []).append(path)
    if not out:
        raise CheckpointError(f"{folder} has no DeepSpeed model-states files.")
    return out


def _load(path: str) -> dict:
    try:
        return pickles.load(path)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same message
        raise CheckpointError(f"cannot read {path} ({type(e).__name__}: {e}); the file is damaged.") from e


def _module_weights(folder: str, mp: int) -> dict[str, torch.Tensor]:
    """The weights the model-states file's ``module`` holds in full (ZeRO 3's are empty placeholders)."""
    files = _model_state_files(folder)[mp]
    first = [f for f in files if os.path.basename(f).startswith("mp_rank")] or files
    return {k: v.float() for k, v in _load(first[0])["module"].items() if torch.is_tensor(v) and v.numel()}


def _fp32_weights_of_rank(folder: str, mp: int) -> dict[str, torch.Tensor]:
    """One model-parallel rank's weights (its shards), fp32 master copies where ZeRO has them.

    ZeRO's optimizer shards hold only what the optimizer holds: frozen parameters (--freeze-encoder,
    LoRA's base weights) are in ZeRO 2/3's ``frozen_param_fragments`` (zero_to_fp32 merges those) and
    in the model-states file's ``module`` (ZeRO 0-2), where the rest is taken from."""
    optim = sorted(glob.glob(os.path.join(folder, f"*mp_rank_{mp:02d}_optim_states.pt")))
    if not optim:  # ZeRO 0: the module's own weights (bf16 runs: the bf16 copies)
        return _module_weights(folder, mp)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    for path in optim + _model_state_files(folder)[mp]:  # zero_to_fp32 loads with weights_only=False
        pickles.load(path, mmap=True)
    with tempfile.TemporaryDirectory(prefix="dchag_mp_rank_") as tmp:
        os.makedirs(os.path.join(tmp, "t"))
        for path in optim + _model_state_files(folder)[mp]:
            os.symlink(os.path.abspath(path), os.path.join(tmp, "t", os.path.basename(path)))
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # progress
            weights = get_fp32_state_dict_from_zero_checkpoint(tmp, tag="t")
    for name, value in _module_weights(folder, mp).items():  # frozen: never in the optimizer (bf16: exact)
        weights.setdefault(name, value)
    return weights


def client_state(folder: str) -> dict:
    """The client state (arguments, iteration, LR schedule, affine maps) of model-parallel rank 0."""
    return _load(_model_state_files(folder)[0][0])


def run_args(folder: str, state: dict | None = None) -> argparse.Namespace:
    """Every scalar argument of the run that saved ``folder`` (model, layout, schedule, data);
    ``state``: its :func:`client_state`, when already read."""
    state = client_state(folder) if state is None else state
    args = dict(state.get("all_args") or {})
    args.update(state.get("args") or {})
    return argparse.Namespace(**args)


def param_name(pattern: str) -> str:
    """The parameter name of an affine-map key ("^" + re.escape(name) + "$")."""
    return re.sub(r"\\(.)", r"\1", pattern[1:-1])


def read_full_state_dict(folder: str, names: list[str] | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """(full fp32 tensors by parameter name, client state of model-parallel rank 0)."""
    from deepspeed.checkpoint import constants as C
    from deepspeed.checkpoint.affine import ParamAffineMap
    files = _model_state_files(folder)
    state = _load(files[0][0])
    T = int((state.get("args") or {}).get("tensor_model_parallel_size", len(files)))
    if sorted(files) != list(range(T)):
        raise CheckpointError(f"{folder} was saved with --tensor-model-parallel-size {T} but holds model-states files "
                              f"of model-parallel ranks {sorted(files)}; a file is missing.")
    maps = ((state.get("universal_checkpoint_info") or {}).get(C.AFFINE_MAP) or {}).get(C.AFFINE_MAP_PARAMS)
    if not maps:
        raise CheckpointError(f"{folder} carries no universal_checkpoint_info affine maps (saved by an older "
                              "version?); it cannot be merged.")
    shards = {mp: _fp32_weights_of_rank(folder, mp) for mp in range(T)}
    out = {}
    for pattern, entry in maps.items():
        name = param_name(pattern)
        if names is not None and name not in names:
            continue
        missing = [mp for mp in range(T) if name not in shards[mp]]
        if missing:
            raise CheckpointError(f"{folder}: parameter {name} is missing from model-parallel rank {missing[0]}.")
        amap = ParamAffineMap.from_dict(entry)
        try:
            out[name] = amap.rebuild({mp: shards[mp][name].float() for mp in range(T)}).clone()
        except ValueError as e:
            raise CheckpointError(f"{folder}: cannot merge {name}: {e}") from e
    if names is not None and set(names) - set(out):
        lost = sorted(set(names) - set(out))
        raise CheckpointError(f"{folder} lacks {len(lost)} parameter(s) of the model, e.g. {lost[:3]}.")
    return out, state
