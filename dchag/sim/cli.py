"""``tools/simulate_scale.py``: one rank of an N-rank training job, run with the real model on fake
tensors in one CPU process; per-rank memory and collectives beside the planner's prediction.

Takes ``pretrain_dchag.py``'s model, layout and training flags (``--deepspeed_config`` JSON
included: micro batch, bf16, ZeRO stage and bucket size are resolved as training resolves them)
plus ``--world-size N`` and ``--rank R``. Examples:

    # rank 0 of the 26B ViT, C = 512, D-CHAG-L, T = P = 32 on 1,024 GPUs, bf16, ZeRO-1
    tools/simulate_scale.py --world-size 1024 --num-layers 32 --hidden-size 8192 --num-attention-heads 64 \\
        --img-h 256 --img-w 256 --patch-dim 16 --num-channels 512 --dchag-aggregation linear --dchag-groups 64 \\
        --tensor-model-parallel-size 32 --channel-parallel-size 32 --bf16 --zero-stage 1 --micro-batch-size 4 \\
        --json sim.json

Nothing is allocated: parameters, activations and collectives exist as shapes only (torch's
FakeTensorMode and "fake" process-group backend). ZeRO 0-2 are emulated (dchag/sim/zero.py);
ZeRO-3 is not simulated (use tools/estimate_memory.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from dchag.parallel.partition import LayoutError


def build_parser() -> argparse.ArgumentParser:
    from dchag.arguments import build_parser as pretrain_parser
    p = pretrain_parser()
    p.description = "Simulate one rank of an N-rank D-CHAG training job (real model, fake tensors, one CPU process)."
    p.epilog = __doc__
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    for action in p._actions:  # a simulation runs one step: --train-iters is not needed
        if action.dest == "train_iters":
            action.required = False
            action.default = 1
    g = p.add_argument_group("simulation")
    g.add_argument("--world-size", type=int, required=True, help="N: ranks of the simulated job (= T x DP)")
    g.add_argument("--rank", type=int, default=0, help="R: the rank to simulate (default 0)")
    g.add_argument("--json", dest="json_out", default=None, metavar="OUT",
                   help="write the simulated and predicted figures to OUT (refuses to overwrite an existing file)")
    g.add_argument("--force", action="store_true", help="with --json: overwrite OUT if it exists")
    g.add_argument("--source-channels", default=None, metavar="C1,C2,...",
                   help="simulate a blend of data sources with these channel counts, all channels distinct (the model's "
                        "channels are their union; --num-channels is then their sum)")
    g.add_argument("--source", type=int, default=None,
                   help="with --source-channels: the source the step takes (default: the one with the most channels "
                        "on the rank)")
    return p


def _blend(args) -> None:
    """--source-channels: the model's sources, distinct channels in order (what the data side sets from a blend)."""
    try:
        counts = [int(c) for c in str(args.source_channels).split(",") if c.strip()]
    except ValueError:
        raise LayoutError(f"--source-channels takes channel counts separated by commas, got {args.source_channels!r}.")
    if not counts or min(counts) < 1:
        raise LayoutError(f"--source-channels needs counts >= 1, got {args.source_channels!r}.")
    if args.num_channels not in (None, sum(counts)):
        raise LayoutError(f"--num-channels {args.num_channels} is not the {sum(counts)} distinct channels of "
                          f"--source-channels {args.source_channels}: leave --num-channels out.")
    starts = [sum(counts[:s]) for s in range(len(counts))]
    args.num_channels = sum(counts)
    args.sources = tuple(tuple(range(a, a + c)) for a, c in zip(starts, counts))


def spec_from_args(args):
    """The simulation's input from pretrain-style arguments (the DeepSpeed JSON resolved as training does)."""
    from dchag.arguments import model_config
    from dchag.sim.step import SimSpec
    from dchag.sim.zero import DEFAULT_BUCKET
    from dchag.training.ds_config import build_ds_config
    if args.source_channels is not None:
        _blend(args)
    if args.num_channels is None:
        raise LayoutError("--num-channels is required: the simulation reads no data to count the channels.")
    T = args.tensor_model_parallel_size
    if args.world_size < 1 or args.world_size % T:
        raise LayoutError(f"--world-size {args.world_size} is not a multiple of --tensor-model-parallel-size {T}: "
                          f"world = T x DP; choose a multiple of {T}.")
    ds = build_ds_config(args, args.world_size // T)
    zero = ds["zero_optimization"]
    return SimSpec(cfg=model_config(args), world_size=args.world_size, rank=args.rank, tensor_parallel=T,
                   channel_parallel=args.channel_parallel_size, zero_stage=int(zero["stage"]),
                   micro_batch_size=args.micro_batch_size, mask_ratio=args.mask_ratio, seed=args.seed,
                   bucket_size=int(zero.get("reduce_bucket_size", DEFAULT_BUCKET)), source=args.source)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from dchag.training.ds_config import ConfigError
    if args.json_out and os.path.exists(args.json_out) and not args.force:
        print(f"error: --json {args.json_out} exists: choose a new file or add --force.", file=sys.stderr)
        return 2
    try:
        from dchag.sim.report import compare, table
        from dchag.sim.step import simulate
        spec = spec_from_args(args)
        record = compare(spec, simulate(spec))
    except (LayoutError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table(record))
    if args.json_out:
        tmp = args.json_out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(record, f, indent=1)
        os.replace(tmp, args.json_out)
        print(f"\nwrote {args.json_out}")
    return 0
