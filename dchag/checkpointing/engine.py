"""Save and load a training checkpoint: DeepSpeed's engine state plus what DeepSpeed does not save.

Layout of ``--save DIR``::

    DIR/iter_0000100/mp_rank_00_model_states.pt ...   DeepSpeed (weights, optimizer, ZeRO shards)
    DIR/iter_0000100/dchag_args.json                   model/layout arguments (checked on --load)
    DIR/iter_0000100/normalization.json                per-channel statistics the data was normalized with
    DIR/iter_0000100/data_fingerprint.json             the data it was trained on (:mod:`fingerprint`)
    DIR/iter_0000100/manifest.json                     size + SHA-256 of every file (checked on --load)
    DIR/latest                                         "iter_0000100", replaced atomically

The client state (in DeepSpeed's model-states file) holds the iteration, the consumed samples
(data position), the LR schedule, every data-parallel rank's RNG states (:mod:`rng`), the
arguments, and ``universal_checkpoint_info`` (:mod:`universal`).

``latest`` changes only after every rank has finished writing; resuming never overwrites a
checkpoint that lies beyond the starting point (:mod:`compat`).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import zipfile

import torch
import torch.distributed as dist

from dchag.checkpointing import ds_io, durable, fingerprint, frozen, manifest, normalization as norm, pickles, weights_only
from dchag.checkpointing.compat import model_args
from dchag.checkpointing.errors import CheckpointError
from dchag.checkpointing.recovery import hint
from dchag.checkpointing.rng import gather_over_data_parallel, rng_state, set_rng_state
from dchag.checkpointing.tags import iteration_of, saved_iterations, tag_for
from dchag.checkpointing.universal import universal_checkpoint_info
from dchag.checkpointing.write_errors import cause_of
from dchag.device import run_device


def verify_files(args, tag: str, universal: bool = False) -> None:
    """Cheap integrity check before DeepSpeed reads anything (every rank agrees on the outcome,
    so a damaged file is an error on all ranks, not a hang): this rank's model-states file
    exists (a universal checkpoint: its zero/ folder), and every ``.pt`` file directly in the
    checkpoint folder has an intact zip directory."""
    from megatron.core import parallel_state as ps
    folder = os.path.join(args.load, tag)
    problem = ""
    mp = ps.get_tensor_model_parallel_rank()
    if universal and not os.path.isdir(os.path.join(folder, "zero")):
        problem = "it has no zero/ folder, so it is not ds_to_universal output (or load_universal is set by mistake)"
    elif not universal and not glob.glob(os.path.join(folder, f"*mp_rank_{mp:02d}*model_states.pt")):
        problem = f"it has no model-states file for model-parallel rank {mp} (saved with another layout?)"
    else:
        for path in sorted(glob.glob(os.path.join(folder, "*.pt"))):
            try:
                with zipfile.ZipFile(path) as z:
                    z.namelist()
            except (OSError, zipfile.BadZipFile) as e:
                problem = f"{os.path.basename(path)} is damaged ({e})"
                break
    bad = torch.tensor([1 if problem else 0], device=run_device())
    dist.all_reduce(bad)
    if problem or bad.item():
        what = problem or "another rank found a damaged or missing file (see its message)"
        how = hint(args.load, iteration_of(tag)) if dist.get_rank() == 0 else "See rank 0's message."
        raise CheckpointError(f"cannot load {folder} (iteration {iteration_of(tag)}): {what}. {how}")


def _attempt(write, path: str) -> list[tuple[str, BaseException]]:
    try:
        write()
    except OSError as e:
        return [(getattr(e, "filename", None) or path, e)]
    return []


def _agree(failures: list[tuple[str, BaseException]], args, tag: str) -> None:
    """Collective: every rank learns every rank's failed writes. On any, rank 0 removes the
    partial checkpoint folder (it has no manifest, so it is not complete, but it takes space) and
    every rank raises the same error, naming the cause, the path and the last complete checkpoint."""
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = [(rank, path, cause_of(e, path)) for path, e in failures]
    every = [None] * world
    dist.all_gather_object(every, mine)
    found = [f for part in every for f in part]
    if not found:
        return
    folder = os.path.join(args.save, tag)
    if rank == 0:
        shutil.rmtree(folder, ignore_errors=True)
        durable.fsync_dir(args.save)
    dist.barrier()
    r, path, cause = found[0]
    more = f" (and {len(found) - 1} more failed write(s), e.g. rank {found[1][0]}: {found[1][2]})" if len(found) > 1 \
        else ""
    complete = saved_iterations(args.save, complete=True)
    last = (f"the last complete checkpoint is {os.path.join(args.save, tag_for(complete[-1]))}, and the same command "
            "resumes from it once the cause is fixed" if complete else
            f"no complete checkpoint is in {args.save} yet: the same command starts afresh once the cause is fixed")
    partial = (f"The partial {tag} could not be removed (the next start sets it aside)" if os.path.exists(folder)
               else f"Nothing of {tag} is left")
    raise CheckpointError(f"cannot save checkpoint {folder}: writing {path} failed on rank {r}: {cause}{more}. "
                          f"{partial}; {last}.")


def save(engine, args, iteration: int, consumed_samples: int, scheduler, normalization: dict | None = None,
         data_fingerprint: dict | None = None) -> str:
    """Collective. The order makes every crash point safe: every rank's DeepSpeed files (fsynced),
    then (rank 0) ``dchag_args.json`` and ``normalization.json``, then the manifest (size + SHA-256
    of every file, hashed by all ranks; written last of the folder's files: it makes the
    checkpoint complete), then ``latest``. A crash before the manifest leaves a folder without one
    (an interrupted save, set aside by the next start); a crash after it leaves a complete
    checkpoint the next start resumes from, whatever ``latest`` says. A failed write (any rank)
    raises :class:`CheckpointError` on every rank, naming the cause, after removing the folder."""
    tag = tag_for(iteration)
    folder = os.path.join(args.save, tag)
    files = ds_io.install(engine)
    if files is not None:
        files.failures.clear()
    client_state = {
        "iteration": iteration, "consumed_samples": consumed_samples, "args": model_args(args),
        "all_args": {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))},
        "rng_states": gather_over_data_parallel(rng_state()),
        "lr_scheduler": scheduler.state_dict(),
        "universal_checkpoint_info": universal_checkpoint_info(engine.module),
        # what the optimizer does not hold (--freeze-encoder, LoRA's base): read from the module, not its shards
        "frozen_parameters": [n for n, p in engine.module.named_parameters() if not p.requires_grad],
    }
    engine.save_checkpoint(args.save, tag=tag, client_state=client_state, save_latest=False)
    failures = list(files.failures) if files is not None else []
    if dist.get_rank() == 0 and not failures:
        failures = _attempt(lambda: durable.write_text(os.path.join(folder, "dchag_args.json"),
                                                json.dumps(model_args(args), indent=1)), folder)
        if normalization is not None and not failures:
            failures = _attempt(lambda: norm.write(folder, normalization), folder)
        if data_fingerprint is not None and not failures:
            failures = _attempt(lambda: fingerprint.write(folder, data_fingerprint), folder)
    _agree(failures, args, tag)  # every rank's files are written
    _agree(manifest.write_manifest_distributed(folder), args, tag)
    failures = []
    if dist.get_rank() == 0:
        failures = _attempt(lambda: durable.write_text(os.path.join(args.save, "latest"), tag), args.save)
    _agree(failures, args, tag)
    return tag


def _vet(folder: str) -> None:
    """Collective: every ``.pt`` file of ``folder`` loaded the restricted way (split over the
    ranks) before DeepSpeed loads any; a refused file is an error on every rank."""
    rank, world = dist.get_rank(), dist.get_world_size()
    paths = sorted(glob.glob(os.path.join(folder, "**", "*.pt"), recursive=True))
    problem = None
    for path in paths[rank::world]:
        try:
            pickles.load(path, mmap=True)
        except CheckpointError as e:
            problem = str(e)
            break
        except Exception as e:  # noqa: BLE001 - a raise on one rank alone would leave the others waiting
            problem = f"cannot read {path} ({type(e).__name__}: {e}); the file is damaged."
            break
    every = [None] * world
    dist.all_gather_object(every, problem)
    found = [p for p in every if p]
    if found:
        raise (pickles.UnsafeCheckpointError if "refused to load" in found[0] else CheckpointError)(found[0])


def load(engine, args, scheduler, tag: str, universal: bool = False) -> tuple[int, int]:
    from megatron.core import parallel_state as ps
    universal_checkpoint_info(engine.module)  # restore maps on the parameters (universal loading)

    def how():  # names the last intact checkpoint and the command that resumes from it
        return hint(args.load, iteration_of(tag)) if dist.get_rank() == 0 else "See rank 0's message."
    if not manifest.verify_distributed(os.path.join(args.load, tag), how) and dist.get_rank() == 0:
        print(f"warning: {args.load}/{tag} has no manifest (ds_to_universal output, not written by dchag): its "
              "files are not checksummed.", flush=True)
    verify_files(args, tag, universal)
    _vet(os.path.join(args.load, tag))  # DeepSpeed's universal loader and zero_to_fp32 load any pickle
    ds_io.install(engine)  # the rest of DeepSpeed's loads: restricted
    if getattr(args, "no_load_optim", False) and not universal:  # weights only; fresh optimizer moments
        client_state = weights_only.load_weights_only(engine, os.path.join(args.load, tag))
    else:
        if not universal:
            weights_only.refuse_without_optimizer_state(os.path.join(args.load, tag))
        path, client_state = engine.load_checkpoint(args.load, tag=tag, load_lr_scheduler_states=False)
        if path is None or client_state is None:
            raise CheckpointError(f"DeepSpeed could not load {args.load}/{tag}.")
        if universal:  # DeepSpeed restores only what the optimizer holds
            frozen.restore_from_universal(engine, os.path.join(args.load, tag))
    changed = scheduler.load_state_dict(client_state["lr_scheduler"], args.use_checkpoint_opt_param_scheduler,
                                        args.override_opt_param_scheduler)
    if changed and dist.get_rank() == 0:
        kept = "the checkpoint's" if args.use_checkpoint_opt_param_scheduler else "the command line's"
        print(f"> LR schedule differs from the checkpoint ({', '.join(changed)}): using {kept}", flush=True)
    states = client_state.get("rng_states")  # absent in a converted checkpoint: the run's seeds stand
    dp_rank = ps.get_data_parallel_rank()
    if states:
        set_rng_state(states[dp_rank] if dp_rank < len(states) else states[0])
    return int(client_state["iteration"]), int(client_state["consumed_samples"])
