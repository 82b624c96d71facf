"""Spawn T gloo ranks per tensor-parallel size, run the sweep, reduce the per-rank results.

One process group per T (world size T, DP = 1) runs every (C, method) case of that T in turn,
so process start-up is paid three times, not once per case, and all methods of one (T, C) run
back to back in the same processes (their timings see the same machine load).
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dchag.bench.config import METHODS, BenchConfig
from dchag.bench.measure import measurement_environment


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, out_dir: str, cfg_dict: dict, progress: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    import warnings
    warnings.filterwarnings("ignore")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from dchag.bench.worker import run_rank
        results = run_rank(world, BenchConfig.from_dict(cfg_dict), progress=progress)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
    finally:
        dist.destroy_process_group()


def run_tp_size(T: int, cfg: BenchConfig, progress: bool = True) -> list[list[dict]]:
    """Spawn T ranks; returns, per case, the list of per-rank results."""
    with measurement_environment(), tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_entry, args=(T, _free_port(), out_dir, cfg.to_dict(), progress), nprocs=T, join=True)
        per_rank = []
        for r in range(T):
            with open(os.path.join(out_dir, f"rank{r}.json")) as f:
                per_rank.append(json.load(f))
    return [list(case) for case in zip(*per_rank)]


def _median(xs):
    return statistics.median(xs) if xs else float("nan")


def reduce_phase(ranks: list[dict], key: str) -> dict:
    """One measured part (``channel`` or ``step``) of one case, reduced over steps and ranks.

    time: per round, the median over steps of the slowest rank's time; reported: the smallest of
    the rounds' medians (the round least disturbed by other load). Memory: the largest rank's median
    (of the last round; memory does not depend on load).
    Memory fields (bytes): ``peak`` (VmHWM, absolute), ``above_lib`` (peak minus the RSS before the
    model was built: parameters + gradients + optimizer state + activations, what a GPU's
    max-allocated would show), ``above_step`` (peak minus the RSS right before the step:
    activations + gradients + transients), ``before_step`` (RSS before the step minus ``rss_lib``:
    parameters and optimizer state).
    """
    parts = [r[key] for r in ranks]
    rounds = [[max(p["round_times_s"][k][i] for p in parts) for i in range(len(parts[0]["round_times_s"][k]))]
              for k in range(len(parts[0]["round_times_s"]))]
    medians = [_median(t) for t in rounds]
    best = min(range(len(rounds)), key=lambda k: medians[k])
    times = rounds[best]
    per_rank = []
    for r, p in zip(ranks, parts):
        per_rank.append({
            "peak": _median(p["peak"]),
            "above_lib": _median([x - r["rss_lib"] for x in p["peak"]]),
            "above_step": _median([x - b for x, b in zip(p["peak"], p["rss_before"])]),
            "before_step": _median([b - r["rss_lib"] for b in p["rss_before"]]),
        })
    out = {
        "time_s": medians[best],  # the least disturbed round's median
        "times_s": times,
        "round_medians_s": medians,
        "memory": {k: max(m[k] for m in per_rank) for k in per_rank[0]},
        "memory_per_rank": per_rank,
        "saved_bytes": max(p["saved_bytes"] for p in parts),
        "comm": parts[0]["comm"],
        "comm_sent_max": {ph: max(p["comm"].get(ph, {}).get("sent_bytes", 0.0) for p in parts)
                          for ph in ("forward", "backward", "optimizer")},
        "records": parts[0]["records"],
    }
    return out


def reduce_case(ranks: list[dict]) -> dict:
    r0 = ranks[0]
    row = {
        "T": r0["T"], "P": r0["P"], "C": r0["C"], "method": r0["method"], "label": METHODS[r0["method"]].label,
        "param_numel": max(r["param_numel"] for r in ranks),
        "channel_stage_param_numel": max(r["channel_stage_param_numel"] for r in ranks),
        "rss_lib": max(r["rss_lib"] for r in ranks),
        "channel": reduce_phase(ranks, "channel"),
    }
    if "step" in r0:
        row["step"] = reduce_phase(ranks, "step")
        row["opt_state_bytes"] = max(r["opt_state_bytes"] for r in ranks)
    return row


def run_sweep(cfg: BenchConfig, progress: bool = True) -> list[dict]:
    cfg.validate()
    rows = []
    for T in cfg.tensor_parallel:
        for case in run_tp_size(T, cfg, progress):
            rows.append(reduce_case(case))
    return rows
