"""Layout-independent initialization of channel-sharded weights.

A channel-sharded parameter holds rows (channels, groups) ``rows`` of a global tensor. Each row
draws from its own generator seeded by (seed, parameter name, global row), so a rank builds
only its own rows and still gets exactly the values the serial model has: the same model
initializes identically on P = 1, 2, 4, ... and loss curves are comparable across layouts.
(megatron's TP layers get the same property from ``use_cpu_initialization=True``: the master
weight is drawn in full from the global RNG, then sliced.)
"""

from __future__ import annotations

import zlib

import torch
from torch._subclasses.fake_tensor import is_fake


def row_seed(seed: int, name: str, row: int) -> int:
    return (seed * 1_000_003 + zlib.crc32(f"{name}:{row}".encode())) % (2**63 - 1)


@torch.no_grad()
def init_rows_(param: torch.Tensor, rows: range, seed: int, name: str, std: float, mean: float = 0.0):
    """param[i] <- N(mean, std^2) drawn from the generator of global row ``rows[i]``."""
    assert param.shape[0] == len(rows), (param.shape, rows)
    if param.is_meta or is_fake(param):  # shapes only (meta device, dchag.sim): no values to draw
        return param
    for i, row in enumerate(rows):
        gen = torch.Generator().manual_seed(row_seed(seed, name, row))
        param[i].copy_(torch.randn(param[i].shape, generator=gen) * std + mean)
    return param


@torch.no_grad()
def init_identity_(param: torch.Tensor):
    """param [n, D, D] <- n identity matrices (the same on every layout: nothing is drawn)."""
    if param.is_meta or is_fake(param):  # shapes only (meta device, dchag.sim)
        return param
    param.copy_(torch.eye(param.shape[-1], dtype=param.dtype).expand_as(param))
    return param


def mark_channel_sharded(param: torch.nn.Parameter, rows, global_rows: int, owner: bool, identity: bool = False):
    """Tag a parameter whose dim 0 holds rows ``rows`` of ``global_rows`` channel rows: a contiguous
    slice (a range), or, for a per-identity parameter of a blend of data sources, the rank's home
    ids (sorted, dchag/model/bank.py).

    ``channel_ids`` are the global rows held, in order; ``channel_rows`` is their (start, stop)
    when they are one slice (always so with one source), else None. ``identity``: the rows are
    channel identities (per-channel weights; in a blend, held by their home ranks), not
    positions of groups or segments (which checkpoint conversion cuts by the group partition).
    ``tensor_model_parallel`` is what DeepSpeed (``is_model_parallel_parameter``) and megatron
    (``param_is_not_tensor_parallel_duplicate``) read to count a parameter once per
    model-parallel group in gradient norms: it is set on the first channel-stage replica only,
    because when P < T the other T/P - 1 replicas hold duplicates.
    """
    from dchag.parallel.sources import contiguous_range
    ids = rows if isinstance(rows, range) else (contiguous_range(rows) or tuple(int(u) for u in rows))
    param.channel_parallel = True
    param.channel_ids = ids
    param.channel_rows = (ids.start, ids.stop) if isinstance(ids, range) else None
    param.channel_global_rows = global_rows
    param.channel_identity = identity
    param.tensor_model_parallel = owner
    param.partition_dim = 0
    param.partition_stride = 1
    return param


def mark_weight_matrix(param: torch.nn.Parameter) -> torch.nn.Parameter:
    """Tag the weight matrix of a linear map (or a stack of them: per-channel patch embeddings,
    per-group projections, per-channel heads). Only these take AdamW's weight decay; biases,
    norms, embeddings, learned queries and tokens and aggregation coefficients do not
    (``is_weight_matrix``). Decided from the parameter's role where it is built, never from its name."""
    param.weight_matrix = True
    return param


def is_weight_matrix(param: torch.Tensor) -> bool:
    return getattr(param, "weight_matrix", False)
