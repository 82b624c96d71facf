"""Does D-CHAG train as well as the flat baseline? Train every method on the same data, seeds,
steps and LR schedule, and report the paired gap of each to flat with a 95 % interval.

Launch it like pretrain_dchag.py, with pretrain_dchag.py's model, data and training flags plus:

    --methods flat,linear,cross     flat first; variants as NAME:g=G:k=K (e.g. cross:k=2, linear:g=32)
    --seeds N                       seeds --seed .. --seed + N - 1 (paired across methods)
    --output-dir DIR                parity.json, parity.md, parity.png, the task's picture
                                    (reconstructions.png, forecast_maps.png or dense_maps.png),
                                    and one training log per run in DIR/logs
    --merge DIR [DIR ...]           no training: report studies run apart (split by method, e.g.
                                    flat,linear and cross, or by --seed) as one, in --output-dir;
                                    with --methods, only those methods; with --common-seeds, only the
                                    seeds every method has

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 .venv/bin/python -m torch.distributed.run --nproc_per_node 2 \\
        tools/parity.py --methods flat,linear,cross --seeds 4 --output-dir runs/parity \\
        --deepspeed --deepspeed_config ds_configs/zero1_fp32.json --task mae \\
        --data-path synthetic:num_images=600 --num-channels 64 --img-h 16 --img-w 16 --patch-dim 4 \\
        --num-layers 2 --hidden-size 64 --num-attention-heads 4 --dchag-groups 8 \\
        --tensor-model-parallel-size 2 --channel-parallel-size 2 --micro-batch-size 8 --global-batch-size 16 \\
        --train-iters 300 --lr 2e-3 --lr-warmup-iters 20 --eval-interval 30

D-CHAG runs at the given --dchag-groups and --channel-parallel-size; flat runs with P = 1. Every
held-out sample is scored at each evaluation unless --eval-iters is given. No checkpoints are kept.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # pretrain_dchag, dchag


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False, add_help=False)
    p.add_argument("--methods", default=None, help="comma list, flat first (default: flat,linear,cross); "
                   "without flat, a part for --merge; with --merge, the methods to report")
    p.add_argument("--seeds", type=int, default=3, help="seeds per method (default: %(default)s)")
    p.add_argument("--output-dir", default="runs/parity", help="where the report goes (default: %(default)s)")
    p.add_argument("--merge", nargs="+", metavar="DIR", help="report finished studies (their --output-dir) as one, "
                   "split by method or by seed; trains nothing")
    p.add_argument("--common-seeds", action="store_true", help="with --merge: report only the seeds every method "
                   "has (a variant run on fewer seeds than flat, paired with flat on those)")
    p.add_argument("-h", "--help", action="store_true")
    ours, rest = p.parse_known_args(argv)
    if ours.help:
        p.print_help()
        print("\npretrain_dchag.py's flags:\n")
        from dchag.arguments import build_parser
        build_parser().print_help()
        return 0

    if ours.merge:
        return merge(ours.merge, ours.output_dir, ours.methods, ours.common_seeds)
    if ours.common_seeds:
        print("error: --common-seeds applies to --merge only.", file=sys.stderr, flush=True)
        return 1

    import torch.distributed as dist

    import pretrain_dchag
    from dchag.parallel.partition import LayoutError
    from dchag.parity.methods import parse_methods
    from dchag.parity.report import write_report
    from dchag.parity.study import run_study
    from dchag.training.loop import USER_ERRORS
    try:
        if ours.seeds < 1:
            raise LayoutError(f"--seeds must be >= 1, got {ours.seeds}.")
        methods = parse_methods(ours.methods or "flat,linear,cross")
        results = run_study(rest, methods, ours.seeds, ours.output_dir, model_provider=pretrain_dchag.model_provider,
                            forward_step=pretrain_dchag.forward_step, datasets_provider=pretrain_dchag.datasets_provider,
                            eval_metrics_func=pretrain_dchag.task_metrics,
                            loss_weight_func=pretrain_dchag.loss_weight)
    except USER_ERRORS as e:
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    if results is not None:
        for path in write_report(results, ours.output_dir):
            print(f"> wrote {path}", flush=True)
        _print_verdicts(results)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


def merge(directories: list[str], output_dir: str, methods: str | None = None, common_seeds: bool = False) -> int:
    from dchag.parallel.partition import LayoutError
    from dchag.parity.merge import merge_studies
    from dchag.parity.methods import parse_methods
    from dchag.parity.report import write_report
    try:
        if any(os.path.realpath(d) == os.path.realpath(output_dir) for d in directories):
            raise LayoutError(f"--output-dir {output_dir} is one of the --merge directories: its report would be "
                              "overwritten; choose a new directory.")
        keep = None if methods is None else [m.spec for m in parse_methods(methods)]
        results = merge_studies(directories, keep, common_seeds)
    except LayoutError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    for path in write_report(results, output_dir):
        print(f"> wrote {path}", flush=True)
    _print_verdicts(results)
    return 0


def _print_verdicts(results: dict) -> None:
    """The report's plain verdict against the baselines, on the log too."""
    from dchag.parity.report import baseline_verdicts
    for line in baseline_verdicts(results):
        print(f"[parity] {line}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
