"""Before training: which checkpoint ``--load`` means, whether it fits the command line, and
whether ``--save`` is safe to write to."""

from __future__ import annotations

import glob
import json
import os
import zipfile

from dchag.arguments import MODEL_ARGS
from dchag.checkpointing.errors import CheckpointError
from dchag.checkpointing import fingerprint, manifest
from dchag.checkpointing.manifest import MANIFEST
from dchag.checkpointing.ranks import say
from dchag.checkpointing.recovery import hint, move_aside, set_aside_damaged
from dchag.checkpointing.tags import (check_own, interrupted_iterations, is_complete, is_universal_folder,
                                      iteration_of, resume_point, saved_iterations, tag_for)

# Arguments that shape the optimizer's parameter groups: its saved state loads only under the same
# values (DeepSpeed's own error for a changed grouping names parameter alignment, not the flag).
OPTIMIZER_ARGS = ("dchag_partial_lr_mult", "new_params_lr_mult", "freeze_encoder", "dchag_coefficient_lr_scale")
LAYOUT_ARGS = ("tensor_model_parallel_size", "channel_parallel_size")
# Recorded, not compared: the channels' identity (from the data; dchag/transfer matches by it; a blend: the
# union's channels and each source's ids in it) and provenance.
IDENTITY_ARGS = ("channel_names", "wavelengths", "pretrained_checkpoint", "sources", "source_names")
# A blend's sources (--data-path W1 P1 W2 P2 ...: name, path, weight, union ids, sample counts): recorded; on
# resume their names, channels and weights must stay (the data order and the model's sources follow them).
BLEND_ARGS = ("data_sources",)


def model_args(args) -> dict:
    """What a checkpoint records of its run (dchag_args.json): the model/layout arguments, the
    optimizer-grouping ones and the channel identity."""
    return {k: getattr(args, k, None) for k in MODEL_ARGS + OPTIMIZER_ARGS + IDENTITY_ARGS + BLEND_ARGS}


def _blend_key(sources) -> list | None:
    """What of a blend must not change on resume: per source its name, union ids and weight."""
    if not sources:
        return None
    return [(s["name"], [int(u) for u in s["channels"]], round(float(s["weight"]), 9)) for s in sources]


def _describe_blend(sources) -> str:
    if not sources:
        return "one source"
    return "--data-path " + " ".join(f"{float(s['weight']):.4g} {s['name']}" for s in sources)


def _flag(key: str) -> str:
    if key == "num_outputs":  # no flag of its own: --num-classes, or the target maps of --target-path
        return "output maps (--num-classes, or the maps of --target-path)"
    return "--" + key.replace("_", "-")


def load_tag(args, universal: bool = False) -> str | None:
    """The tag ``--load`` refers to, or None for a fresh start.

    Contract: a pure file-system check. It needs no process group (call it before
    torch.distributed starts, on every rank: every rank gets the same answer) and writes nothing (the
    first rank prints a note when it resumes from another checkpoint than ``latest`` names).

    - ``--ckpt-step N``: ``iter_N``, which must be complete (it has its manifest; or it is
      ds_to_universal output);
    - otherwise the newest complete checkpoint: the one ``latest`` names, or a newer complete one
      (a save that crashed after its manifest, before ``latest``). ``latest`` naming an
      interrupted save is passed over in the same way;
    - ``--load DIR`` equal to ``--save`` with no complete checkpoint yet (or not created yet) is a
      fresh start (Megatron's auto-resume idiom); any other ``--load`` without one is an error.

    ``universal``: DIR holds ds_to_universal output (its pointer file is ``latest_universal``).
    A damaged ``latest`` (binary, empty, foreign, or a tag leading out of DIR) is refused."""
    if not args.load:
        return None
    load = args.load
    same_as_save = bool(args.save) and os.path.realpath(load) == os.path.realpath(args.save)
    if not os.path.isdir(load):
        if same_as_save and not os.path.exists(load):
            return None
        what = "is not a folder" if os.path.exists(load) else "folder does not exist"
        raise CheckpointError(f"--load {load}: {what}; check the path (to start a new run that saves there and resumes "
                              f"by itself, give the same folder to --save).")
    complete = saved_iterations(load, complete=True)
    have = ", ".join(tag_for(i) for i in complete[-5:]) or "none"
    if args.ckpt_step is not None:
        tag = tag_for(args.ckpt_step)
        folder = os.path.join(load, tag)
        check_own(load, tag)
        if not os.path.isdir(folder):
            raise CheckpointError(f"--load {load} --ckpt-step {args.ckpt_step}: there is no {tag} there "
                                  f"(complete checkpoints: {have}).")
        if not is_complete(folder) and not is_universal_folder(folder):
            raise CheckpointError(f"--load {load} --ckpt-step {args.ckpt_step}: {tag} is an interrupted save (it has no "
                                  f"{MANIFEST}: the save did not finish), so it cannot be loaded (complete checkpoints: "
                                  f"{have}).")
        return tag
    tag, note = resume_point(load, universal)
    if tag is not None:
        if note:
            say(f"{note}: resuming from {tag}")
        return tag
    if same_as_save:
        return None
    interrupted = interrupted_iterations(load)
    raise CheckpointError(f"--load {load}: there is no complete checkpoint there"
                          + (f" ({', '.join(tag_for(i) for i in interrupted)}: interrupted save(s), without "
                             f"{MANIFEST})" if interrupted else "") + "; check the path.")


def saved_args(folder: str, how=None) -> dict:
    """The model/layout arguments a checkpoint was saved with: ``dchag_args.json``, or (for
    ds_to_universal output, which does not copy it) the client state of the model-states file.
    A damaged file is refused by name (``how``: a callable saying how to go on, called only then)."""
    path = os.path.join(folder, "dchag_args.json")
    files = sorted(glob.glob(os.path.join(folder, "mp_rank_*_model_states.pt")))
    source = path if os.path.exists(path) or not files else files[0]
    try:
        if source == path and os.path.exists(path):
            with open(path) as f:
                doc = json.load(f)
            if not isinstance(doc, dict):
                raise ValueError(f"it holds a JSON {type(doc).__name__}, not the arguments")
            return doc
        if files:  # torch, imported only here: the pre-flight reads dchag_args.json without it
            from dchag.checkpointing import pickles
            state = pickles.load(files[0], mmap=True)
            if isinstance(state, dict) and isinstance(state.get("args"), dict):
                return state["args"]
    except CheckpointError:
        raise  # pickles.UnsafeCheckpointError: a refused pickle, named
    except (OSError, ValueError, RuntimeError, zipfile.BadZipFile, EOFError) as e:
        raise CheckpointError(f"cannot load {folder}: {source} is damaged ({e}). {how() if how else ''}".rstrip()) from e
    raise CheckpointError(f"cannot load {folder}: it has no dchag_args.json (nor arguments in a model-states file), "
                          "so it is not a checkpoint of pretrain_dchag.py.")


# The small files the pre-flight reads before the run checks the whole manifest (collectively, under the
# process group): checked against it first, so that an edited one is named as such, not taken at its word.
READ_BEFORE_THE_MANIFEST = ("dchag_args.json", fingerprint.FILE)


def check_small_files(folder: str, how) -> None:
    """Refuse ``folder`` when a file of :data:`READ_BEFORE_THE_MANIFEST` differs from its manifest
    entry (an edited ``dchag_args.json`` that is still valid JSON was reported as a flag conflict,
    whose advice cost another start before the checksum error). ``how()``: how to go on."""
    table = manifest.read_manifest(folder)
    if table is None:
        return
    for name in READ_BEFORE_THE_MANIFEST:
        problems = manifest.check_files(folder, table, [name]) if name in table else []
        if problems:
            why = problems[0][len(name) + 1:]
            raise CheckpointError(f"cannot load {folder}: {os.path.join(folder, name)} is damaged: {why}. {how()}")


def check_compatible(args, universal: bool = False) -> str | None:
    """The tag to load (None: fresh start, see :func:`load_tag`); refuses when the checkpoint's
    model/layout arguments differ from the command line.

    Contract: as :func:`load_tag`, a pure file-system check needing no process group, writing
    nothing; every rank raises the same error, before anything is built or written.
    A universal checkpoint (ds_to_universal output, loaded with ``checkpoint.load_universal``)
    may change the layout (--tensor-model-parallel-size, --channel-parallel-size)."""
    tag = load_tag(args, universal)
    if tag is None:
        return None
    how = lambda: hint(args.load, iteration_of(tag))  # noqa: E731
    check_small_files(os.path.join(args.load, tag), how)
    saved = saved_args(os.path.join(args.load, tag), how)
    keys = [k for k in MODEL_ARGS if not (universal and k in LAYOUT_ARGS)]
    diffs = [k for k in keys if k in saved and saved[k] != getattr(args, k)]
    if diffs:
        k = diffs[0]
        others = "".join(f", {_flag(o)} ({saved[o]} vs {getattr(args, o)})" for o in diffs[1:])
        fix = ("convert it with ds_to_universal and load that with \"checkpoint\": {\"load_universal\": true} "
                "to change the layout" if k in LAYOUT_ARGS else "a model argument cannot change on resume")
        raise CheckpointError(
            f"cannot load {args.load}/{tag}: it was saved with {_flag(k)} {saved[k]} but the command line gives "
            f"{_flag(k)} {getattr(args, k)}{' (also ' + others[2:] + ')' if others else ''}. Use the checkpoint's "
            f"value ({fix}).")
    saved_blend, blend = saved.get("data_sources"), getattr(args, "data_sources", None)
    if _blend_key(saved_blend) != _blend_key(blend):
        raise CheckpointError(
            f"cannot load {args.load}/{tag}: it was trained on {_describe_blend(saved_blend)} but the command line "
            f"gives {_describe_blend(blend)}. A resume continues the same blend (the same sources, in the same order, "
            "with the same weights; their files may move): give the checkpoint's --data-path, or start a new run "
            "from its weights with --finetune --pretrained-checkpoint on one source.")
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
    """Make ``--save`` safe to write to, or refuse.

    Contract: callable before any process group exists, on every rank; every rank reaches the same
    verdict. Its side effects are renames only (nothing is deleted), done by the first rank
    (RANK 0 from the environment when torch.distributed is not initialized), each named in a
    message:

    - interrupted saves (no manifest) beyond ``start_iteration`` are moved aside to
      ``iter_NNNNNNN.interrupted`` (this run would write into them);
    - with ``--ckpt-step``, damaged complete checkpoints beyond it are moved aside to
      ``iter_NNNNNNN.damaged`` (:mod:`recovery`).

    Refuses (:class:`CheckpointError`) when intact complete checkpoints lie beyond the start: this
    run would overwrite them (or move ``latest`` back). Call it after taking the folder's lock
    (:func:`dchag.checkpointing.lock.acquire_for_run`): a folder another job is still writing has
    no manifest yet either, and must not be moved aside."""
    if not args.save:
        return
    for it in interrupted_iterations(args.save):
        if it > start_iteration:
            move_aside(os.path.join(args.save, tag_for(it)), "interrupted",
                       f"an interrupted save: it has no {MANIFEST}, so the save did not finish")
    later = [i for i in saved_iterations(args.save, complete=True) if i > start_iteration]
    later = set_aside_damaged(args, later)  # with --ckpt-step: damaged ones do not count (moved aside)
    if later:
        raise _overwrite_refusal(args.save, later, start_iteration)


def check_save_dir_unchanged(args, start_iteration: int) -> None:
    """What :func:`check_save_dir` refuses, found without changing anything (the pre-flight, before
    the lock is taken): intact complete checkpoints beyond ``start_iteration``. With ``--ckpt-step``
    the damaged ones among them do not count; that verdict reads every file, so it is left to
    :func:`check_save_dir` under the lock."""
    if not args.save or args.ckpt_step is not None:
        return
    later = [i for i in saved_iterations(args.save, complete=True) if i > start_iteration]
    if later:
        raise _overwrite_refusal(args.save, later, start_iteration)


def _overwrite_refusal(save: str, later: list[int], start_iteration: int) -> CheckpointError:
    return CheckpointError(
        f"--save {save} already holds {tag_for(later[-1])}"
        f"{f' (and {len(later) - 1} more)' if len(later) > 1 else ''} beyond this run's starting iteration "
        f"{start_iteration}; saving there would overwrite it. Resume from the newest (--load {save} without "
        "--ckpt-step), or choose another --save folder (or remove the old checkpoints yourself).")
