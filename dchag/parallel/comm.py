"""Autograd-aware collectives over the channel-parallel group.

These are the channel-group twins of megatron's ``mappings.py`` (copy/reduce/gather to the
TP region). Each is the identity when the channel group has one rank.

- ``gather_from_channel_parallel_region``: all-gather forward; backward takes the rank's own
  slice. Correct only because everything downstream of the gather enters the TP region through
  ``copy_to_tensor_model_parallel_region`` (all-reduce backward), so every rank already holds
  the *full* gradient of the gathered tensor. This is D-CHAG's single forward collective.
- ``copy_to_channel_parallel_region``: identity forward, all-reduce backward: a replicated
  tensor feeding channel-sharded consumers (the MAE reconstruction head).
- ``reduce_from_channel_parallel_region``: all-reduce forward, identity backward: a sum of
  channel-sharded partial results that every rank then uses identically (loss sums).
- ``share_over_channel_parallel_region``: all-reduce forward, all-reduce backward: a tensor to
  which each rank contributes its part (zeros elsewhere) and which every rank then uses in its
  own way: the rows of per-identity weights a rank borrows from their home ranks in a blend of
  data sources (dchag/model/bank.py). Rank r's use adds to the loss, so the gradient of a
  contribution is the sum over ranks of their gradients.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps


def _group():
    return ps.get_channel_parallel_group()


def _size() -> int:
    if not ps.model_parallel_is_initialized() or not hasattr(ps, "get_channel_parallel_world_size"):
        return 1
    return ps.get_channel_parallel_world_size()


class _GatherFromChannelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim):
        ctx.dim, ctx.rank, ctx.chunk = dim, ps.get_channel_parallel_rank(), x.shape[dim]
        # all_gather_into_tensor concatenates along dim 0: move `dim` first, gather, move back.
        moved = x.movedim(dim, 0).contiguous()
        out = moved.new_empty((moved.shape[0] * _size(),) + tuple(moved.shape[1:]))
        dist.all_gather_into_tensor(out, moved, group=_group())
        return out.movedim(0, dim)

    @staticmethod
    def backward(ctx, grad):
        return grad.narrow(ctx.dim, ctx.rank * ctx.chunk, ctx.chunk).contiguous(), None


class _CopyToChannelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=_group())
        return grad


def _summed(x: torch.Tensor) -> torch.Tensor:
    """A copy of ``x`` summed over the channel group."""
    x = x.contiguous().clone()
    dist.all_reduce(x, group=_group())
    return x


class _ReduceFromChannelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _summed(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


class _ShareOverChannelRegion(_ReduceFromChannelRegion):
    @staticmethod
    def backward(ctx, grad):
        return _summed(grad)


def gather_from_channel_parallel_region(x: torch.Tensor, dim: int) -> torch.Tensor:
    """[..., n_local, ...] on each rank -> [..., P * n_local, ...] in channel-rank order."""
    return x if _size() == 1 else _GatherFromChannelRegion.apply(x, dim)


def copy_to_channel_parallel_region(x: torch.Tensor) -> torch.Tensor:
    return x if _size() == 1 else _CopyToChannelRegion.apply(x)


def reduce_from_channel_parallel_region(x: torch.Tensor) -> torch.Tensor:
    return x if _size() == 1 else _ReduceFromChannelRegion.apply(x)


def share_over_channel_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """Every rank's contribution summed, on every rank; backward likewise (module docstring)."""
    return x if _size() == 1 else _ShareOverChannelRegion.apply(x)


# ---- inference (no autograd) ----------------------------------------------------------------

def gather_channel_rows(x: torch.Tensor, rows_per_rank: list[int], dim: int = 1) -> torch.Tensor:
    """Inference: each channel rank's ``rows_per_rank[r]`` channels of ``x`` (along ``dim``; the
    ranks may hold different counts) -> all of them, in channel-rank order, on every rank."""
    if _size() == 1:
        return x
    if x.dtype == torch.bool:
        return gather_channel_rows(x.to(torch.uint8), rows_per_rank, dim).bool()
    most = max(rows_per_rank)
    moved = x.movedim(dim, 0).contiguous()
    if moved.shape[0] < most:  # gloo gathers equal sizes only: pad, then cut each rank's rows out again
        moved = torch.cat([moved, moved.new_zeros((most - moved.shape[0],) + tuple(moved.shape[1:]))])
    out = moved.new_empty((most * _size(),) + tuple(moved.shape[1:]))
    dist.all_gather_into_tensor(out, moved, group=_group())
    parts = [out[r * most:r * most + n] for r, n in enumerate(rows_per_rank)]
    return torch.cat(parts).movedim(0, dim)


def any_over_channel_group(x: torch.Tensor) -> torch.Tensor:
    """Inference: a boolean tensor, True where it is True on any channel rank."""
    if _size() == 1:
        return x
    t = x.to(torch.uint8)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_group())
    return t.bool()
