"""``tools/benchmark.py``: D-CHAG-L / D-CHAG-C / TP alone, side by side, in one invocation.

    .venv/bin/python tools/benchmark.py                      # the default sweep: T = P in {1, 2, 4}, C in {64, 256, 512}
    .venv/bin/python tools/benchmark.py --channels 128 --tp 2 --steps 3 --output-dir /tmp/b

Writes benchmark.json, benchmark.md and benchmark.png into --output-dir (default bench_results/).
"""

from __future__ import annotations

import argparse
import sys
import time

from dchag.bench.config import BenchConfig, BenchModel, parse_methods


def _ints(text: str) -> tuple[int, ...]:
    try:
        out = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}")
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return out


def build_parser() -> argparse.ArgumentParser:
    d, m = BenchConfig(), BenchModel()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--channels", type=_ints, default=d.channels, help="C values (comma list)")
    p.add_argument("--tp", "--tensor-model-parallel-size", dest="tp", type=_ints, default=d.tensor_parallel,
                   help="T values (comma list); D-CHAG runs with P = T, TP alone with P = 1; world size = T")
    p.add_argument("--methods", type=parse_methods, default=d.methods, help="tp, dchag-l, dchag-c, dchag-l-stream, dchag-c-stream (comma list)")
    p.add_argument("--num-layers", type=int, default=m.num_layers)
    p.add_argument("--hidden-size", type=int, default=m.hidden_size)
    p.add_argument("--num-attention-heads", type=int, default=m.num_attention_heads)
    p.add_argument("--ffn-hidden-size", type=int, default=m.ffn_hidden_size)
    p.add_argument("--img-h", type=int, default=m.img_h)
    p.add_argument("--img-w", type=int, default=m.img_w)
    p.add_argument("--patch-dim", type=int, default=m.patch_dim)
    p.add_argument("--dchag-groups", type=int, default=m.groups, help="G of D-CHAG")
    p.add_argument("--dchag-tree-levels", type=int, default=m.tree_levels)
    p.add_argument("--dchag-channel-chunk", type=int, default=m.channel_chunk,
                   help="K of the streamed methods (dchag-l-stream, dchag-c-stream)")
    p.add_argument("--micro-batch-size", type=int, default=m.micro_batch_size)
    p.add_argument("--sequence-parallel", action="store_true")
    p.add_argument("--recompute-activations", action="store_true")
    p.add_argument("--steps", type=int, default=d.steps, help="measured steps (median reported)")
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--rounds", type=int, default=d.rounds,
                   help="repeat every case this many times in alternating order; report the best round's median")
    p.add_argument("--channel-stage-only", action="store_true", help="skip the whole training step")
    p.add_argument("--output-dir", default="bench_results")
    p.add_argument("--quiet", action="store_true", help="no per-configuration progress lines")
    p.add_argument("--from-json", metavar="PATH", help="no run: rewrite the Markdown/PNG (and planner check) "
                   "from an earlier benchmark.json into --output-dir")
    return p


def config_from_args(args) -> BenchConfig:
    model = BenchModel(img_h=args.img_h, img_w=args.img_w, patch_dim=args.patch_dim, hidden_size=args.hidden_size,
                       num_layers=args.num_layers, num_attention_heads=args.num_attention_heads,
                       ffn_hidden_size=args.ffn_hidden_size, groups=args.dchag_groups,
                       tree_levels=args.dchag_tree_levels, channel_chunk=args.dchag_channel_chunk,
                       micro_batch_size=args.micro_batch_size,
                       sequence_parallel=args.sequence_parallel, recompute_activations=args.recompute_activations)
    return BenchConfig(model=model, channels=args.channels, tensor_parallel=args.tp, methods=args.methods,
                       warmup=args.warmup, steps=args.steps, rounds=args.rounds, whole_step=not args.channel_stage_only)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.from_json:
        return _from_json(args.from_json, args.output_dir)
    from dchag.parallel.partition import LayoutError
    cfg = config_from_args(args)
    try:
        cfg.validate()
    except (LayoutError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from dchag.bench.report import write_all
    from dchag.bench.runner import run_sweep
    n = sum(len(cfg.cases(T)) for T in cfg.tensor_parallel)
    print(f"[bench] {n} configurations: T in {list(cfg.tensor_parallel)}, C in {list(cfg.channels)}, "
          f"methods {list(cfg.methods)}; {cfg.rounds} round(s) of {cfg.warmup} warm-up + {cfg.steps} measured steps each", flush=True)
    t0 = time.perf_counter()
    rows = run_sweep(cfg, progress=not args.quiet)
    wall = time.perf_counter() - t0
    out = write_all(args.output_dir, cfg, rows, wall)
    print(f"[bench] done in {wall:.0f} s: " + ", ".join(out["paths"].values()))
    _summary(out)
    return 0


def _from_json(path: str, out_dir: str) -> int:
    import json
    from dchag.bench.report import write_all
    with open(path) as f:
        data = json.load(f)
    out = write_all(out_dir, BenchConfig.from_dict(data["config"]), data["rows"], data["wall_s"])
    print("[bench] rewritten: " + ", ".join(out["paths"].values()))
    _summary(out)
    return 0


def _summary(out: dict) -> None:
    for k, t in out["targets"].items():
        if isinstance(t, dict) and "measured" in t:
            print(f"[bench] target {k}: measured {t['measured']:.3f}, goal {t['target']}, met: {t['met']}")
    for name, cost in out["targets"].get("stream_time_cost", {}).items():
        print(f"[bench] {name} time over unstreamed: " + ", ".join(f"{part} {v:.2f}x" for part, v in cost.items()))
    w = out["planner_worst"]
    print("[bench] planner worst |error|: " + ", ".join(
        f"{k} {100 * v['abs_err']:.1f}%" for k, v in w.items() if isinstance(v, dict))
        + f"; collectives exact: {w['comm_exact']}; parameter counts exact: {w['param_numel_exact']}")
