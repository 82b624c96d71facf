"""``tools/estimate_memory.py``: estimate layouts, or recommend one for a GPU count and memory budget.

Examples:

    # one layout, with its breakdown
    tools/estimate_memory.py --num-layers 32 --hidden-size 8192 --num-attention-heads 64 \\
        --img-h 256 --img-w 256 --patch-dim 16 --num-channels 512 --dchag-aggregation linear \\
        --dchag-groups 64 --tensor-model-parallel-size 64 --data-parallel-size 16 --zero-stage 1 --bf16

    # TP alone vs D-CHAG side by side for several T (comma lists; P = T for D-CHAG by default)
    tools/estimate_memory.py ... --dchag-aggregation flat,linear,cross --tensor-model-parallel-size 8,16,32,64

    # the best layout that fits 1024 GPUs of 64 GB
    tools/estimate_memory.py ... --recommend --num-gpus 1024 --gpu-memory-gb 64

    # a blend of a 13-, a 450- and a 3,072-band source (channels all distinct)
    tools/estimate_memory.py ... --source-channels 13,450,3072 --dchag-groups 64 --tensor-model-parallel-size 8
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from dchag.model.config import default_channel_chunk
from dchag.planner.plan import GB, Hardware, make_plan
from dchag.planner.recommend import recommend
from dchag.planner.spec import LayoutSpec, ModelSpec, PlanError
from dchag.planner.table import detail, layouts_table


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="D-CHAG memory / communication / FLOPs planner.",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    g = p.add_argument_group("model")
    g.add_argument("--num-layers", type=int, required=True)
    g.add_argument("--hidden-size", type=int, required=True)
    g.add_argument("--num-attention-heads", type=int, required=True)
    g.add_argument("--ffn-hidden-size", type=int, default=None, help="default 4 x hidden")
    g.add_argument("--img-h", type=int, required=True)
    g.add_argument("--img-w", type=int, required=True)
    g.add_argument("--patch-dim", type=int, required=True)
    g.add_argument("--num-channels", type=int, default=None, help="C (required unless --source-channels gives it)")
    g.add_argument("--source-channels", type=_ints, default=None, metavar="C1,C2,...",
                   help="a blend of data sources (--data-path W1 P1 W2 P2 ...) with these channel counts, all channels "
                        "distinct: activations follow the largest source, per-channel weights the union (their sum)")
    g.add_argument("--dchag-aggregation", default="linear", help="flat, linear, cross, or a comma list")
    g.add_argument("--dchag-groups", type=_ints, default=None, help="G (comma list allowed); default 8 "
                   "(with --recommend: searched over P, 2P, 4P, 8P)")
    g.add_argument("--dchag-tree-levels", type=int, default=1)
    g.add_argument("--dchag-channel-chunk", type=int, default=None,
                   help="K: the streamed channel stage (linear/cross; flat ignores it); 0 = off; default: "
                        "as pretrain_dchag.py (64 for linear, 0 for cross)")
    g.add_argument("--task", choices=("mae", "forecast"), default="mae")
    g.add_argument("--attention-backend", choices=("auto", "sdpa", "unfused"), default="auto",
                   help="as pretrain_dchag.py: sdpa (= auto, the default) saves no score matrix; unfused "
                        "(megatron's explicit softmax) saves the probabilities of every layer")
    l = p.add_argument_group("layout")
    l.add_argument("--tensor-model-parallel-size", type=_ints, default=[1], help="T (comma list allowed)")
    l.add_argument("--channel-parallel-size", default="T", help="P: a number, or T (D-CHAG default; flat uses 1)")
    l.add_argument("--data-parallel-size", type=int, default=1)
    l.add_argument("--zero-stage", type=int, default=0)
    l.add_argument("--bf16", action="store_true", help="bf16 mixed precision (default fp32)")
    l.add_argument("--recompute-activations", action="store_true")
    l.add_argument("--sequence-parallel", action="store_true")
    l.add_argument("--micro-batch-size", type=int, default=1)
    h = p.add_argument_group("hardware and recommendation")
    h.add_argument("--recommend", action="store_true", help="search layouts for --num-gpus and --gpu-memory-gb")
    h.add_argument("--num-gpus", type=int, default=None,
                   help="with --recommend: GPUs to lay out; otherwise sets DP = GPUs / T for each T listed")
    h.add_argument("--gpu-memory-gb", type=float, default=Hardware.memory_gb)
    h.add_argument("--reserve-gb", type=float, default=Hardware.reserve_gb)
    h.add_argument("--peak-tflops", type=float, default=Hardware.peak_tflops)
    h.add_argument("--efficiency", type=float, default=Hardware.efficiency)
    h.add_argument("--gpus-per-node", type=int, default=Hardware.gpus_per_node)
    h.add_argument("--intra-node-gbs", type=float, default=Hardware.intra_node_gbs)
    h.add_argument("--inter-node-gbs", type=float, default=Hardware.inter_node_gbs)
    h.add_argument("--overlap-grad-reduce", action="store_true",
                   help="throughput model: hide data-parallel gradient traffic behind the backward pass")
    h.add_argument("--max-tp", type=int, default=64)
    h.add_argument("--paper-layout", action="store_true", help="with --recommend: D-CHAG with P = T only")
    h.add_argument("--top", type=int, default=10)
    h.add_argument("--simulate", action="store_true",
                   help="with --recommend: check the recommended layout by running its rank 0 with the real model on "
                        "fake tensors (tools/simulate_scale.py; minutes for a 26B model); if the simulated peak "
                        "exceeds the budget, the next layouts are checked (up to --simulate-tries)")
    h.add_argument("--simulate-tries", type=int, default=3)
    o = p.add_argument_group("output")
    o.add_argument("--markdown", action="store_true")
    o.add_argument("--json", action="store_true")
    o.add_argument("--detail", action="store_true", help="breakdown of every layout (default: when only one)")
    return p


def _aggregations(text: str) -> list[str]:
    aggs = [a.strip() for a in text.split(",") if a.strip()]
    bad = [a for a in aggs if a not in ("flat", "linear", "cross")]
    if bad or not aggs:
        raise PlanError(f"--dchag-aggregation: unknown {bad or text!r}; choose from flat, linear, cross.")
    return aggs


def _plan_json(plan) -> dict:
    m = plan.memory
    return {"model": dataclasses.asdict(plan.model), "layout": dataclasses.asdict(plan.layout),
            "memory_bytes": {"params": m.params, "grads": m.grads, "optimizer": m.optimizer, "data": m.data,
                             "activations": m.activations, "peak_dynamic": m.peak_dynamic, "total": m.total,
                             "peak_phase": m.peak_phase},
            "fits": plan.fits, "param_numel_per_rank": m.param_numel,
            "collectives": [dict(dataclasses.asdict(c), sent_bytes=c.sent_bytes) for c in plan.colls],
            "flops_per_step": plan.flops, "step_time_s": plan.step_time_s, "samples_per_s": plan.samples_per_s}


def main(argv=None, check_recommendation=None) -> int:
    """``check_recommendation(rec, hw, tries) -> bool``: what ``--simulate`` runs. The planner lies
    below the simulation (which compares itself with the planner), so the caller hands it in:
    tools/estimate_memory.py passes ``dchag.sim.check.check_recommendation``."""
    args = build_parser().parse_args(argv)
    try:
        return _run(args, check_recommendation)
    except PlanError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run(args, check_recommendation=None) -> int:
    hw = Hardware(memory_gb=args.gpu_memory_gb, peak_tflops=args.peak_tflops, efficiency=args.efficiency,
                  gpus_per_node=args.gpus_per_node, intra_node_gbs=args.intra_node_gbs,
                  inter_node_gbs=args.inter_node_gbs, reserve_gb=args.reserve_gb,
                  overlap_dp=args.overlap_grad_reduce)
    aggs = _aggregations(args.dchag_aggregation)
    groups = args.dchag_groups or None
    if args.num_channels is None and not args.source_channels:
        raise PlanError("--num-channels is required (or --source-channels for a blend of sources).")
    sources = tuple(args.source_channels) if args.source_channels else None
    base = ModelSpec(num_layers=args.num_layers, hidden_size=args.hidden_size,
                     num_attention_heads=args.num_attention_heads,
                     num_channels=args.num_channels or sum(sources), source_channels=sources,
                     img_h=args.img_h, img_w=args.img_w, patch_dim=args.patch_dim,
                     ffn_hidden_size=args.ffn_hidden_size, aggregation="flat", groups=(groups or [8])[0],
                     tree_levels=1, task=args.task, attention_backend=args.attention_backend)
    precision = "bf16" if args.bf16 else "fp32"
    if args.recommend:
        if not args.num_gpus:
            raise PlanError("--recommend needs --num-gpus (and --gpu-memory-gb, default 64).")
        rec = recommend(base, args.num_gpus, hw, aggregations=tuple(aggs), groups=tuple(groups) if groups else None,
                        max_tp=args.max_tp, precision=precision, micro_batch_size=args.micro_batch_size,
                        sequence_parallel=args.sequence_parallel,
                        channel_parallel="T" if args.paper_layout else "any", tree_levels=args.dchag_tree_levels,
                        channel_chunk=args.dchag_channel_chunk)
        if args.json:
            print(json.dumps({"best": _plan_json(rec.best) if rec.best else None,
                              "best_tp_alone": _plan_json(rec.best_tp_alone) if rec.best_tp_alone else None,
                              "fitting": len(rec.fitting), "rejected": rec.rejected}, indent=1))
            return 0 if rec.best else 1
        print(f"{args.num_gpus} GPUs x {hw.memory_gb:g} GB ({hw.usable_bytes / GB:g} GB usable), "
              f"{precision}, micro batch {args.micro_batch_size}: {len(rec.fitting)} layouts fit, "
              f"{rec.rejected} do not.\n")
        if not rec.best:
            s = rec.smallest
            print("No layout fits. The smallest needs "
                  f"{s.memory.total / GB:.1f} GB per GPU:\n\n{detail(s, args.markdown)}" if s else "No valid layout.")
            return 1
        print(layouts_table(rec.fitting[:args.top], args.markdown))
        print(f"\nRecommended:\n\n{detail(rec.best, args.markdown)}")
        if args.simulate:
            if check_recommendation is None:
                raise PlanError("--simulate runs the scale simulation: use tools/estimate_memory.py --simulate.")
            if not check_recommendation(rec, hw, args.simulate_tries):
                return 1
        if not groups and rec.best.model.aggregation != "flat":
            print("\nG was searched over P, 2P, 4P, 8P; it changes the model (accuracy is outside this estimate): "
                  "fix it with --dchag-groups once validated.")
        if rec.best_tp_alone is not None and rec.best_tp_alone is not rec.best:
            b, t = rec.best, rec.best_tp_alone
            print(f"\nBest TP-alone layout for comparison: T={t.layout.tensor_parallel} DP={t.layout.data_parallel} "
                  f"ZeRO-{t.layout.zero_stage}{' recompute' if t.layout.recompute else ''}: "
                  f"{t.samples_per_s:.1f} samples/s, {t.memory.total / GB:.1f} GB "
                  f"(recommended: {b.samples_per_s / t.samples_per_s:.2f}x the throughput).")
        elif rec.best_tp_alone is None and "flat" in aggs:
            print("\nNo TP-alone (flat) layout fits this budget.")
        return 0

    plans = []
    for agg in aggs:
        for T in args.tensor_model_parallel_size:
            DP = args.data_parallel_size
            if args.num_gpus:  # listing mode: DP = GPUs / T
                if args.num_gpus % T:
                    raise PlanError(f"--num-gpus {args.num_gpus} is not divisible by T={T}: world = T x DP.")
                DP = args.num_gpus // T
            if agg == "flat":
                P = 1
            elif args.channel_parallel_size.upper() == "T":
                P = T
            else:
                try:
                    P = int(args.channel_parallel_size)
                except ValueError:
                    raise PlanError(f"--channel-parallel-size must be a number or T, got {args.channel_parallel_size!r}.")
            for G in ([None] if agg == "flat" else (groups or [8])):
                model = base.with_(aggregation=agg, groups=G or base.groups,
                                   tree_levels=1 if agg == "flat" else args.dchag_tree_levels,
                                   channel_chunk=0 if agg == "flat" else default_channel_chunk(agg, args.dchag_channel_chunk))
                layout = LayoutSpec(T, P, DP, args.zero_stage, precision,
                                    args.recompute_activations, args.sequence_parallel, args.micro_batch_size)
                plans.append(make_plan(model, layout, hw))
    if args.json:
        print(json.dumps([_plan_json(p) for p in plans], indent=1))
        return 0
    print(layouts_table(plans, args.markdown))
    if args.detail or len(plans) == 1:
        for p in plans:
            print("\n" + detail(p, args.markdown))
    return 0
