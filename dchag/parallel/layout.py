"""The parallel layout as plain numbers, read once from ``parallel_state``.

Model code takes a ``ParallelLayout`` (shapes and ranks, no process groups); the collectives
live in ``dchag.parallel.comm``. ``ParallelLayout.serial()`` is the one-process reference.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ParallelLayout:
    tensor_parallel_size: int = 1
    tensor_parallel_rank: int = 0
    channel_parallel_size: int = 1
    channel_parallel_rank: int = 0
    data_parallel_size: int = 1
    data_parallel_rank: int = 0

    @property
    def channel_replica_rank(self) -> int:
        """Index of this rank's copy of the channel stage among the T/P copies in its TP group."""
        return self.tensor_parallel_rank // self.channel_parallel_size

    @property
    def owns_channel_stage(self) -> bool:
        """True on the first replica: the one whose channel-stage parameters count as unique
        (gradient norms, checkpoints) when P < T replicates the channel stage."""
        return self.channel_replica_rank == 0

    @classmethod
    def serial(cls) -> "ParallelLayout":
        return cls()

    @classmethod
    def current(cls) -> "ParallelLayout":
        from megatron.core import parallel_state as ps
        if not ps.model_parallel_is_initialized():
            return cls.serial()
        return cls(
            tensor_parallel_size=ps.get_tensor_model_parallel_world_size(),
            tensor_parallel_rank=ps.get_tensor_model_parallel_rank(),
            channel_parallel_size=ps.get_channel_parallel_world_size(),
            channel_parallel_rank=ps.get_channel_parallel_rank(),
            data_parallel_size=ps.get_data_parallel_world_size(),
            data_parallel_rank=ps.get_data_parallel_rank(),
        )
