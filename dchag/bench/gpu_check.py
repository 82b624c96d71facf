"""One-GPU check of the GPU path (``tools/gpu_check.py``): which SDPA kernels run, and a bf16 MAE
training of a ~1B-parameter ViT with C = 512 channels, flat vs D-CHAG-L (T = P = 1, G = 8).

Three parts, each recorded in ``gpu_check.json`` and ``gpu_check.md``:

1. ``kernels``: for the backbone's self-attention shape and the aggregations' learned-query
   shapes (FinalAggregation over C tokens for flat and G for D-CHAG, CrossReduce over a group's
   C/G tokens), the kernel ``scaled_dot_product_attention`` picks by itself
   (``torch._fused_sdp_choice``) and, for each of flash / efficient / cuDNN / math run alone
   under ``torch.nn.attention.sdpa_kernel``, whether forward + backward run.
2. ``startup``: seconds to build the model on the GPU with ``--use-cpu-initialization`` (full
   weights drawn on the host, then moved; layout-identical) and without (each rank draws on its
   GPU), the measurement behind the README's default.
3. ``training``: per method, through the real ``dchag.training.run`` (DeepSpeed ZeRO-1 bf16,
   ``--attention-backend sdpa``) on batches generated on the GPU: median step time, model TFLOPS
   per GPU (FLOPs from ``dchag.planner.flops.step_flops``), ``torch.cuda.max_memory_allocated``
   beside the planner's ``estimate_memory`` total, and whether the loss falls (mean of the last
   5 steps below the mean of the first 5).

``--smoke`` runs all of it with a tiny model on whatever device the run has (CPU in the tests).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time

import torch

FULL = dict(num_channels=512, img=256, patch=16, layers=20, hidden=2048, heads=16, groups=8, micro_batch=4,
            iters=30)
SMOKE = dict(num_channels=16, img=16, patch=4, layers=2, hidden=32, heads=4, groups=4, micro_batch=2, iters=8)
METHODS = (("flat", "flat"), ("D-CHAG-L", "linear"))


# ------------------------------------------------------------------------------------------------
# 1. SDPA kernels
# ------------------------------------------------------------------------------------------------


def attention_shapes(size: dict) -> dict[str, tuple]:
    """name -> (N, heads, q_len, kv_len, head_dim), the 4-D problems the model hands to SDPA."""
    B, H, D = size["micro_batch"], size["heads"], size["hidden"]
    L = (size["img"] // size["patch"]) ** 2
    hd, C, G = D // H, size["num_channels"], size["groups"]
    return {
        "backbone self-attention": (B, H, L, L, hd),
        "final aggregation, flat (C tokens)": (B * L, H, 1, C, hd),
        "final aggregation, D-CHAG (G tokens)": (B * L, H, 1, G, hd),
        "CrossReduce, D-CHAG-C (C/G tokens)": (B * G * L, H, 1, C // G, hd),
    }


def _backends():
    from torch.nn.attention import SDPBackend
    names = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION",
             "math": "MATH"}
    return {k: getattr(SDPBackend, v) for k, v in names.items() if hasattr(SDPBackend, v)}


def sdpa_kernels(shapes: dict, device: torch.device, dtype: torch.dtype) -> dict:
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel
    backends = _backends()
    by_value = {int(v.value) if hasattr(v, "value") else int(v): k for k, v in backends.items()}
    out = {}
    for name, (N, H, lq, lk, hd) in shapes.items():
        q = torch.randn(N, H, lq, hd, device=device, dtype=dtype, requires_grad=True)
        k = torch.randn(N, H, lk, hd, device=device, dtype=dtype, requires_grad=True)
        v = torch.randn(N, H, lk, hd, device=device, dtype=dtype, requires_grad=True)
        entry = {"shape [N, heads, q_len, kv_len, head_dim]": [N, H, lq, lk, hd], "runs": {}}
        try:
            choice = torch._fused_sdp_choice(q, k, v)
            entry["default"] = by_value.get(int(choice), f"backend {int(choice)}")
        except Exception as e:  # noqa: BLE001 - a private API: report, do not fail
            entry["default"] = f"unknown ({type(e).__name__})"
        for kname, backend in backends.items():
            try:
                with sdpa_kernel([backend]):
                    F.scaled_dot_product_attention(q, k, v).float().sum().backward()
                entry["runs"][kname] = "ok"
            except Exception as e:  # noqa: BLE001 - "not available for this shape" is a result
                entry["runs"][kname] = f"no: {str(e).splitlines()[0][:120]}"
            q.grad = k.grad = v.grad = None
        out[name] = entry
        del q, k, v
    return out


# ------------------------------------------------------------------------------------------------
# 2. start-up time of --use-cpu-initialization
# ------------------------------------------------------------------------------------------------


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _setup_layout(seed: int = 1234):
    import megatron_patches
    from megatron.core import parallel_state as ps, tensor_parallel
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    megatron_patches.initialize_model_parallel_with_channels(1, 1)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def measure_startup(cfg, device: torch.device) -> dict:
    import dataclasses
    from dchag.model.vit import DChagViT
    choices = (True,) if device.type == "cpu" else (True, False)  # GPU-side init is a GPU option
    out = {}
    for cpu_init in choices:
        _setup_layout()
        _sync(device)
        t0 = time.perf_counter()
        model = DChagViT(dataclasses.replace(cfg, use_cpu_initialization=cpu_init)).to(device)
        _sync(device)
        out["use_cpu_initialization" if cpu_init else "no_use_cpu_initialization"] = time.perf_counter() - t0
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


# ------------------------------------------------------------------------------------------------
# 3. training
# ------------------------------------------------------------------------------------------------


def _synthetic_batches(cfg, micro_batch: int, device: torch.device, seed: int = 0, distinct: int = 4):
    """A few fixed low-rank 'spectral' images (k endmembers x smooth abundances), made on the
    device so the input pipeline costs nothing; repeated, so the MAE loss can fall quickly."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    C, H, W, k = cfg.num_channels, cfg.img_h, cfg.img_w, 4
    spectra = torch.randn(k, C, generator=g).cumsum(-1) / math.sqrt(C)  # smooth along channels
    batches = []
    for i in range(distinct):
        coarse = torch.rand(micro_batch, k, 4, 4, generator=g)
        abund = torch.nn.functional.interpolate(coarse, size=(H, W), mode="bilinear", align_corners=False)
        images = torch.einsum("bkhw,kc->bchw", abund.to(device), spectra.to(device))
        images = (images - images.mean()) / images.std()
        batches.append({"images": images, "valid": torch.ones_like(images, dtype=torch.bool),
                        "index": torch.arange(i * micro_batch, (i + 1) * micro_batch)})
    return batches


def _argv(method: str, size: dict, iters: int, smoke: bool) -> list[str]:
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return ["--deepspeed", "--deepspeed_config", os.path.join(repo, "ds_configs", "zero1_bf16.json"),
            "--task", "mae", "--data-path", "synthetic", "--num-channels", str(size["num_channels"]),
            "--img-h", str(size["img"]), "--img-w", str(size["img"]), "--patch-dim", str(size["patch"]),
            "--num-layers", str(size["layers"]), "--hidden-size", str(size["hidden"]),
            "--num-attention-heads", str(size["heads"]), "--dchag-aggregation", method,
            "--dchag-groups", str(size["groups"]), "--micro-batch-size", str(size["micro_batch"]),
            "--global-batch-size", str(size["micro_batch"]), "--train-iters", str(iters), "--lr", "3e-4",
            "--min-lr", "3e-4", "--lr-warmup-iters", "3", "--lr-decay-style", "constant", "--bf16",
            "--attention-backend", "sdpa", "--log-interval", str(iters), "--weight-decay", "0.0"]


def train_method(method: str, size: dict, smoke: bool) -> dict:
    import pretrain_dchag
    from dchag.arguments import parse_args
    from dchag.model.config import default_channel_chunk
    from dchag.planner import LayoutSpec, ModelSpec
    from dchag.planner.flops import step_flops
    from dchag.planner.memory import estimate_memory
    from dchag.training import release, run
    from dchag.training.logging_utils import comm_device
    args = parse_args(_argv(method, size, size["iters"], smoke))
    device = comm_device()
    marks: list[tuple[float, float]] = []  # (time, peak memory so far) at each step's start

    def forward_step(model, batch, a, cfg, iteration):
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else float("nan")
        marks.append((time.perf_counter(), peak))
        return pretrain_dchag.forward_step(model, batch, a, cfg, iteration)

    def datasets_provider(a, cfg, dp_rank, dp_size, consumed):
        batches = _synthetic_batches(cfg, a.micro_batch_size, device)

        def forever():
            i = 0
            while True:
                yield batches[i % len(batches)]
                i += 1

        return forever(), (lambda: [])

    history = run(args, pretrain_dchag.model_provider, forward_step, datasets_provider)
    _sync(device)
    end = time.perf_counter()
    losses = [history["losses"][i] for i in sorted(history["losses"])]
    release(history)
    times = [b[0] - a[0] for a, b in zip(marks, marks[1:])] + [end - marks[-1][0]]
    warm = times[3:] if len(times) > 5 else times[1:]
    step_s = statistics.median(warm)
    spec = ModelSpec(num_layers=size["layers"], hidden_size=size["hidden"], num_attention_heads=size["heads"],
                     num_channels=size["num_channels"], img_h=size["img"], img_w=size["img"],
                     patch_dim=size["patch"], aggregation=method, groups=size["groups"],
                     channel_chunk=default_channel_chunk(method))  # what the run trains with (sdpa, streamed L)
    layout = LayoutSpec(precision="bf16", zero_stage=1, micro_batch_size=size["micro_batch"])
    flops = step_flops(spec, layout)
    predicted = estimate_memory(spec, layout)
    first, last = statistics.fmean(losses[:5]), statistics.fmean(losses[-5:])
    return {
        "aggregation": method, "steps": len(losses), "losses": losses,
        "step_time_s_median": step_s, "step_times_s": times,
        "model_tflops_per_gpu": flops / step_s / 1e12, "step_flops": flops,
        "max_memory_allocated_gib": max(m[1] for m in marks) / 2**30 if device.type == "cuda" else None,
        "planner_total_gib": predicted.total / 2**30, "planner_peak_phase": predicted.peak_phase,
        "params": predicted.param_numel,
        "loss_first5": first, "loss_last5": last, "loss_falls": bool(last < first),
    }


# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------


def markdown(report: dict) -> str:
    lines = [f"# GPU check ({report['device']})", "", f"Command: `{report['command']}`", "",
             f"torch {report['torch']}, {report['mode']} size: {json.dumps(report['size'])}", "",
             "## SDPA kernels", "", "| problem | shape [N, heads, q, kv, hd] | default | flash | efficient | cuDNN | math |",
             "|---|---|---|---|---|---|---|"]
    for name, e in report["kernels"].items():
        runs = [e["runs"].get(k, "n/a") for k in ("flash", "efficient", "cudnn", "math")]
        runs = ["ok" if r == "ok" else "no" for r in runs]
        lines.append(f"| {name} | {e['shape [N, heads, q_len, kv_len, head_dim]']} | {e['default']} | "
                     + " | ".join(runs) + " |")
    lines += ["", "## Start-up (build the model and move it to the device, T = 1)", ""]
    for k, v in report["startup_s"].items():
        lines.append(f"- `--{k.replace('_', '-')}`: {v:.1f} s")
    lines += ["", "## bf16 MAE training (ZeRO-1, --attention-backend sdpa, T = P = 1)", "",
              "| method | params | step (ms, median) | model TFLOPS/GPU | max_memory_allocated (GiB) | planner (GiB) | "
              "loss first 5 -> last 5 | falls |", "|---|---|---|---|---|---|---|---|"]
    for r in report["training"]:
        mem = "n/a" if r["max_memory_allocated_gib"] is None else f"{r['max_memory_allocated_gib']:.1f}"
        lines.append(f"| {r['method']} | {r['params'] / 1e9:.3f} B | {1000 * r['step_time_s_median']:.1f} | "
                     f"{r['model_tflops_per_gpu']:.1f} | {mem} | {r['planner_total_gib']:.1f} | "
                     f"{r['loss_first5']:.4f} -> {r['loss_last5']:.4f} | {'yes' if r['loss_falls'] else 'NO'} |")
    lines += ["", "The planner's memory model describes the unfused attention (score matrices saved for backward); "
              "the sdpa kernels save less, so max_memory_allocated may fall below it by about those scores."]
    return "\n".join(lines) + "\n"


def run_check(output_dir: str, smoke: bool, command: str, methods=METHODS) -> dict:
    from dchag.device import run_device
    from dchag.model.config import DChagConfig
    size = dict(SMOKE if smoke else FULL)
    device = run_device()
    if device.type != "cuda" and not smoke:
        raise SystemExit("gpu_check: no GPU for this run (torch sees none, or DS_ACCELERATOR=cpu); "
                         "use --smoke for the tiny CPU run.")
    os.makedirs(output_dir, exist_ok=True)
    dtype = torch.bfloat16
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "hip": getattr(torch.version, "hip", None),
              "cuda": torch.version.cuda, "mode": "smoke" if smoke else "full", "size": size, "command": command}
    t0 = time.perf_counter()
    report["kernels"] = sdpa_kernels(attention_shapes(size), device, dtype)
    from dchag.training.initialize import init_distributed
    init_distributed()
    cfg = DChagConfig(num_channels=size["num_channels"], img_h=size["img"], img_w=size["img"],
                      patch_dim=size["patch"], hidden_size=size["hidden"], num_layers=size["layers"],
                      num_attention_heads=size["heads"], aggregation="flat", bf16=True)
    report["startup_s"] = measure_startup(cfg, device)
    report["training"] = []
    for label, method in methods:
        r = train_method(method, size, smoke)
        r["method"] = label
        report["training"].append(r)
    report["wall_s"] = time.perf_counter() - t0
    with open(os.path.join(output_dir, "gpu_check.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(output_dir, "gpu_check.md"), "w") as f:
        f.write(markdown(report))
    return report
