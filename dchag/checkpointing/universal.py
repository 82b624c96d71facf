"""Universal checkpoint metadata: an affine map per parameter over the model-parallel ranks.

Saved in every checkpoint's client state as ``universal_checkpoint_info``, so DeepSpeed's
``ds_to_universal`` can merge the tensor-parallel and channel-parallel shards, and a universal
checkpoint can be loaded into another layout (each parameter also carries its restore map).
"""

from __future__ import annotations

import re

import numpy as np
import torch
import torch.distributed as dist

from dchag.checkpointing.errors import CheckpointError
from dchag.parallel.sources import runs


def _describe(param) -> dict:
    from dchag.parallel.state_dict import shard_kind
    kind = shard_kind(param)
    d = {"kind": kind, "shape": list(param.ds_shape if hasattr(param, "ds_shape") else param.shape)}
    if kind == "channel":
        if param.channel_rows is not None:
            d["rows"] = list(param.channel_rows)
        else:  # a blend's per-identity rows (the rank's home ids): one piece per run of them
            d["runs"] = [list(run) for run in runs(param.channel_ids)]
        d["global_rows"] = int(param.channel_global_rows)
    elif kind == "tensor":
        d["dim"] = int(param.partition_dim)
    return d


def affine_map(descs: list[dict]):
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
    # channel-sharded: dim 0 holds rows [a, b) of global_rows, or (a blend's per-identity rows) the
    # runs [[a, b], ...] of the rank's home ids, one piece each; ranks with equal rows are replicas.
    full = [descs[0]["global_rows"]] + list(shape[1:])
    strides = [int(np.prod(full[i + 1:], dtype=np.int64)) for i in range(len(full))]  # row-major
    row = strides[0]
    pieces, shard_shapes = {}, {}
    for r, d in enumerate(descs):
        held = _row_runs(d)
        holders = [q for q, e in enumerate(descs) if _row_runs(e) == held]
        shard_shapes[r] = [sum(b - a for a, b in held)] + list(full[1:])
        pieces[r], at = [], 0
        for a, b in held:
            pieces[r].append(AffinePiece(shape=[b - a] + list(full[1:]), source_offset=a * row, source_strides=strides,
                                         dest_offset=at * row, dest_strides=strides, locations=holders))
            at += b - a
    return ParamAffineMap(logical_shape=full, shard_shapes=shard_shapes, pieces_by_rank=pieces)


def _row_runs(desc: dict) -> list[tuple[int, int]]:
    """The runs of global rows a channel-sharded description holds."""
    return [tuple(run) for run in desc["runs"]] if "runs" in desc else [tuple(desc["rows"])]


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
        amap = affine_map(descs)
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
