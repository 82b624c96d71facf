"""Checkpoints: DeepSpeed's engine state plus what DeepSpeed does not save.

Layout of ``--save DIR``::

    DIR/iter_0000100/mp_rank_00_model_states.pt ...   DeepSpeed (weights, optimizer, ZeRO shards)
    DIR/iter_0000100/dchag_args.json                   model/layout arguments (checked on --load)
    DIR/iter_0000100/normalization.json                per-channel statistics the data was normalized with
    DIR/iter_0000100/manifest.json                     size + SHA-256 of every file (checked on --load)
    DIR/latest                                         "iter_0000100", replaced atomically

The client state (in DeepSpeed's model-states file) holds the iteration, the consumed samples
(data position), the LR schedule, every data-parallel rank's RNG states (python, numpy, torch,
CUDA, megatron's RNG tracker), the arguments, and ``universal_checkpoint_info`` with an affine
map of every parameter over the model-parallel ranks, so ``ds_to_universal`` can merge the
tensor-parallel and channel-parallel shards (and a universal checkpoint can be loaded into
another layout: each parameter also carries its restore map).

``latest`` changes only after every rank has finished writing; resuming never overwrites a
checkpoint that lies beyond the starting point.
"""

from __future__ import annotations

import glob
import json
import os
import random
import re
import zipfile

import numpy as np
import torch
import torch.distributed as dist

from dchag.arguments import MODEL_ARGS

TAG_RE = re.compile(r"^iter_(\d{7,})$")


class CheckpointError(RuntimeError):
    pass


def tag_for(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def iteration_of(tag: str) -> int | None:
    m = TAG_RE.match(tag)
    return int(m.group(1)) if m else None


# Arguments that shape the optimizer's parameter groups: its saved state loads only under the same
# values (DeepSpeed's own error for a changed grouping names parameter alignment, not the flag).
OPTIMIZER_ARGS = ("dchag_partial_lr_mult",)


def model_args(args) -> dict:
    """What a checkpoint records of its run (dchag_args.json): the model/layout arguments and the
    optimizer-grouping ones."""
    return {k: getattr(args, k) for k in MODEL_ARGS + OPTIMIZER_ARGS}


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def read_latest(directory: str, name: str = "latest") -> str | None:
    """The tag a pointer file names (``latest``; ds_to_universal output: ``latest_universal``)."""
    path = os.path.join(directory, name)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return f.read().strip()


def saved_iterations(directory: str | None, complete: bool = False) -> list[int]:
    """Iterations of the checkpoint folders under ``directory``; with ``complete``, only those
    every rank finished (``dchag_args.json`` is written after that, just before ``latest``)."""
    if not directory or not os.path.isdir(directory):
        return []
    out = []
    for name in os.listdir(directory):
        it = iteration_of(name)
        if it is None or not os.path.isdir(os.path.join(directory, name)):
            continue
        if complete and not os.path.exists(os.path.join(directory, name, "dchag_args.json")):
            continue
        out.append(it)
    return sorted(out)


# ---------------------------------------------------------------------------------------------
# Before training: what to load, and whether --save is safe to write to.

LAYOUT_ARGS = ("tensor_model_parallel_size", "channel_parallel_size")


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
    from dchag.training.recovery import set_aside_damaged
    later = set_aside_damaged(args, later)  # with --ckpt-step: damaged ones do not count (moved aside)
    if later:
        raise CheckpointError(
            f"--save {args.save} already holds {tag_for(later[-1])}"
            f"{f' (and {len(later) - 1} more)' if len(later) > 1 else ''} beyond this run's starting iteration "
            f"{start_iteration}; saving there would overwrite it. Resume from it (--load {args.save}), or choose "
            "another --save folder (or remove the old checkpoints yourself).")


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
    from dchag.training.logging_utils import comm_device
    bad = torch.tensor([1 if problem else 0], device=comm_device())
    dist.all_reduce(bad)
    if problem or bad.item():
        from dchag.training.recovery import hint
        what = problem or "another rank found a damaged or missing file (see its message)"
        how = hint(args.load, iteration_of(tag)) if dist.get_rank() == 0 else "See rank 0's message."
        raise CheckpointError(f"cannot load {folder} (iteration {iteration_of(tag)}): {what}. {how}")


# ---------------------------------------------------------------------------------------------
# RNG states (per rank; DeepSpeed keeps one client state per model-parallel rank, so the
# data-parallel ranks' states are gathered into it).

def rng_state() -> dict:
    from megatron.core import tensor_parallel
    state = {"random": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _gather_over_data_parallel(obj) -> list:
    from megatron.core import parallel_state as ps
    group = ps.get_data_parallel_group()
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


# ---------------------------------------------------------------------------------------------
# Universal checkpoint metadata: an affine map per parameter over the model-parallel ranks.

def _describe(param) -> dict:
    from dchag.parallel.state_dict import shard_kind
    kind = shard_kind(param)
    d = {"kind": kind, "shape": list(param.ds_shape if hasattr(param, "ds_shape") else param.shape)}
    if kind == "channel":
        d["rows"] = list(param.channel_rows)
        d["global_rows"] = int(param.channel_global_rows)
    elif kind == "tensor":
        d["dim"] = int(param.partition_dim)
    return d


def _affine_map(descs: list[dict]):
    """The map of one parameter from every TP rank's description (index = TP rank)."""
    from deepspeed.checkpoint.affine import AffinePiece, ParamAffineMap, contiguous_split_map, replicated_map
    T = len(descs)
    kind, shape = descs[0]["kind"], descs[0]["shape"]
    if kind == "replicated" or T == 1:
        return replicated_map(shape, T)
    if kind == "tensor":
        dim = descs[0]["dim"]
        full = list(shape)
        full[dim] = sum(d["shape"][dim] for d in descs)
        return contiguous_split_map(full, [d["shape"][dim] for d in descs], dim)
    # channel-sharded: dim 0 holds rows [a, b) of global_rows; ranks with equal rows are replicas.
    full = [descs[0]["global_rows"]] + list(shape[1:])
    strides = [int(np.prod(full[i + 1:], dtype=np.int64)) for i in range(len(full))]  # row-major
    row = strides[0]
    pieces, shard_shapes = {}, {}
    for r, d in enumerate(descs):
        a, b = d["rows"]
        sshape = [b - a] + list(full[1:])
        holders = [q for q, e in enumerate(descs) if e["rows"] == d["rows"]]
        shard_shapes[r] = sshape
        pieces[r] = [AffinePiece(shape=sshape, source_offset=a * row, source_strides=strides, dest_offset=0,
                                 dest_strides=strides, locations=holders)]
    return ParamAffineMap(logical_shape=full, shard_shapes=shard_shapes, pieces_by_rank=pieces)


def universal_checkpoint_info(module) -> dict:
    """Collective over the TP group. Also tags every parameter with its restore map, which
    DeepSpeed's universal-checkpoint loader reads to cut this rank's piece."""
    from deepspeed.checkpoint import constants as C
    from megatron.core import parallel_state as ps
    cached = getattr(module, "_dchag_universal_info", None)
    if cached is not None:
        return cached
    params = list(module.named_parameters())
    local = [(name, _describe(p)) for name, p in params]
    group = ps.get_tensor_model_parallel_group()
    every = [None] * dist.get_world_size(group)
    dist.all_gather_object(every, local, group=group)
    maps = {}
    for i, (name, p) in enumerate(params):
        descs = [every[r][i][1] for r in range(len(every))]
        if any(every[r][i][0] != name for r in range(len(every))):
            raise CheckpointError(f"parameter order differs between TP ranks at {name}")
        amap = _affine_map(descs)
        amap.validate()
        maps["^" + re.escape(name) + "$"] = amap.to_dict()
        setattr(p, C.DS_AUTOTP_UC_META, {"conversion": {"affine_map": amap.to_dict()}})
    info = {C.UNIVERSAL_CHECKPOINT_VERSION_KEY: C.UNIVERSAL_CHECKPOINT_VERSION_VALUE,
            C.AFFINE_MAP: {C.AFFINE_MAP_VERSION: 1, C.AFFINE_MAP_PARAMS: maps}}
    module._dchag_universal_info = info
    return info


def _extra_state_as_tensor(module, state_dict, prefix, local_metadata):
    for key, value in state_dict.items():
        if value is None and key.endswith("._extra_state"):
            state_dict[key] = torch.empty(0)


def prepare_module(model: torch.nn.Module) -> None:
    """megatron's Column/RowParallelLinear put ``_extra_state: None`` into the state dict (a
    Transformer-Engine placeholder; their ``set_extra_state`` ignores it). ``ds_to_universal``
    calls ``.float()`` on every entry and fails on None: store an empty tensor instead."""
    model.register_state_dict_post_hook(_extra_state_as_tensor)


# ---------------------------------------------------------------------------------------------
# Save and load.

def save(engine, args, iteration: int, consumed_samples: int, scheduler, normalization: dict | None = None) -> str:
    """Every rank's DeepSpeed files, then (rank 0) the arguments, the normalization statistics
    and the manifest (size + SHA-256 of every file, hashed by all ranks), then ``latest``."""
    from dchag.checkpointing import manifest, normalization as norm
    tag = tag_for(iteration)
    client_state = {
        "iteration": iteration, "consumed_samples": consumed_samples, "args": model_args(args),
        "all_args": {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))},
        "rng_states": _gather_over_data_parallel(rng_state()),
        "lr_scheduler": scheduler.state_dict(),
        "universal_checkpoint_info": universal_checkpoint_info(engine.module),
    }
    engine.save_checkpoint(args.save, tag=tag, client_state=client_state, save_latest=False)
    dist.barrier()  # every rank's files are written
    if dist.get_rank() == 0:
        with open(os.path.join(args.save, tag, "dchag_args.json"), "w") as f:
            json.dump(model_args(args), f, indent=1)
        if normalization is not None:
            norm.write(os.path.join(args.save, tag), normalization)
    dist.barrier()
    manifest.write_manifest_distributed(os.path.join(args.save, tag))
    if dist.get_rank() == 0:
        tmp = os.path.join(args.save, "latest.tmp")
        with open(tmp, "w") as f:
            f.write(tag)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(args.save, "latest"))
    dist.barrier()
    return tag


def load(engine, args, scheduler, tag: str, universal: bool = False) -> tuple[int, int]:
    from megatron.core import parallel_state as ps
    universal_checkpoint_info(engine.module)  # restore maps on the parameters (universal loading)
    from dchag.checkpointing import manifest
    from dchag.training.recovery import hint

    def how():  # names the last intact checkpoint and the command that resumes from it
        return hint(args.load, iteration_of(tag)) if dist.get_rank() == 0 else "See rank 0's message."
    if not manifest.verify_distributed(os.path.join(args.load, tag), how) and dist.get_rank() == 0:
        print(f"warning: {args.load}/{tag} has no manifest (saved by an older version): its files are not "
              "checksummed.", flush=True)
    verify_files(args, tag, universal)
    from dchag.checkpointing import weights_only
    if getattr(args, "no_load_optim", False) and not universal:  # weights only; fresh optimizer moments
        client_state = weights_only.load_weights_only(engine, os.path.join(args.load, tag))
    else:
        if not universal:
            weights_only.refuse_without_optimizer_state(os.path.join(args.load, tag))
        path, client_state = engine.load_checkpoint(args.load, tag=tag, load_lr_scheduler_states=False)
        if path is None or client_state is None:
            raise CheckpointError(f"DeepSpeed could not load {args.load}/{tag}.")
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
