"""A blended pretraining against each of its sources alone: per-rank peak memory and time per
iteration at T = P = 2, measured side by side in the real training loop (docs/BENCHMARKS.md,
section 11; logic in dchag/bench/blend.py).

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 nice -n 15 .venv/bin/python tools/blend_benchmark.py \\
        --output-dir docs/bench/blend

Default sources: synthetic 13 Sentinel-2-like bands, 450 bands and 3,072 bands over 400-2,500 nm,
blended 1/3 each. Writes OUT/blend_benchmark.json (every iteration's figures) and OUT/blend_benchmark.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # pretrain_dchag, dchag

WORLD = "wavelength_min=400,wavelength_max=2500,n=4,h=32,w=32"
SOURCES = [f"synthetic:c=13,bands=s2,scene_channels=211,{WORLD}", f"synthetic:c=450,{WORLD}",
           f"synthetic:c=3072,{WORLD}"]
FLAGS = ["--task", "mae", "--img-h", "32", "--img-w", "32", "--patch-dim", "4", "--num-layers", "2",
         "--hidden-size", "128", "--num-attention-heads", "4", "--dchag-aggregation", "linear", "--dchag-groups", "8",
         "--tensor-model-parallel-size", "2", "--channel-parallel-size", "2", "--micro-batch-size", "2",
         "--global-batch-size", "2", "--deepspeed", "--deepspeed_config", "ds_configs/zero1_fp32.json",
         "--log-interval", "1", "--seed", "1"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--output-dir", default="runs/blend_benchmark")
    p.add_argument("--data-path", nargs="+", default=None, metavar="[WEIGHT] PATH",
                   help="the blend (weights, then paths; default: the three synthetic sources, 1/3 each)")
    p.add_argument("--iters-alone", type=int, default=6, help="iterations of each source alone (default: %(default)s)")
    p.add_argument("--iters-blend", type=int, default=18, help="iterations of the blend (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=1, help="first iterations of each source left out (default: %(default)s)")
    p.add_argument("--world", type=int, default=2, help="ranks (T = P = 2 by the default flags; default: %(default)s)")
    p.add_argument("flags", nargs=argparse.REMAINDER, help="after --: pretrain_dchag.py flags replacing the defaults")
    ours = p.parse_args(argv)
    from dchag.bench.blend import measure, report_markdown
    from dchag.data.blend import parse_data_path
    from dchag.data.errors import DataError
    try:
        spec = parse_data_path(ours.data_path or [t for s in SOURCES for t in ("1", s)])
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    weights = spec.weights or [1 / len(spec.paths)] * len(spec.paths)
    flags = [f for f in ours.flags if f != "--"] or FLAGS
    result = measure(list(zip(weights, spec.paths)), flags, ours.iters_alone, ours.iters_blend, ours.world,
                     ours.warmup)
    os.makedirs(ours.output_dir, exist_ok=True)
    with open(os.path.join(ours.output_dir, "blend_benchmark.json"), "w") as f:
        json.dump(result, f, indent=1)
    command = "DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 .venv/bin/python tools/blend_benchmark.py " + \
        " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    md = report_markdown(result, command)
    with open(os.path.join(ours.output_dir, "blend_benchmark.md"), "w") as f:
        f.write(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
