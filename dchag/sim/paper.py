"""The paper's configurations (SC25, arXiv 2506.21411), simulated and planned side by side.

    python -m dchag.sim.paper --out-dir docs/sim [--only NAME ...]   # simulate (cached per case)
    python -m dchag.sim.paper --out-dir docs/sim --markdown          # the table, planner recomputed

Model sizes as in docs/BENCHMARKS.md section 5: a 32-layer ViT with hidden 2,048 / 4,096 / 8,192
(16 / 32 / 64 heads, FFN 4x; backbones of 1.6 / 6.4 / 25.8 B parameters: the paper's 1.7B, 7B and
26B), 256x256 images, patch 16, MAE, bf16, ZeRO-1, micro batch 4, G = 64 for D-CHAG (P = T).
Each simulation's raw result is cached as ``<out-dir>/<name>.json``; the markdown recomputes the
planner's prediction with the current code.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

SIZES = {"1.7B": (2048, 16), "7B": (4096, 32), "26B": (8192, 64)}
# (size, C, T, world): the paper's runs; the world sizes of the 1.7B/7B memory runs are not stated
# here, DP = 8 is assumed (it only divides the optimizer state).
RUNS = [("1.7B", 512, 2, 16), ("1.7B", 1024, 8, 64), ("7B", 512, 16, 128), ("26B", 256, 32, 1024),
        ("26B", 512, 32, 1024)]
METHODS = {"TP alone": "flat", "D-CHAG-L": "linear", "D-CHAG-C": "cross"}
# The paper's measured memory per GPU (GB) where this repository quotes it (issue 14).
PAPER_GB = {("1.7B", 1024, 8, "TP alone"): 61.95, ("1.7B", 1024, 8, "D-CHAG-L"): 13.96}


def case_name(size, C, T, method) -> str:
    return f"{size}_C{C}_T{T}_{METHODS[method]}"


def flags(size, C, T, world, method) -> list[str]:
    D, H = SIZES[size]
    agg = METHODS[method]
    out = ["--world-size", str(world), "--num-layers", "32", "--hidden-size", str(D), "--num-attention-heads", str(H),
           "--img-h", "256", "--img-w", "256", "--patch-dim", "16", "--num-channels", str(C), "--bf16",
           "--zero-stage", "1", "--micro-batch-size", "4", "--tensor-model-parallel-size", str(T),
           "--dchag-aggregation", agg, "--attention-backend", "unfused"]  # the attention the planner models
    if agg != "flat":  # the paper's (unstreamed) channel stage
        out += ["--dchag-groups", "64", "--channel-parallel-size", str(T), "--dchag-channel-chunk", "0"]
    return out


def command(size, C, T, world, method) -> str:
    return "tools/simulate_scale.py " + " ".join(flags(size, C, T, world, method))


def _spec(argv):
    from dchag.sim.cli import build_parser, spec_from_args
    return spec_from_args(build_parser().parse_args(argv))


def run(out_dir: str, only=None) -> None:
    from dchag.sim.step import simulate
    os.makedirs(out_dir, exist_ok=True)
    for size, C, T, world in RUNS:
        for method in METHODS:
            name = case_name(size, C, T, method)
            path = os.path.join(out_dir, name + ".json")
            if (only and name not in only) or (not only and os.path.exists(path)):
                continue
            argv = flags(size, C, T, world, method)
            sim = simulate(_spec(argv))
            with open(path + ".tmp", "w") as f:
                json.dump({"argv": argv, "sim": sim}, f)
            os.replace(path + ".tmp", path)
            print(f"{name}: simulated peak {sim['peak_bytes'] / 1e9:.2f} GB at {sim['peak_where']} "
                  f"({sim['seconds']:.0f} s)", flush=True)


def markdown(out_dir: str) -> str:
    from dchag.sim.report import compare
    rows = ["| model | C | T | world | method | params/rank (B) | simulated peak GB | planner peak GB | planner vs sim "
            "| paper GB | simulated peak at | wall s |", "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---|---:|"]
    for size, C, T, world in RUNS:
        for method in METHODS:
            path = os.path.join(out_dir, case_name(size, C, T, method) + ".json")
            if not os.path.exists(path):
                continue
            with open(path) as f:
                saved = json.load(f)
            rec = compare(_spec(saved["argv"]), saved["sim"])
            s, p = rec["simulated_peak_gb"], rec["planner_peak_gb"]
            paper = PAPER_GB.get((size, C, T, method))
            rows.append(f"| {size} | {C} | {T} | {world} | {method} | {rec['params_per_rank'] / 1e9:.3f} | {s:.2f} | "
                        f"{p:.2f} | {100 * (p - s) / s:+.1f} % | {paper if paper else '-'} | "
                        f"{rec['simulated_peak_where'].replace('DChagViT.', '')} | {rec['seconds']:.0f} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--only", nargs="*", default=None, help="case names to (re)simulate")
    ap.add_argument("--markdown", action="store_true", help="print the table from the cached results")
    args = ap.parse_args(argv)
    if args.markdown:
        print(markdown(args.out_dir))
    else:
        run(args.out_dir, args.only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
