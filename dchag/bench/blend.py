"""A blended run against each of its sources trained alone, side by side (docs/BENCHMARKS.md,
section 11): per-rank peak memory and time per iteration, measured in the real training loop.

Each source alone, then the blend, with the same model and flags, one after the other, each in a
fresh spawn of ``world`` gloo ranks (a process's peak memory never comes down: a run after
another in the same process would carry the first one's high-water mark). Per
iteration the loop's own figures are kept (``--log-interval 1``): the time of the iteration and
the peak memory (VmHWM, reset every iteration; the largest over the ranks, as the log line says);
in the blend each iteration is attributed to the source it read (``BlendSchedule``). The first
``warmup`` iterations of every source (alone, and in the blend) are left out.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dchag.bench.measure import measurement_environment
from dchag.bench.runner import _free_port


def _train(argv: list[str]) -> dict:
    import pretrain_dchag
    from dchag.training import pretrain, release
    history = pretrain(pretrain_dchag.model_provider, pretrain_dchag.forward_step, pretrain_dchag.datasets_provider,
                       argv)
    out = {k: {int(i): float(v) for i, v in history[k].items()} for k in ("losses", "iteration_ms", "peak_memory_mb")}
    out["summary"] = history["summary"]
    release(history)
    return out


def _entry(rank: int, world: int, port: int, out_dir: str, name: str, argv: list[str]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    import warnings
    warnings.filterwarnings("ignore")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = _train(argv)
        if rank == 0:
            with open(os.path.join(out_dir, "result.json"), "w") as f:
                json.dump(result, f)
            print(f"[blend-bench] {name}: done", flush=True)
    finally:
        dist.destroy_process_group()


def measure(sources: list[tuple[float, str]], flags: list[str], iters_alone: int, iters_blend: int,
            world: int = 2, warmup: int = 1) -> dict:
    """Run each source alone (``iters_alone`` iterations) and the blend (``iters_blend``) on ``world``
    ranks; returns {"rows": per source {name, alone, blend}, "blend": whole run, "runs": raw}."""
    from dchag.data.blend import unique_names
    names = unique_names([p for _, p in sources])
    runs = {f"alone {n}": [*flags, "--data-path", p, "--train-iters", str(iters_alone)]
            for n, (_, p) in zip(names, sources)}
    runs["blend"] = [*flags, "--data-path", *[t for w, p in sources for t in (f"{w:g}", p)],
                     "--train-iters", str(iters_blend)]
    raw = {}
    with measurement_environment():
        for name, argv in runs.items():
            with tempfile.TemporaryDirectory() as out_dir:
                mp.spawn(_entry, args=(world, _free_port(), out_dir, name, argv), nprocs=world, join=True)
                with open(os.path.join(out_dir, "result.json")) as f:
                    raw[name] = json.load(f)
    raw = {name: {k: ({int(i): v for i, v in d.items()} if isinstance(d, dict) else d) for k, d in r.items()}
           for name, r in raw.items()}
    return {**summarize(raw, sources, warmup), "world": world, "flags": flags, "iters_alone": iters_alone,
            "iters_blend": iters_blend, "warmup": warmup, "runs": raw}


def summarize(raw: dict, sources: list[tuple[float, str]], warmup: int = 1) -> dict:
    """Per source its figures alone and over its iterations in the blend (each blended iteration
    attributed to the source it read), the first ``warmup`` iterations of each left out."""
    from dchag.data.blend import BlendSchedule, unique_names
    names = unique_names([p for _, p in sources])
    schedule = BlendSchedule([w for w, _ in sources])
    steps_of = {s: [] for s in range(len(sources))}
    for it in sorted(raw["blend"]["iteration_ms"]):
        steps_of[schedule.source_at(it - 1)].append(it)
    rows = []
    for s, name in enumerate(names):
        alone = raw[f"alone {name}"]
        rows.append({"name": name, "path": sources[s][1], "weight": sources[s][0],
                     "alone": _figures(alone, sorted(alone["iteration_ms"])[warmup:]),
                     "blend": _figures(raw["blend"], steps_of[s][warmup:])})
    blend_all = [it for s in steps_of for it in steps_of[s][warmup:]]
    return {"rows": rows, "blend": _figures(raw["blend"], sorted(blend_all))}


def _figures(run: dict, iterations: list[int]) -> dict:
    ms = [run["iteration_ms"][i] for i in iterations]
    mem = [run["peak_memory_mb"][i] for i in iterations]
    return {"iterations": len(iterations), "ms_median": statistics.median(ms) if ms else float("nan"),
            "ms_min": min(ms) if ms else float("nan"), "peak_mb": max(mem) if mem else float("nan")}


def report_markdown(result: dict, command: str) -> str:
    lines = ["| source | weight | alone: ms / iteration (median) | in the blend: ms / its iteration | ratio | "
             "alone: peak MB per rank | in the blend: peak MB per rank | ratio |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        a, b = r["alone"], r["blend"]
        lines.append(f"| {r['name']} | {r['weight']:.3g} | {a['ms_median']:.0f} | {b['ms_median']:.0f} | "
                     f"{b['ms_median'] / a['ms_median']:.2f} | {a['peak_mb']:.0f} | {b['peak_mb']:.0f} | "
                     f"{b['peak_mb'] / a['peak_mb']:.2f} |")
    largest = max(r["alone"]["peak_mb"] for r in result["rows"])
    lines += ["", f"The blended run's peak per rank over all its iterations: {result['blend']['peak_mb']:.0f} MB "
              f"(the largest source alone: {largest:.0f} MB, ratio {result['blend']['peak_mb'] / largest:.2f}).",
              "", "Command:", "", f"    {command}"]
    return "\n".join(lines) + "\n"
