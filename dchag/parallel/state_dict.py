"""Between a rank's sharded parameters and the layout-free full model.

Every parameter is one of:
- channel-sharded (``channel_parallel``): dim 0 holds global rows ``channel_ids`` of
  ``channel_global_rows`` (tokenizer, partial aggregation, MAE head): a slice, or in a blend of
  data sources the rank's home ids (dchag/parallel/sources.py);
- tensor-parallel (megatron's ``tensor_model_parallel`` + ``partition_dim``): the TP rank's
  contiguous chunk;
- replicated.

``full_state_dict`` gathers the full tensors (for export, layout conversion and the
equivalence tests); ``load_full_state_dict`` takes a rank's shard of a full state dict.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps


def shard_kind(param) -> str:
    if getattr(param, "channel_parallel", False):
        return "channel"
    if getattr(param, "tensor_model_parallel", False):
        return "tensor"
    return "replicated"


def shard_index(param, full_shape) -> tuple[slice, ...]:
    """Where this rank's piece of ``param`` lies in the full tensor of ``full_shape``."""
    index = [slice(None)] * len(full_shape)
    kind = shard_kind(param)
    if kind == "channel":
        index[0] = _row_index(param.channel_ids)  # a slice, or a blend's home ids (an index)
    elif kind == "tensor":  # torch.chunk's pieces
        T, r = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
        n = full_shape[param.partition_dim]
        size = -(-n // T)
        index[param.partition_dim] = slice(min(r * size, n), min((r + 1) * size, n))
    return tuple(index)


def shard_of(param, full: torch.Tensor) -> torch.Tensor:
    """This rank's piece of ``full`` for ``param``."""
    return full[shard_index(param, tuple(full.shape))]


def _row_index(ids):
    return slice(ids.start, ids.stop) if isinstance(ids, range) else torch.tensor(ids, dtype=torch.long)


def rows_of(full: torch.Tensor, ids) -> torch.Tensor:
    """Rows ``ids`` (a range: a slice; else an index) of ``full``."""
    return full[_row_index(ids)]


@torch.no_grad()
def load_full_state_dict(model: torch.nn.Module, full) -> None:
    """Each parameter's piece of ``full`` ({name: full tensor}, or any mapping whose values slice
    like one and give ``get_shape()``: safetensors' lazy slices, so only the pieces are read)."""
    missing = [n for n, _ in model.named_parameters() if n not in full]
    if missing:
        raise KeyError(f"full state dict lacks {len(missing)} parameters, e.g. {missing[:3]}")
    for name, param in model.named_parameters():
        t = full[name]
        shape = tuple(t.shape) if torch.is_tensor(t) else tuple(t.get_shape())
        index = shard_index(param, shape)
        if not torch.is_tensor(t) and torch.is_tensor(index[0]):  # a lazy slice takes slices only: read it whole
            t = t[:]
        piece = t[index]
        if piece.shape != param.shape:
            raise ValueError(f"{name}: shard shape {tuple(piece.shape)} != parameter {tuple(param.shape)}")
        param.copy_(piece)


def _gather_objects(obj, group):
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


@torch.no_grad()
def full_state_dict(model: torch.nn.Module, grads: bool = False) -> dict[str, torch.Tensor]:
    """Full (layout-free) tensors of every parameter, or of every gradient with ``grads=True``.
    Collective over the channel and TP groups: call it on every rank."""
    out = {}
    for name, param in model.named_parameters():
        t = param.grad if grads else param
        t = t.detach().cpu() if t is not None else torch.zeros_like(param, device="cpu")
        kind = shard_kind(param)
        if kind == "channel" and ps.get_channel_parallel_world_size() > 1:
            pieces = _gather_objects((param.channel_ids, t), ps.get_channel_parallel_group())
            t = t.new_empty((int(param.channel_global_rows),) + tuple(t.shape[1:]))
            for ids, piece in pieces:  # each row once over the channel group (a blend: the ranks' home ids)
                t[_row_index(ids)] = piece
        elif kind == "tensor" and ps.get_tensor_model_parallel_world_size() > 1:
            t = torch.cat(_gather_objects(t, ps.get_tensor_model_parallel_group()), dim=param.partition_dim)
        out[name] = t
    return out
