"""Command-line arguments (Megatron-style, hyphenated; DESIGN.md section 3)."""

from __future__ import annotations

import argparse

from dchag.model.config import CROSS_PROJECTIONS, GROUP_NORMS, TASKS, DChagConfig, default_channel_chunk

# Arguments that define the model and layout: a checkpoint refuses to load if these differ.
MODEL_ARGS = ("task", "num_channels", "img_h", "img_w", "patch_dim", "num_layers", "hidden_size",
              "num_attention_heads", "ffn_hidden_size", "dchag_aggregation", "dchag_groups", "dchag_tree_levels",
              "dchag_cross_projections", "dchag_group_norm",
              "tensor_model_parallel_size", "channel_parallel_size", "bf16", "channel_embedding", "num_outputs",
              "lora_rank", "lora_alpha", "lora_targets")


def integer(text: str) -> int:
    """An integer flag's value: digits, or a whole number in scientific notation (``1e9``, ``2.5e3``)."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not value.is_integer():
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}")
    return int(value)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="D-CHAG ViT pretraining (megatron-core + DeepSpeed)", allow_abbrev=False)
    g = p.add_argument_group("data")
    g.add_argument("--task", choices=TASKS, default="mae")
    g.add_argument("--target-path", default=None)
    g.add_argument("--num-classes", type=integer, default=None)
    g.add_argument("--ignore-index", type=integer, default=255)
    p.set_defaults(num_outputs=None)  # the dense head's planes: set from the targets at start-up (dchag/tasks)
    g.add_argument("--data-path", nargs="+", default="synthetic", metavar="[WEIGHT] PATH")
    g.add_argument("--data-format", default="auto",
                   choices=("auto", "npy", "envi", "hdf5", "zarr", "netcdf", "synthetic"))
    g.add_argument("--num-channels", type=integer, default=None)
    g.add_argument("--img-h", type=integer, required=True)
    g.add_argument("--img-w", type=integer, required=True)
    g.add_argument("--patch-dim", type=integer, required=True)  # except with --finetune (parse_args)
    g.add_argument("--valid-fraction", type=float, default=0.1)
    g.add_argument("--channels-last", action="store_true")
    g.add_argument("--data-strict", action="store_true")
    g.add_argument("--num-workers", type=integer, default=0)
    g.add_argument("--mask-ratio", type=float, default=0.75)
    g.add_argument("--lead-time", type=integer, default=1)
    g.add_argument("--lat-weighting", choices=("area", "cos"), default="area")
    g = p.add_argument_group("model")
    g.add_argument("--num-layers", type=integer, default=2)
    g.add_argument("--hidden-size", type=integer, default=64)
    g.add_argument("--num-attention-heads", type=integer, default=4)
    g.add_argument("--ffn-hidden-size", type=integer, default=None)
    g.add_argument("--dchag-aggregation", choices=("flat", "linear", "cross"), default="linear")
    g.add_argument("--dchag-groups", type=integer, default=1)
    g.add_argument("--dchag-tree-levels", type=integer, default=1)
    g.add_argument("--dchag-cross-projections", choices=CROSS_PROJECTIONS, default="per-group")
    g.add_argument("--dchag-group-norm", choices=GROUP_NORMS, default="none")
    g.add_argument("--dchag-channel-chunk", type=integer, default=None)
    g.add_argument("--channel-embedding", choices=("learned", "wavelength"), default="learned")
    g.add_argument("--hidden-dropout", type=float, default=0.0)
    g.add_argument("--attention-dropout", type=float, default=0.0)
    g.add_argument("--recompute-activations", action="store_true")
    g.add_argument("--attention-backend", choices=("auto", "sdpa", "unfused"), default="auto",
                   help="attention kernels of the backbone and both aggregations: sdpa = "
                        "torch scaled_dot_product_attention (flash/cuDNN/efficient on GPUs), unfused = explicit "
                        "scores + fp32 softmax (the reference); auto = sdpa")
    g.add_argument("--transformer-impl", choices=("local", "transformer_engine"), default="local",
                   help="backbone layer spec: megatron's local modules, or Transformer Engine's (only if installed)")
    g.add_argument("--use-cpu-initialization", action=argparse.BooleanOptionalAction, default=None,
                   help="draw full weights on the host, then shard (same initial model on every layout; default "
                        "on). --no-use-cpu-initialization (GPU only): each rank draws its shard on its GPU")
    g = p.add_argument_group("parallel")
    g.add_argument("--tensor-model-parallel-size", type=integer, default=1)
    g.add_argument("--channel-parallel-size", type=integer, default=1)
    g.add_argument("--sequence-parallel", action="store_true")
    g = p.add_argument_group("training")
    # Batch size, precision and clipping default to None = "not given": then the DeepSpeed JSON's
    # value is used (or the default: 1, micro-batch x DP, fp32, 1.0); given on both, they must agree.
    g.add_argument("--micro-batch-size", type=integer, default=None, help="default: the JSON's, else 1")
    g.add_argument("--global-batch-size", type=integer, default=None,
                   help="default: the JSON's train_batch_size, else micro-batch size x data-parallel size")
    g.add_argument("--train-iters", type=integer, required=True)
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-warmup-iters", type=integer, default=0)
    g.add_argument("--lr-decay-style", choices=("constant", "linear", "cosine"), default="cosine")
    g.add_argument("--lr-decay-iters", type=integer, default=None,
                   help="length of the LR schedule in iterations (warmup included); default: --train-iters")
    g.add_argument("--use-checkpoint-opt-param-scheduler", "--use-checkpoint-opt_param-scheduler",
                   dest="use_checkpoint_opt_param_scheduler", action="store_true",
                   help="on resume, keep the checkpoint's LR schedule (lr, min-lr, warmup, decay iters and style) "
                        "even if the command line differs")
    g.add_argument("--override-opt-param-scheduler", "--override-opt_param-scheduler",
                   dest="override_opt_param_scheduler", action="store_true",
                   help="on resume, take the command line's LR schedule instead of the checkpoint's")
    g.add_argument("--max-consecutive-nan-iters", type=integer, default=10,
                   help="stop (without saving) after this many consecutive iterations with a non-finite loss or "
                        "gradient norm; each such update is skipped on every rank")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--dchag-partial-lr-mult", type=float, default=1.0)
    g.add_argument("--dchag-coefficient-lr-scale", choices=("size", "none"), default="none")
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=None, help="default: the JSON's gradient_clipping, else 1.0")
    g.add_argument("--bf16", action="store_true", default=None, help="default: the JSON's bf16.enabled, else fp32")
    g.add_argument("--seed", type=integer, default=1234)
    g.add_argument("--zero-stage", type=integer, default=None, help="override zero_optimization.stage of the JSON")
    g.add_argument("--skip-memory-check", action="store_true")
    g = p.add_argument_group("fine-tuning (dchag/transfer)")
    g.add_argument("--finetune", action="store_true")
    g.add_argument("--pretrained-checkpoint", default=None)
    g.add_argument("--freeze-encoder", action="store_true")
    g.add_argument("--new-params-lr-mult", type=float, default=1.0)
    g.add_argument("--match-channels", choices=("name", "wavelength"), default=None)
    g.add_argument("--lora-rank", type=int, default=0)
    g.add_argument("--lora-alpha", type=float, default=None)
    g.add_argument("--lora-dropout", type=float, default=0.0)
    g.add_argument("--lora-targets", default=None)
    g = p.add_argument_group("checkpointing and logging")
    g.add_argument("--save", default=None)
    g.add_argument("--load", default=None)
    g.add_argument("--ckpt-step", type=integer, default=None,
                   help="with --load: the iteration to load (default: the one in DIR/latest)")
    g.add_argument("--allow-data-change", action="store_true")
    g.add_argument("--no-load-optim", action="store_true",
                   help="with --load: load the weights, iteration, consumed samples and LR schedule but not the "
                        "optimizer state (fresh Adam moments); needed for a checkpoint written by "
                        "tools/convert_checkpoint.py --format deepspeed")
    g.add_argument("--save-interval", type=integer, default=None)
    g.add_argument("--exit-interval", type=integer, default=None,
                   help="stop (and save, with --save) when the iteration is a multiple of this")
    g.add_argument("--exit-signal-handler", action="store_true",
                   help="on --exit-signal, every rank finishes its iteration, a checkpoint is saved (with --save) "
                        "and the run exits 0")
    g.add_argument("--exit-signal", choices=("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2"), default="SIGTERM",
                   help="the signal --exit-signal-handler catches (SLURM: sbatch --signal=B:USR1@120 or the "
                        "SIGTERM sent at the time limit)")
    g.add_argument("--exit-duration-in-mins", type=float, default=None,
                   help="stop (and save) at the first iteration boundary after this many minutes of this process")
    g.add_argument("--eval-interval", type=integer, default=None)
    g.add_argument("--eval-iters", type=integer, default=None)
    g.add_argument("--log-interval", type=integer, default=1)
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument("--log-file", default=None, help="rank 0 also appends the log lines (and losses) here")
    g = p.add_argument_group("deepspeed")
    g.add_argument("--deepspeed", action="store_true")
    g.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config", default=None)
    g.add_argument("--local_rank", "--local-rank", dest="local_rank", type=integer, default=None)
    from dchag.help_text import apply
    return apply(p)  # help text (with defaults) for every flag


def parse_args(argv=None) -> argparse.Namespace:
    """Parse; batch size, --bf16 and --clip-grad stay None when not given (resolved against the
    DeepSpeed JSON by ``dchag.training.ds_config.build_ds_config``)."""
    import sys
    parser = build_parser()
    if "--finetune" in (sys.argv[1:] if argv is None else argv):  # the pretrained model's patch size stands in
        next(a for a in parser._actions if a.dest == "patch_dim").required = False
    args = parser.parse_args(argv)
    if isinstance(args.data_path, list) and len(args.data_path) == 1:  # one path: exactly as before blends
        args.data_path = args.data_path[0]
    if args.finetune:  # flags not given take the pretrained model's values (dchag.transfer.prepare)
        args.given = given_on_command_line(argv)
    return args


def given_on_command_line(argv=None) -> frozenset[str]:
    """The dests the command line gives (parsed a second time with every default suppressed)."""
    parser = build_parser()
    for action in parser._actions:
        action.default, action.required = argparse.SUPPRESS, False
    return frozenset(vars(parser.parse_known_args(argv)[0]))


def model_config(args, num_channels: int | None = None) -> DChagConfig:
    return DChagConfig(
        num_channels=num_channels or args.num_channels, img_h=args.img_h, img_w=args.img_w,
        patch_dim=args.patch_dim, hidden_size=args.hidden_size, num_layers=args.num_layers,
        num_attention_heads=args.num_attention_heads, ffn_hidden_size=args.ffn_hidden_size,
        aggregation=args.dchag_aggregation, groups=args.dchag_groups, tree_levels=args.dchag_tree_levels,
        cross_projections=getattr(args, "dchag_cross_projections", "per-group"),
        group_norm=getattr(args, "dchag_group_norm", "none"),
        # getattr: the arguments of a checkpoint saved before the flag existed (dchag.checkpointing)
        channel_chunk=default_channel_chunk(args.dchag_aggregation, getattr(args, "dchag_channel_chunk", None)),
        task=args.task, num_outputs=getattr(args, "num_outputs", None),
        hidden_dropout=args.hidden_dropout, attention_dropout=args.attention_dropout,
        recompute_activations=args.recompute_activations, sequence_parallel=args.sequence_parallel,
        bf16=bool(args.bf16), init_seed=args.seed, attention_backend=args.attention_backend,
        transformer_impl=args.transformer_impl, use_cpu_initialization=args.use_cpu_initialization,
        # getattr: set from the data by the training loop; absent in checkpoints saved before they were recorded
        channel_names=getattr(args, "channel_names", None), wavelengths=getattr(args, "wavelengths", None),
        channel_embedding=getattr(args, "channel_embedding", "learned"),
        # a blend of data sources: per source its union channel ids (dchag/parallel/sources.py), set from the data
        sources=getattr(args, "sources", None), source_names=getattr(args, "source_names", None),
        # getattr: checkpoints saved before LoRA existed
        lora_rank=getattr(args, "lora_rank", 0) or 0, lora_alpha=getattr(args, "lora_alpha", None),
        lora_dropout=getattr(args, "lora_dropout", 0.0) or 0.0, lora_targets=lora_targets(args))


def lora_targets(args) -> tuple[str, ...] | None:
    """--lora-targets as a tuple (None: the default set)."""
    value = getattr(args, "lora_targets", None)
    if value is None or isinstance(value, (tuple, list)):
        return None if value is None else tuple(value)
    return tuple(t.strip() for t in str(value).split(",") if t.strip())
