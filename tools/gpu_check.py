#!/usr/bin/env python
"""Check the GPU path on one GPU (sized for at most ~8 minutes on an H100/H200; not yet run on one) and write
gpu_check.json + gpu_check.md:

  1. which scaled_dot_product_attention kernel (flash / efficient / cuDNN / math) runs for the
     backbone's and the aggregations' attention shapes, and which of them can run alone;
  2. start-up time of building a ~1B-parameter model with and without --use-cpu-initialization;
  3. a bf16 MAE training (ZeRO-1, --attention-backend sdpa) of a ~1B-parameter ViT (20 layers,
     hidden 2048, 16 heads, 256x256 images, patch 16) with C = 512 channels, flat vs D-CHAG-L
     (T = P = 1, G = 8): median step time, model TFLOPS per GPU (FLOPs from dchag/planner),
     torch.cuda.max_memory_allocated beside the planner's prediction, and whether the loss falls.

    python tools/gpu_check.py --output-dir runs/gpu_check            # one GPU (CUDA or ROCm)
    DS_ACCELERATOR=cpu python tools/gpu_check.py --smoke --output-dir /tmp/gc   # tiny, any device

Logic in dchag/bench/gpu_check.py.
"""

import argparse
import os
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--output-dir", required=True, help="folder for gpu_check.json and gpu_check.md")
    p.add_argument("--smoke", action="store_true",
                   help="a tiny model and 8 steps on whatever device the run has (the CPU in the tests)")
    p.add_argument("--methods", default="flat,linear",
                   help="comma-separated subset of flat,linear (default both)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    labels = {"flat": "flat", "linear": "D-CHAG-L"}
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in labels]
    if bad or not methods:
        print(f"gpu_check: --methods takes flat and/or linear, got {args.methods!r}", file=sys.stderr)
        return 2
    if os.path.exists(os.path.join(args.output_dir, "gpu_check.json")):
        print(f"gpu_check: {args.output_dir}/gpu_check.json exists; choose another --output-dir "
              "(nothing is overwritten)", file=sys.stderr)
        return 2
    os.environ.setdefault("OMP_NUM_THREADS", "8")
    from dchag.bench.gpu_check import run_check
    command = "python tools/gpu_check.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    report = run_check(args.output_dir, args.smoke, command, [(labels[m], m) for m in methods])
    with open(os.path.join(args.output_dir, "gpu_check.md")) as f:
        print(f.read())
    from dchag.training import shutdown
    shutdown({})
    return 0 if all(r["loss_falls"] for r in report["training"]) else 1


if __name__ == "__main__":
    sys.exit(main())
