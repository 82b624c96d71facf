"""DeepSpeed checkpoints plus what DeepSpeed does not save (iteration, data position, RNG
tracker, LR schedule); ``latest`` written atomically by rank 0 after every rank saved."""

from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist

from dchag.arguments import MODEL_ARGS


class CheckpointError(RuntimeError):
    pass


def tag_for(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def model_args(args) -> dict:
    return {k: getattr(args, k) for k in MODEL_ARGS}


def save(engine, args, iteration: int, consumed_samples: int, scheduler) -> str:
    from deepspeed.checkpoint.constants import (UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY,
                                                UNIVERSAL_CHECKPOINT_VERSION_VALUE)
    from megatron.core import tensor_parallel
    tag = tag_for(iteration)
    client_state = {
        "iteration": iteration, "consumed_samples": consumed_samples, "args": model_args(args),
        "all_args": {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))},
        "rng_tracker_states": tensor_parallel.get_cuda_rng_tracker().get_states(),
        "torch_rng_state": torch.get_rng_state(),
        "lr_scheduler": scheduler.state_dict(),
        UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE},
    }
    engine.save_checkpoint(args.save, tag=tag, client_state=client_state, save_latest=False)
    dist.barrier()
    if dist.get_rank() == 0:
        with open(os.path.join(args.save, tag, "dchag_args.json"), "w") as f:
            json.dump(model_args(args), f, indent=1)
        tmp = os.path.join(args.save, "latest.tmp")
        with open(tmp, "w") as f:
            f.write(tag)
        os.replace(tmp, os.path.join(args.save, "latest"))
    dist.barrier()
    return tag


def check_compatible(args) -> str:
    """The tag to load; refuses (every rank) when model/layout arguments differ."""
    latest = os.path.join(args.load, "latest")
    if not os.path.exists(latest):
        raise CheckpointError(f"--load {args.load}: no 'latest' file (no checkpoint saved there).")
    with open(latest) as f:
        tag = f.read().strip()
    path = os.path.join(args.load, tag, "dchag_args.json")
    if not os.path.exists(path):
        raise CheckpointError(f"--load {args.load}: checkpoint {tag} has no dchag_args.json.")
    with open(path) as f:
        saved = json.load(f)
    for k in MODEL_ARGS:
        if k in saved and saved[k] != getattr(args, k):
            flag = "--" + k.replace("_", "-")
            raise CheckpointError(f"cannot load {args.load}/{tag}: it was saved with {flag} {saved[k]} but the "
                                  f"command line gives {flag} {getattr(args, k)}.")
    return tag


def load(engine, args, scheduler) -> tuple[int, int]:
    from megatron.core import tensor_parallel
    tag = check_compatible(args)
    path, client_state = engine.load_checkpoint(args.load, tag=tag, load_lr_scheduler_states=False)
    if path is None or client_state is None:
        raise CheckpointError(f"DeepSpeed could not load {args.load}/{tag}.")
    scheduler.load_state_dict(client_state["lr_scheduler"])
    tensor_parallel.get_cuda_rng_tracker().set_states(client_state["rng_tracker_states"])
    torch.set_rng_state(client_state["torch_rng_state"])
    return int(client_state["iteration"]), int(client_state["consumed_samples"])
