"""Damaged and interrupted checkpoints: find the last intact one, say how to resume from it, and
make that command work. Nothing is ever deleted: a folder in the way is moved aside.

``--load DIR`` whose checkpoint is damaged is refused (``dchag.checkpointing.engine``); the
message names the damaged iteration, the last intact earlier one and the command to resume from
it: the same command with ``--ckpt-step N``. With ``--save DIR`` too, the damaged later
checkpoint would count as a complete checkpoint beyond the starting iteration (which the run
refuses to overwrite); when ``--ckpt-step`` is given and every such later checkpoint is damaged,
the first rank moves them aside to ``iter_NNNNNNN.damaged`` and the run goes on. Interrupted
saves (no manifest) beyond the start are moved aside to ``iter_NNNNNNN.interrupted`` by
``compat.check_save_dir``.

Damage is judged by the files themselves: the manifest present (a checkpoint is complete only
with it), every ``.pt`` a readable zip whose records match their CRC-32 (``zipfile.testzip``;
torch checkpoints are zip files, so a flipped bit in a tensor is seen), and every file matching
the manifest's size and SHA-256.
"""

from __future__ import annotations

import glob
import json
import os
import zipfile

from dchag.checkpointing.manifest import MANIFEST, IntegrityError, verify
from dchag.checkpointing.ranks import is_first_rank
from dchag.checkpointing.tags import saved_iterations, tag_for


def damage(folder: str) -> str | None:
    """What is wrong with the checkpoint ``folder`` (None: intact). Reads every file once."""
    try:
        return _damage(folder)
    except FileNotFoundError as e:  # moved aside meanwhile (by the first rank): not in the way any more
        return f"it went away while being checked ({e.filename})"


def _damage(folder: str) -> str | None:
    if not os.path.exists(os.path.join(folder, MANIFEST)):
        return f"it is an interrupted save (no {MANIFEST}: the save did not finish)"
    files = sorted(glob.glob(os.path.join(folder, "*.pt")))
    if not files:
        return "it holds no .pt files"
    try:
        with open(os.path.join(folder, "dchag_args.json")) as f:
            tp = int(json.load(f).get("tensor_model_parallel_size", 1))
    except (OSError, ValueError, AttributeError) as e:
        return f"dchag_args.json is unreadable ({e})"
    for mp in range(tp):
        if not glob.glob(os.path.join(folder, f"*mp_rank_{mp:02d}*model_states.pt")):
            return f"it has no model-states file for model-parallel rank {mp}"
    for path in files:
        try:
            with zipfile.ZipFile(path) as z:
                bad = z.testzip()
        except (OSError, zipfile.BadZipFile, EOFError, ValueError) as e:
            return f"{os.path.basename(path)} is damaged ({e})"
        if bad is not None:
            return f"{os.path.basename(path)} is damaged (record {bad} fails its CRC check)"
    try:
        problems = verify(folder, require=True)
    except IntegrityError as e:
        return str(e)
    return problems[0] if problems else None


def last_good(directory: str, before: int) -> int | None:
    """The latest intact checkpoint iteration in ``directory`` below ``before``."""
    for it in reversed([i for i in saved_iterations(directory, complete=True) if i < before]):
        if damage(os.path.join(directory, tag_for(it))) is None:
            return it
    return None


def hint(directory: str, iteration: int | None) -> str:
    """How to go on after the checkpoint of ``iteration`` in ``directory`` was found damaged."""
    good = last_good(directory, iteration if iteration is not None else 1 << 62)
    if good is None:
        return (f"There is no intact earlier checkpoint in {directory}: start again with a new --save folder "
                "(the damaged one is left as it is).")
    return (f"The last intact checkpoint is {tag_for(good)}: resume from it by running the same command with "
            f"--ckpt-step {good} added (--load {directory} --ckpt-step {good}; with --save {directory} the damaged "
            f"checkpoints beyond it are moved aside to iter_NNNNNNN.damaged, nothing is deleted).")


def aside_name(folder: str, kind: str) -> str:
    out, k = f"{folder}.{kind}", 1
    while os.path.exists(out):
        out, k = f"{folder}.{kind}.{k}", k + 1
    return out


def move_aside(folder: str, kind: str, why: str) -> None:
    """The first rank renames ``folder`` to ``folder.<kind>`` (a free name), saying why; the
    other ranks leave it (they reach the same verdict from the same files)."""
    if not is_first_rank():
        return
    dst = aside_name(folder, kind)
    os.rename(folder, dst)
    print(f"> moved {folder} aside to {dst}: {why}; nothing was deleted", flush=True)


def set_aside_damaged(args, later: list[int]) -> list[int]:
    """``later``: complete checkpoints in --save beyond the starting iteration. With an explicit
    ``--ckpt-step`` (the recovery command), the damaged ones are moved aside by the first rank;
    returns those still in the way (intact ones: the caller refuses). Every rank returns the same
    (with a process group, the first rank's verdict is broadcast; without, every rank judges the
    same files, and a folder moved aside meanwhile counts as damaged)."""
    if args.ckpt_step is None or not later:
        return later
    import torch.distributed as dist  # here: the pre-flight imports this module without torch
    problems = [None]
    if not dist.is_initialized() or dist.get_rank() == 0:
        problems = [{it: damage(os.path.join(args.save, tag_for(it))) for it in later}]
    if dist.is_initialized():
        dist.broadcast_object_list(problems, src=0)
    problems = problems[0]
    if any(p is None for p in problems.values()):
        return [it for it, p in problems.items() if p is None]
    if dist.is_initialized():
        dist.barrier()  # every rank has finished looking at the folder
    for it, problem in problems.items():
        folder = os.path.join(args.save, tag_for(it))
        if os.path.isdir(folder):
            move_aside(folder, "damaged", problem)
    if dist.is_initialized():
        dist.barrier()
    return []
