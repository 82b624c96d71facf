"""What a run says while it starts: progress lines for slow phases (rank 0), errors every rank
agrees on, and the start-up summary."""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch.distributed as dist


def rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def say(msg: str) -> None:
    if rank0():
        print(msg, flush=True)


@contextmanager
def phase(what: str):
    """'> WHAT ...' before, '> WHAT: done (N.N s)' after (rank 0)."""
    say(f"> {what} ...")
    t0 = time.time()
    yield
    say(f"> {what}: done ({time.time() - t0:.1f} s)")


def agree(fn, error_type):
    """Run ``fn`` on every rank; when any rank raises ``error_type``, every rank raises it with the
    first rank's message (no rank goes on into a collective the others never reach)."""
    msg, out = "", None
    try:
        out = fn()
    except error_type as e:
        msg = str(e)
    if dist.is_initialized() and dist.get_world_size() > 1:
        msgs = [None] * dist.get_world_size()
        dist.all_gather_object(msgs, msg)
        msg = next((m for m in msgs if m), "")
    if msg:
        raise error_type(msg)
    return out


def strict_scan(*datasets) -> None:
    """--data-strict: every rank reads every sample of its channels before training."""
    from dchag.data.errors import DataError
    from dchag.data.scan import scan

    def progress(done, total, seconds):
        say(f"> --data-strict: checked {done}/{total} samples for invalid values ({seconds:.1f} s)")

    agree(lambda: scan(datasets, progress), DataError)


def _parameters(module) -> tuple[int, int]:
    """(this rank's parameter count, the whole model's): a tensor-parallel shard is 1/T of its
    parameter, a channel shard holds ``rows`` of ``global_rows``; ZeRO 3 keeps the full size in ds_numel."""
    from megatron.core import parallel_state as ps
    from dchag.parallel.state_dict import shard_kind
    T = ps.get_tensor_model_parallel_world_size()
    local = total = 0
    for p in module.parameters():
        n = int(getattr(p, "ds_numel", p.numel()))
        local += n
        kind = shard_kind(p)
        if kind == "tensor":
            total += n * T
        elif kind == "channel":
            a, b = p.channel_rows
            total += n // max(b - a, 1) * int(p.channel_global_rows)
        else:
            total += n
    return local, total


def _scored(args, num_valid: int) -> str:
    """How many held-out samples --eval-iters global batches score (each once)."""
    from dchag.data.sampler import eval_scored
    n = eval_scored(num_valid, args.global_batch_size, 1, args.eval_iters)
    return f"all {n}" if n == num_valid else f"the first {n} (--eval-iters {args.eval_iters})"


def _span(names) -> str:
    names = list(names)
    return ", ".join(names) if len(names) <= 4 else f"{names[0]}, {names[1]} ... {names[-1]}"


def summary(args, cfg, ds_config, engine, train_ds, valid_ds) -> list[str]:
    """The start-up summary (rank 0 prints it; every rank returns it)."""
    from megatron.core import parallel_state as ps
    src = train_ds.source
    N, C, H, W = src.shape
    size = f"{H} x {W}" if H is not None else "images of several sizes"
    lines = [f"data: {src.describe()}: {N} image(s) of {C} channels, {size}; channels {_span(src.channel_names)}"
             + ("" if src.wavelengths is None else
                f" ({float(src.wavelengths[0]):g}-{float(src.wavelengths[-1]):g} nm)")]
    from dchag.tasks import get_task
    split = get_task(args.task).held_out(args)
    lines.append(f"tiles: {args.img_h} x {args.img_w}, patch {args.patch_dim} ({cfg.num_patches} patches per tile); "
                 f"train {len(train_ds)} / valid {len(valid_ds)} samples ({split}, by position, no shuffling); "
                 f"each evaluation scores {_scored(args, len(valid_ds))} held-out samples once")
    edge = train_ds.index.edge_report()
    if edge:
        lines.append(f"edges: {edge}")
    if getattr(train_ds, "targets", None) is not None:
        lines.append(f"targets: {train_ds.targets.summary()}")
    stats = train_ds.stats
    lines.append("statistics: " + ("none (not normalized)" if stats is None else getattr(stats, "origin", "given")))
    P, T = args.channel_parallel_size, args.tensor_model_parallel_size
    part = cfg.partition(P)
    per_rank = "; ".join(f"channel rank {r}: channels {part.rank_channels(r).start}-{part.rank_channels(r).stop - 1}"
                         f" (groups {part.rank_groups(r).start}-{part.rank_groups(r).stop - 1})" for r in range(P))
    lines.append(f"channels: {C} in {args.dchag_groups} group(s) of {min(part.group_sizes)}-{max(part.group_sizes)}; "
                 f"{per_rank}")
    local, total = _parameters(engine.module)
    streamed = (f", channel stage streamed {cfg.channel_chunk} channels at a time" if cfg.channel_chunk else "")
    lines.append(f"model: {args.task}, aggregation {args.dchag_aggregation} (tree levels {args.dchag_tree_levels}{streamed}), "
                 f"{args.num_layers} layers, hidden {args.hidden_size}, {args.num_attention_heads} heads; parameters "
                 f"{local:,} on rank 0, {total:,} in total")
    dp = ps.get_data_parallel_world_size()
    lines.append(f"layout: {dist.get_world_size()} ranks = T {T} x DP {dp}, channel-parallel P {P}"
                 f"{', sequence parallel' if args.sequence_parallel else ''}; ZeRO stage "
                 f"{ds_config['zero_optimization']['stage']}; precision {'bf16' if args.bf16 else 'fp32'}; attention "
                 f"{getattr(args, 'attention_backend', None) or 'unfused (megatron local spec)'}")
    decay = args.lr_decay_iters or args.train_iters
    lines.append(f"training: {args.train_iters} iterations, global batch {args.global_batch_size} (micro {args.micro_batch_size}"
                 f" x accumulation {ds_config['gradient_accumulation_steps']} x DP {dp}); LR {args.lr_decay_style} "
                 f"{args.lr:g} -> {args.min_lr:g}, warmup {args.lr_warmup_iters}, decay over {decay} iterations"
                 + (f"; partial aggregation at {args.dchag_partial_lr_mult:g} x the LR"
                    if args.dchag_partial_lr_mult != 1 and cfg.aggregation != "flat" else "")
                 + ("; coefficients at 1/(tokens per segment) x that"
                    if getattr(args, "dchag_coefficient_lr_scale", "none") == "size" and cfg.aggregation == "linear"
                    else ""))
    for line in lines:
        say(f"> {line}")
    return lines
