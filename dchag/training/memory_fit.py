"""Does the run fit this machine's memory? Asked by the pre-flight, before anything is allocated.

The need is dchag/planner's per-rank estimate (the figures tools/estimate_memory.py prints, fitted
to the real code's memory): parameters, gradients and optimizer state, the activations at the
step's peak and the input micro-batch. What the machine has is read without torch and without
starting CUDA (the pre-flight must stay cheap, and a CUDA context made here would sit on one GPU
for every rank):

- a run on GPUs (``DS_ACCELERATOR`` unset or ``cuda``, a GPU present): the GPU memory, from NVML
  (``libnvidia-ml.so.1``, the library nvidia-smi reads; no CUDA context) or, on AMD, from the
  amdgpu driver's ``mem_info_vram_total``; each rank has a GPU of its own;
- on the CPU: the host's memory, the smallest of ``MemTotal``, the cgroup's limit (v1 and v2: a
  container, a SLURM job) and this process's ``RLIMIT_AS`` / ``RLIMIT_DATA`` (``ulimit -v`` / ``-d``),
  shared by the ranks of this node (``LOCAL_WORLD_SIZE``, else 1).

A run is refused only when the estimate exceeds the whole memory (less ``RESERVE`` per rank for
the libraries and the runtime): a run that does not fit in that cannot run, whatever else the
machine does. The refusal names the figures, the largest part and the flags that set it;
``--skip-memory-check`` starts anyway (an estimate can be wrong: say so in an issue).
"""

from __future__ import annotations

import os
import resource

from dchag.training.ds_validate import ConfigError

GB = 1e9
RESERVE = 0.5 * GB  # per rank: torch, DeepSpeed and megatron-core imported (~0.4 GB on the CPU), a CUDA context


def _gb(n: float) -> str:
    return f"{n / GB:,.1f} GB" if n >= 0.1 * GB else f"{n / 2**20:,.0f} MB"


# ---------------------------------------------------------------------------------------------
# what the machine has


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max" (v2, no limit) -> None


def _cgroup_limits() -> list[tuple[int, str]]:
    """The memory limits of this process's cgroup and its parents (v2 ``memory.max``, v1
    ``memory.limit_in_bytes``; a container sees its own cgroup as the root)."""
    out = []
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return out
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            root, name = "/sys/fs/cgroup", "memory.max"
        elif "memory" in controllers.split(","):
            root, name = "/sys/fs/cgroup/memory", "memory.limit_in_bytes"
        else:
            continue
        path = path.strip("/")
        while True:
            value = _read_int(os.path.join(root, path, name))
            if value is not None and value < 1 << 60:  # v1 says "no limit" with a huge number
                out.append((value, f"the cgroup limit ({os.path.join(root, path, name)})"))
            if not path:
                break
            path = os.path.dirname(path)
    return out


def host_memory() -> tuple[int, str] | None:
    """(bytes, where the figure comes from): the smallest of the host's memory, the cgroup's limit
    and this process's address-space / data limits; None when none can be read."""
    found = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    found.append((int(line.split()[1]) * 1024, "the host's memory (MemTotal)"))
    except (OSError, ValueError, IndexError):
        pass
    found += _cgroup_limits()
    for limit, flag in ((resource.RLIMIT_AS, "ulimit -v"), (resource.RLIMIT_DATA, "ulimit -d")):
        soft, _ = resource.getrlimit(limit)
        if soft != resource.RLIM_INFINITY:
            found.append((soft, f"this process's memory limit ({flag} {soft // 1024})"))
    return min(found) if found else None


def _nvml_memory() -> list[int]:
    """Total memory of every NVIDIA GPU of this node, from NVML (no CUDA context); [] without."""
    import ctypes

    class Memory(ctypes.Structure):
        _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return []
    if nvml.nvmlInit_v2() != 0:
        return []
    try:
        count = ctypes.c_uint()
        if nvml.nvmlDeviceGetCount_v2(ctypes.byref(count)) != 0:
            return []
        out = []
        for i in range(count.value):
            handle, memory = ctypes.c_void_p(), Memory()
            if nvml.nvmlDeviceGetHandleByIndex_v2(i, ctypes.byref(handle)) == 0 and \
                    nvml.nvmlDeviceGetMemoryInfo(handle, ctypes.byref(memory)) == 0:
                out.append(int(memory.total))
        return out
    finally:
        nvml.nvmlShutdown()


def _amd_memory() -> list[int]:
    import glob
    return [v for path in sorted(glob.glob("/sys/class/drm/card*/device/mem_info_vram_total"))
            if (v := _read_int(path))]


def gpu_memory() -> tuple[int, str] | None:
    """(bytes, where) of the largest GPU of this node, or None (no GPU found, or ``DS_ACCELERATOR=cpu``).
    The largest: which GPU a rank gets depends on ``CUDA_VISIBLE_DEVICES``, and a run is refused
    only when it fits none."""
    if os.environ.get("DS_ACCELERATOR", "").strip().lower() == "cpu":
        return None
    for probe, name in ((_nvml_memory, "NVML"), (_amd_memory, "amdgpu")):
        try:
            sizes = probe()
        except Exception:  # noqa: BLE001 - a driver that answers oddly: no figure, no refusal
            sizes = []
        if sizes:
            return max(sizes), f"the GPU's memory ({name})"
    return None


def ranks_on_this_node() -> int:
    value = os.environ.get("LOCAL_WORLD_SIZE", "")
    return int(value) if value.isdigit() and int(value) > 0 else 1


# ---------------------------------------------------------------------------------------------
# what the run needs


def specs(args, cfg, ds_config: dict, data_parallel_size: int):
    """The planner's (ModelSpec, LayoutSpec) of this run."""
    from dchag.planner.spec import LayoutSpec, ModelSpec
    task = "forecast" if cfg.task == "forecast" else "mae"  # regress/segment: a dense head, counted as MAE's
    model = ModelSpec(num_layers=cfg.num_layers, hidden_size=cfg.hidden_size,
                      num_attention_heads=cfg.num_attention_heads, num_channels=cfg.num_channels, img_h=cfg.img_h,
                      img_w=cfg.img_w, patch_dim=cfg.patch_dim, ffn_hidden_size=cfg.ffn_hidden_size,
                      aggregation=cfg.aggregation, groups=cfg.groups, tree_levels=cfg.tree_levels,
                      channel_chunk=int(cfg.channel_chunk or 0), task=task,
                      attention_backend=cfg.attention_backend if cfg.attention_backend in ("sdpa", "unfused") else "sdpa")
    layout = LayoutSpec(tensor_parallel=args.tensor_model_parallel_size, channel_parallel=args.channel_parallel_size,
                        data_parallel=data_parallel_size,
                        zero_stage=int((ds_config.get("zero_optimization") or {}).get("stage", 0)),
                        precision="bf16" if args.bf16 else "fp32", recompute=bool(args.recompute_activations),
                        sequence_parallel=bool(args.sequence_parallel), micro_batch_size=int(args.micro_batch_size))
    return model, layout


def _parts(args, counts: dict, states: float, dynamic: float, batch: float, numel: int) -> list[tuple[float, str]]:
    """(bytes, phrase naming the part and the flags that set it), largest first."""
    from dchag.planner.params import CHANNEL_STAGE
    channel = sum(counts.get(k, 0) for k in CHANNEL_STAGE + ("head",))
    fix = (f"most of them are per-channel weights: lower --num-channels {args.num_channels} or spread the channels "
           f"over --channel-parallel-size ranks; or lower --hidden-size {args.hidden_size}"
           if channel > numel / 2 else f"lower --hidden-size {args.hidden_size} or --num-layers {args.num_layers}")
    return sorted([
        (states, f"parameters, gradients and optimizer state, {_gb(states)} for {numel:,} parameters on this rank: "
                 f"{fix}, or shard them (ZeRO stage 1-3 over data-parallel ranks, --tensor-model-parallel-size)"),
        (dynamic, f"activations at the step's peak, {_gb(dynamic)}: lower --micro-batch-size {args.micro_batch_size} "
                  f"(they grow with it, with the channels and with --img-h x --img-w), or add "
                  "--recompute-activations"),
        (batch, f"the input micro-batch, {_gb(batch)}: lower --micro-batch-size {args.micro_batch_size}"),
    ], key=lambda part: -part[0])


def check(args, cfg, ds_config: dict, data_parallel_size: int) -> None:
    """Raise :class:`ConfigError` when this rank's estimated memory exceeds what the machine has."""
    if getattr(args, "skip_memory_check", False):
        return
    from dchag.planner.memory import batch_bytes, estimate_memory, model_states
    from dchag.planner.spec import PlanError
    gpu = gpu_memory()
    have = gpu or host_memory()
    if have is None:
        return
    capacity, where = have
    ranks = 1 if gpu else ranks_on_this_node()
    budget = capacity / ranks - RESERVE
    try:
        model, layout = specs(args, cfg, ds_config, data_parallel_size)
        counts, params, grads, optimizer = model_states(model, layout)  # arithmetic: first, whatever the size
        states, batch = params + grads + optimizer, batch_bytes(model, layout)
        dynamic = 0.0
        if states + batch <= budget:  # the simulation is O(layers): only for a model whose states fit
            estimate = estimate_memory(model, layout)
            dynamic = estimate.peak_dynamic - estimate.grads  # grads are counted with the states
    except PlanError:  # a layout the model check refuses (listed there) or the planner cannot estimate
        return
    need = states + dynamic + batch
    if need <= budget:
        return
    parts = _parts(args, counts, states, dynamic, batch, sum(counts.values()))
    shared = f", shared by the {ranks} ranks of this node" if ranks > 1 else ""
    raise ConfigError(
        f"the run does not fit the memory here: each rank needs about {_gb(need)}"
        f"{' at least' if not dynamic else ''}, but {where} is {_gb(capacity)}{shared} ({_gb(RESERVE)} of it kept "
        f"for the libraries per rank). Most of it is {parts[0][1]}. Nothing was allocated (the estimate is "
        "dchag/planner's, as tools/estimate_memory.py prints it; --skip-memory-check starts anyway).")
