"""Process groups and seeds: torch.distributed from the launcher's env, then megatron's layout."""

from __future__ import annotations

import os

import torch


def init_distributed() -> None:
    """The run's device decides (``dchag.device``): gloo on the CPU; NCCL/RCCL and the local
    rank's GPU otherwise. DeepSpeed is told the same through ``DS_ACCELERATOR``. Rank, world size
    and rendezvous come from the launcher (torchrun, deepspeed, srun or none: ``launch.resolve``);
    DeepSpeed's JIT ops are cached per environment (``launch.use_environment_extensions_dir``)."""
    from dchag.device import comm_backend, run_device
    from dchag.training import launch
    launch.resolve()
    launch.use_environment_extensions_dir()
    device = run_device()  # raises a DeviceError naming the fix
    os.environ.setdefault("DS_ACCELERATOR", device.type)
    import deepspeed
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if device.type == "cpu":
        _skip_deepspeed_shm_op()
    import torch.distributed as dist
    # Once per process: a study or a notebook trains several times in one process.
    store = None if dist.is_initialized() else elastic_attempt_store()
    if store is not None:  # DeepSpeed adopts a process group that exists
        world = int(os.environ["WORLD_SIZE"])
        extra = {"device_id": device} if device.type == "cuda" and world > 1 else {}
        dist.init_process_group(comm_backend(), store=store, rank=int(os.environ["RANK"]), world_size=world, **extra)
    deepspeed.init_distributed(dist_backend=comm_backend(), verbose=False)


def elastic_attempt_store():
    """Under torchrun when its workers use the agent's TCP store (``TORCHELASTIC_USE_AGENT_STORE``:
    always with ``--master_port`` / ``--rdzv-backend static``, and with c10d unless
    ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``): that store, its keys prefixed by this attempt
    (``TORCHELASTIC_RESTART_COUNT``); else None (``env://`` as usual). The agent keeps one store
    across restarts, so restarted workers read the dead attempt's keys (its ranks' addresses) and
    hang in ``init_process_group``; a prefix per attempt gives each restart fresh keys."""
    env = os.environ
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    import torch.distributed as dist
    from torch.distributed.constants import default_pg_timeout  # what env:// would wait: ranks start apart
    client = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), int(env["WORLD_SIZE"]), is_master=False,
                           timeout=default_pg_timeout)
    return dist.PrefixStore(f"dchag/attempt{env.get('TORCHELASTIC_RESTART_COUNT', '0')}", client)


def _skip_deepspeed_shm_op() -> None:
    """On the CPU, DeepSpeed's communication backend JIT-builds a shared-memory all-reduce op when
    it starts (deepspeed/comm/torch.py ``build_shm_op``). Only DeepSpeed's inference all-reduce uses
    it, which dchag never calls. The build takes 25 s to minutes, and a process killed during the
    build leaves torch's build lock behind: every later start on the machine then waits on that lock
    forever (a CI run hung 30 min in tests/test_checkpoint_convert.py). Marking the op incompatible
    makes DeepSpeed skip it (``build_shm_op`` returns None, its own path for an op that
    cannot build), so a CPU start builds nothing."""
    import deepspeed.ops
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def init_model_parallel(args) -> None:
    import megatron_patches
    from megatron.core import parallel_state as ps, tensor_parallel
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    megatron_patches.initialize_model_parallel_with_channels(args.tensor_model_parallel_size,
                                                            args.channel_parallel_size)
    tensor_parallel.model_parallel_cuda_manual_seed(args.seed)
    torch.manual_seed(args.seed)
