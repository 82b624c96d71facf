"""Before training: which checkpoint ``--load`` means, whether it fits the command line, and
whether ``--save`` is safe to write to."""

from __future__ import annotations

import glob
import json
import os
import zipfile

import torch

from dchag.arguments import MODEL_ARGS
from dchag.checkpointing.errors import CheckpointError
from dchag.checkpointing.recovery import set_aside_damaged
from dchag.checkpointing.tags import read_latest, saved_iterations, tag_for

# Arguments that shape the optimizer's parameter groups: its saved state loads only under the same
# values (DeepSpeed's own error for a changed grouping names parameter alignment, not the flag).
OPTIMIZER_ARGS = ("dchag_partial_lr_mult", "new_params_lr_mult", "freeze_encoder")
LAYOUT_ARGS = ("tensor_model_parallel_size", "channel_parallel_size")
# Recorded, not compared: the channels' identity (from the data; dchag/transfer matches by it) and provenance.
IDENTITY_ARGS = ("channel_names", "wavelengths", "pretrained_checkpoint")


def model_args(args) -> dict:
    """What a checkpoint records of its run (dchag_args.json): the model/layout arguments, the
    optimizer-grouping ones and the channel identity."""
    return {k: getattr(args, k, None) for k in MODEL_ARGS + OPTIMIZER_ARGS + IDENTITY_ARGS}


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def load_tag(args, universal: bool = False) -> str | None:
    """The tag ``--load`` refers to, or None for a fresh start. ``--load DIR`` equal to ``--save``
    with no checkpoint in it yet is a fresh start (Megatron's auto-resume idiom); any other
    ``--load`` without a checkpoint is an error. ``universal``: DIR holds ds_to_universal output
    (its pointer file is ``latest_universal``)."""
    if not args.load:
        return None
    same_as_save = args.save and os.path.realpath(args.load) == os.path.realpath(args.save)
    if args.ckpt_step is not None:
        tag = tag_for(args.ckpt_step)
        if not os.path.isdir(os.path.join(args.load, tag)):
            have = ", ".join(tag_for(i) for i in saved_iterations(args.load)) or "none"
            raise CheckpointError(f"--load {args.load} --ckpt-step {args.ckpt_step}: there is no {tag} there "
                                  f"(checkpoints: {have}).")
        return tag
    tag = read_latest(args.load) or (read_latest(args.load, "latest_universal") if universal else None)
    if tag is None:
        if same_as_save and not saved_iterations(args.load):
            return None
        raise CheckpointError(f"--load {args.load}: no 'latest' file there, so no complete checkpoint was saved in "
                              "that folder; check the path (or pass --ckpt-step N to pick one).")
    if not os.path.isdir(os.path.join(args.load, tag)):
        raise CheckpointError(f"--load {args.load}: 'latest' names {tag!r}, which is not a folder there; the "
                              "checkpoint is damaged or was moved (pass --ckpt-step N to pick another).")
    return tag


def saved_args(folder: str) -> dict:
    """The model/layout arguments a checkpoint was saved with: ``dchag_args.json``, or (for
    ds_to_universal output, which does not copy it) the client state of the model-states file."""
    path = os.path.join(folder, "dchag_args.json")
    try:
        if os.path.exists(path):
            with open(path) as f:
                return json.load(f)
        files = sorted(glob.glob(os.path.join(folder, "mp_rank_*_model_states.pt")))
        if files:
            state = torch.load(files[0], map_location="cpu", weights_only=False, mmap=True)
            if isinstance(state, dict) and isinstance(state.get("args"), dict):
                return state["args"]
    except (OSError, ValueError, RuntimeError, json.JSONDecodeError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"cannot load {folder}: its arguments are unreadable ({e}).") from e
    raise CheckpointError(f"cannot load {folder}: it has no dchag_args.json (nor arguments in a model-states file), "
                          "so it is incomplete or not a checkpoint of pretrain_dchag.py.")


def check_compatible(args, universal: bool = False) -> str | None:
    """The tag to load (None: fresh start); refuses (on every rank, before anything is built
    or written) when the checkpoint's model/layout arguments differ from the command line.
    A universal checkpoint (ds_to_universal output, loaded with ``checkpoint.load_universal``)
    may change the layout (--tensor-model-parallel-size, --channel-parallel-size)."""
    tag = load_tag(args, universal)
    if tag is None:
        return None
    saved = saved_args(os.path.join(args.load, tag))
    keys = [k for k in MODEL_ARGS if not (universal and k in LAYOUT_ARGS)]
    diffs = [k for k in keys if k in saved and saved[k] != getattr(args, k)]
    if diffs:
        k = diffs[0]
        others = "".join(f", {_flag(o)} ({saved[o]} vs {getattr(args, o)})" for o in diffs[1:])
        hint = ("convert it with ds_to_universal and load that with \"checkpoint\": {\"load_universal\": true} "
                "to change the layout" if k in LAYOUT_ARGS else "a model argument cannot change on resume")
        raise CheckpointError(
            f"cannot load {args.load}/{tag}: it was saved with {_flag(k)} {saved[k]} but the command line gives "
            f"{_flag(k)} {getattr(args, k)}{' (also ' + others[2:] + ')' if others else ''}. Use the checkpoint's "
            f"value ({hint}).")
    if universal or not getattr(args, "no_load_optim", False):  # a fresh optimizer takes any grouping
        for k in OPTIMIZER_ARGS:
            if k in saved and saved[k] != getattr(args, k):
                raise CheckpointError(
                    f"cannot load {args.load}/{tag}: it was saved with {_flag(k)} {saved[k]} but the command line "
                    f"gives {_flag(k)} {getattr(args, k)}, and its optimizer state is grouped by that value. Resume "
                    f"with the checkpoint's value, or add --no-load-optim to load its weights with a fresh optimizer "
                    f"under the new one.")
    return tag


def check_save_dir(args, start_iteration: int) -> None:
    """Refuse to start when --save already holds complete checkpoints beyond the starting
    iteration: this run would overwrite them (or move ``latest`` back). An incomplete one (a
    save interrupted by a crash; ``latest`` never named it) is rewritten."""
    if not args.save:
        return
    later = [i for i in saved_iterations(args.save, complete=True) if i > start_iteration]
    later = set_aside_damaged(args, later)  # with --ckpt-step: damaged ones do not count (moved aside)
    if later:
        raise CheckpointError(
            f"--save {args.save} already holds {tag_for(later[-1])}"
            f"{f' (and {len(later) - 1} more)' if len(later) > 1 else ''} beyond this run's starting iteration "
            f"{start_iteration}; saving there would overwrite it. Resume from it (--load {args.save}), or choose "
            "another --save folder (or remove the old checkpoints yourself).")
