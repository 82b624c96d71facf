"""The ``mpu`` object DeepSpeed expects, backed by megatron-core's ``parallel_state``.

``deepspeed.initialize(mpu=parallel_state)`` fails: DeepSpeed asks for ``get_model_parallel_*``
which megatron-core no longer has, and ``mpu=None`` with TP silently treats every rank as
data-parallel (wrong batch size, wrong grad norm). This adapter maps:

- model parallel  -> megatron's TP group (the channel-parallel group lies inside it, so the
  TP group is everything a model replica is split over; no pipeline parallelism here);
- data parallel   -> megatron's DP group (ZeRO shards optimizer state over it);
- tensor parallel -> passed through.

Deliberately absent: ``get_sequence_parallel_*`` — in DeepSpeed those mean Ulysses sequence
parallelism, not megatron's TP-sequence-parallel, and their presence would change how ZeRO
builds its groups.
"""

from __future__ import annotations

import torch.distributed as dist
from megatron.core import parallel_state as ps


class MegatronMpu:
    # model-parallel == tensor-parallel in this project (no pipeline stages).
    @staticmethod
    def get_model_parallel_group():
        return ps.get_tensor_model_parallel_group()

    @staticmethod
    def get_model_parallel_world_size():
        return ps.get_tensor_model_parallel_world_size()

    @staticmethod
    def get_model_parallel_rank():
        return ps.get_tensor_model_parallel_rank()

    get_tensor_model_parallel_group = staticmethod(ps.get_tensor_model_parallel_group)
    get_tensor_model_parallel_world_size = staticmethod(ps.get_tensor_model_parallel_world_size)
    get_tensor_model_parallel_rank = staticmethod(ps.get_tensor_model_parallel_rank)
    get_tensor_model_parallel_src_rank = staticmethod(ps.get_tensor_model_parallel_src_rank)

    @staticmethod
    def get_data_parallel_group():
        return ps.get_data_parallel_group()

    @staticmethod
    def get_data_parallel_world_size():
        return ps.get_data_parallel_world_size()

    @staticmethod
    def get_data_parallel_rank():
        return ps.get_data_parallel_rank()

    @staticmethod
    def get_data_parallel_group_ranks():
        return dist.get_process_group_ranks(ps.get_data_parallel_group())

    @staticmethod
    def get_pipeline_model_parallel_world_size():
        return 1

    @staticmethod
    def get_pipeline_model_parallel_rank():
        return 0

    @staticmethod
    def get_pipeline_model_parallel_group():
        return ps.get_pipeline_model_parallel_group()


mpu = MegatronMpu()
