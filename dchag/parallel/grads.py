"""Gradient fix-ups that megatron's own DDP would do, done in autograd so any optimizer
wrapper (DeepSpeed ZeRO 0-3 included) sees correct gradients.

Under sequence parallelism each TP rank's layer norms (and row-parallel biases) see only its L/T
tokens, so their gradient is a partial sum; megatron tags them ``sequence_parallel=True`` and
its DDP all-reduces them over TP after backward (``finalize_model_grads``, one coalesced call).
Here the reduced gradient must exist *before* it reaches ``param.grad``, because DeepSpeed's
ZeRO-2/3 hooks consume gradients as soon as they are accumulated. Two ways:

* ``coalesced`` (default): each bucket (one transformer layer; the final norm) passes its
  SP-tagged parameters through one identity autograd node before its forward uses them; that
  node's backward runs once, when the whole bucket's gradients are known, and reduces them with
  one flattened all-reduce (``_flatten_dense_tensors``, as megatron does). Activation recompute
  rebuilds the node with the layer. Under ZeRO-3, whose parameters are partitioned and
  gathered by DeepSpeed's own module hooks, it falls back to the per-parameter hooks.
* ``per_parameter``: one blocking all-reduce per parameter in a gradient hook (the reference).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.nn.utils.stateless import _reparametrize_module

MODES = ("coalesced", "per_parameter")


def _is_sp(param) -> bool:
    return bool(getattr(param, "sequence_parallel", False)) and param.requires_grad


def _zero3_partitioned(params) -> bool:
    return any(hasattr(p, "ds_id") for p in params)


class _AllReduceGradsOnce(torch.autograd.Function):
    """Identity on a bucket of tensors; backward: one flattened all-reduce of their gradients."""

    @staticmethod
    def forward(ctx, group, *tensors):
        ctx.group = group
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx, *grads):
        present = [g for g in grads if g is not None]
        if present:
            flat = _flatten_dense_tensors([g.contiguous() for g in present])
            dist.all_reduce(flat, group=ctx.group)
            reduced = iter(_unflatten_dense_tensors(flat, present))
            grads = tuple(None if g is None else next(reduced) for g in grads)
        return (None,) + tuple(grads)


def _buckets(module: torch.nn.Module):
    """Modules whose SP parameters are reduced together: the children of ``module`` (looking
    through ModuleLists), e.g. every TransformerLayer and the final norm of a TransformerBlock."""
    for child in module.children():
        if isinstance(child, (torch.nn.ModuleList, torch.nn.Sequential)):
            yield from _buckets(child)
        elif any(_is_sp(p) for p in child.parameters()):
            yield child


def _wrap_forward(bucket: torch.nn.Module, names: list[str], group, state: dict) -> None:
    forward = bucket.forward  # the bound method (class forward)

    def coalesced_forward(*args, **kwargs):
        # named_parameters(), not attribute access: under ZeRO-3 a parameter read in forward
        # becomes an "external parameter" of the running module and is gathered/released wrongly.
        by_name = dict(bucket.named_parameters())
        params = [by_name[n] for n in names]
        if _zero3_partitioned(params):
            state["zero3"] = True  # the per-parameter hooks reduce instead
            return forward(*args, **kwargs)
        routed = _AllReduceGradsOnce.apply(group, *params)
        with _reparametrize_module(bucket, dict(zip(names, routed))):
            return forward(*args, **kwargs)

    bucket.forward = coalesced_forward


def allreduce_sequence_parallel_grads(module: torch.nn.Module, mode: str = "coalesced") -> int:
    """Reduce the SP-tagged parameters' gradients of ``module`` over TP (see the module
    docstring). Returns the number of parameters handled."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if ps.get_tensor_model_parallel_world_size() == 1:
        return 0
    group = ps.get_tensor_model_parallel_group()
    state = {"zero3": mode == "per_parameter"}

    def reduce(grad):
        if not state["zero3"]:
            return grad  # reduced by the bucket's node
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=group)
        return grad

    params = [p for p in module.parameters() if _is_sp(p)]
    for param in params:
        param.register_hook(reduce)
    if mode == "coalesced":
        covered = set()
        for bucket in _buckets(module):
            named = [(n, p) for n, p in bucket.named_parameters() if _is_sp(p)]
            _wrap_forward(bucket, [n for n, _ in named], group, state)
            covered.update(id(p) for _, p in named)
        rest = [n for n, p in module.named_parameters() if _is_sp(p) and id(p) not in covered]
        if rest:  # SP parameters outside every child bucket (held by `module` itself)
            _wrap_forward(module, rest, group, state)
    return len(params)
