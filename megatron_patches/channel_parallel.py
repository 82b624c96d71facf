"""The channel-parallel dimension, registered in ``megatron.core.parallel_state``.

megatron-core knows tensor (TP), pipeline, context, expert and data parallel groups. D-CHAG adds
one more: the *channel-parallel* group, P consecutive ranks of a TP group that split the
channel stage (per-channel tokenization + partial aggregation) between them. P | T, so a TP group
of T ranks holds T/P channel groups that are replicas of each other:

    TP group ranks (by TP rank):  0 1 2 3        T = 4
    channel groups (P = 2):       [0 1] [2 3]    channel rank = tp_rank % P

After ``initialize_model_parallel_with_channels`` the accessors
``parallel_state.get_channel_parallel_group / _world_size / _rank / _global_ranks`` exist
beside megatron's own, in its naming style. Upstream has no hook for extra dimensions, so we
attach module-level functions and wrap ``destroy_model_parallel`` to clear our globals too.

The wrapper also *releases* the process groups. Upstream's ``destroy_model_parallel`` (0.16)
only drops its references, except for its gloo groups, and torch keeps every group alive in its
registry. Each gloo group owns polling threads, so code that re-initializes many layouts in one
process (tests, layout sweeps in benchmarks) ends up with thousands of threads.
"""

from __future__ import annotations

import torch.distributed as dist
from megatron.core import parallel_state as ps

from dchag.parallel.partition import LayoutError, validate_layout  # noqa: F401 - re-exported
from megatron_patches.version import require_megatron

_CHANNEL_PARALLEL_GROUP = None
_CHANNEL_PARALLEL_GLOBAL_RANKS = None


def get_channel_parallel_group(check_initialized: bool = True):
    """The channel-parallel group the caller belongs to."""
    if check_initialized and _CHANNEL_PARALLEL_GROUP is None:
        raise RuntimeError("channel parallel group is not initialized: call "
                           "megatron_patches.initialize_model_parallel_with_channels first")
    return _CHANNEL_PARALLEL_GROUP


def get_channel_parallel_global_ranks(check_initialized: bool = True):
    if check_initialized and _CHANNEL_PARALLEL_GLOBAL_RANKS is None:
        raise RuntimeError("channel parallel group is not initialized")
    return _CHANNEL_PARALLEL_GLOBAL_RANKS


def get_channel_parallel_world_size() -> int:
    return len(get_channel_parallel_global_ranks())


def get_channel_parallel_rank() -> int:
    return get_channel_parallel_global_ranks().index(dist.get_rank())


def get_channel_parallel_replica_rank() -> int:
    """Which of the T/P replicas of the channel stage inside the TP group this rank holds."""
    return ps.get_tensor_model_parallel_rank() // get_channel_parallel_world_size()


def initialize_model_parallel_with_channels(tensor_model_parallel_size: int = 1,
                                            channel_parallel_size: int = 1, **megatron_kwargs) -> None:
    """megatron's ``initialize_model_parallel`` plus the channel-parallel groups.

    Data-parallel size is implied: DP = world / T (no pipeline parallelism in this project).
    Every rank must call this (group creation is collective).
    """
    require_megatron()
    world = dist.get_world_size()
    validate_layout(world, tensor_model_parallel_size, channel_parallel_size)
    megatron_kwargs.setdefault("create_gloo_process_groups", False)
    ps.initialize_model_parallel(tensor_model_parallel_size=tensor_model_parallel_size, **megatron_kwargs)

    # Megatron's own rank layout for TP groups (order tp-cp-ep-dp-pp: TP ranks are the
    # fastest-varying), so our groups are consistent with the groups it just built.
    generator = ps.RankGenerator(tp=tensor_model_parallel_size, ep=1, dp=world // tensor_model_parallel_size,
                                 pp=1, cp=1, order="tp-cp-ep-dp-pp")
    global _CHANNEL_PARALLEL_GROUP, _CHANNEL_PARALLEL_GLOBAL_RANKS
    me = dist.get_rank()
    for tp_ranks in generator.get_ranks("tp"):
        for start in range(0, tensor_model_parallel_size, channel_parallel_size):
            ranks = list(tp_ranks[start:start + channel_parallel_size])
            group = ps.create_group(ranks, group_desc="CHANNEL_PARALLEL_GROUP")  # collective: all ranks call
            if me in ranks:
                _CHANNEL_PARALLEL_GROUP, _CHANNEL_PARALLEL_GLOBAL_RANKS = group, ranks


def destroy_channel_parallel() -> None:
    global _CHANNEL_PARALLEL_GROUP, _CHANNEL_PARALLEL_GLOBAL_RANKS
    _CHANNEL_PARALLEL_GROUP = _CHANNEL_PARALLEL_GLOBAL_RANKS = None


def _held_process_groups() -> list:
    """Every process group that parallel_state or this module holds (by identity, WORLD excluded)."""
    held = {}
    values = list(vars(ps).values()) + [_CHANNEL_PARALLEL_GROUP]
    for value in values:
        for item in value if isinstance(value, (list, tuple)) else (value,):
            if isinstance(item, dist.ProcessGroup) and item is not dist.group.WORLD:
                held[id(item)] = item
    return list(held.values())


def _release(groups) -> None:
    """Destroy groups torch still has registered (the same registry check as upstream's
    ``destroy_model_parallel`` uses for its gloo groups, so nothing is destroyed twice)."""
    registry = dist.distributed_c10d._world.pg_map
    for group in groups:
        if registry.get(group) is not None:
            dist.destroy_process_group(group)


_ACCESSORS = {
    "get_channel_parallel_group": get_channel_parallel_group,
    "get_channel_parallel_global_ranks": get_channel_parallel_global_ranks,
    "get_channel_parallel_world_size": get_channel_parallel_world_size,
    "get_channel_parallel_rank": get_channel_parallel_rank,
    "get_channel_parallel_replica_rank": get_channel_parallel_replica_rank,
    "initialize_model_parallel_with_channels": initialize_model_parallel_with_channels,
}


def register() -> None:
    """Attach the accessors to ``megatron.core.parallel_state`` (idempotent)."""
    require_megatron()
    for name, fn in _ACCESSORS.items():
        setattr(ps, name, fn)
    if not getattr(ps.destroy_model_parallel, "_dchag_wrapped", False):
        upstream_destroy = ps.destroy_model_parallel

        def destroy_model_parallel():
            groups = _held_process_groups() if dist.is_initialized() else []
            upstream_destroy()
            destroy_channel_parallel()
            _release(groups)

        destroy_model_parallel._dchag_wrapped = True
        ps.destroy_model_parallel = destroy_model_parallel
