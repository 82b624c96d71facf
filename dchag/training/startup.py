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


def bands_without_values(dataset) -> list[tuple[int, str]]:
    """Collective over the channel-parallel group: (channel, name) of every channel whose
    statistics count no valid value (every value NaN, Inf or the format's no-data value). Empty
    for a dataset without statistics (raw values: nothing counted)."""
    from megatron.core import parallel_state as ps
    stats = getattr(dataset, "stats", None)
    mine = [] if stats is None else [(c, str(dataset.source.channel_names[c]))
                                     for c, n in zip(stats.channels, stats.count) if int(n) == 0]
    if dist.is_initialized() and ps.model_parallel_is_initialized():
        group = ps.get_channel_parallel_group()
        every = [None] * dist.get_world_size(group)
        dist.all_gather_object(every, mine, group=group)
        mine = sorted({band for part in every for band in part})
    return mine


def bands_note(dead: list[tuple[int, str]], num_channels: int) -> str:
    """The start-up line on channels without any valid value: named, ignored, and how to drop them."""
    named = ", ".join(f"{c} ({name})" for c, name in dead[:8]) + (f" and {len(dead) - 8} more" if len(dead) > 8 else "")
    keep = num_channels - len(dead)
    one = len(dead) == 1
    return (f"{'channel' if one else 'channels'} {named} of the {num_channels} {'has' if one else 'have'} no valid "
            f"value (every value is NaN, Inf or the no-data value). {'It is' if one else 'They are'} ignored: "
            "zero-filled in the input, left out of the loss and the metrics, and counted as invalid input values in "
            f"the log line. To leave {'it' if one else 'them'} out of the model, keep the other {keep} channels of "
            f"the data and set --num-channels {keep}.")


def _parameters(module) -> tuple[int, int]:
    """(this rank's parameter count, the whole model's): a tensor-parallel shard is 1/T of its
    parameter, a channel shard holds ``channel_ids`` of ``global_rows``; ZeRO 3 keeps the full size in ds_numel."""
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
            total += n // max(len(p.channel_ids), 1) * int(p.channel_global_rows)
        else:
            total += n
    return local, total


def _scored(args, num_valid: int) -> str:
    """How many held-out samples an evaluation scores (each once): all (--eval-iters not given), or
    those of --eval-iters global batches."""
    from dchag.data.sampler import eval_scored
    n = eval_scored(num_valid, args.global_batch_size, 1, args.eval_iters)
    return f"all {n}" if n == num_valid else f"the first {n} (--eval-iters {args.eval_iters})"


def _span(names) -> str:
    names = list(names)
    return ", ".join(names) if len(names) <= 4 else f"{names[0]}, {names[1]} ... {names[-1]}"


def summary(args, cfg, ds_config, engine, train_ds, valid_ds, notes=()) -> list[str]:
    """The start-up summary (rank 0 prints it; every rank returns it), ending with ``notes`` (what
    the pre-flight found worth saying once: how a plain array was read, a changed data set)."""
    if hasattr(train_ds, "parts"):  # a blend: a line per source (dchag/data/blend_loader.py)
        return _summary_rest(args, cfg, ds_config, engine, blend_lines(args, cfg, train_ds, valid_ds), notes)
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
    P = args.channel_parallel_size
    part = cfg.partition(P)
    per_rank = "; ".join(f"channel rank {r}: channels {part.rank_channels(r).start}-{part.rank_channels(r).stop - 1}"
                         f" (groups {part.rank_groups(r).start}-{part.rank_groups(r).stop - 1})" for r in range(P))
    lines.append(f"channels: {C} in {args.dchag_groups} group(s) of {min(part.group_sizes)}-{max(part.group_sizes)}; "
                 f"{per_rank}")
    return _summary_rest(args, cfg, ds_config, engine, lines, notes)


def _runs(positions) -> str:
    """Source channel positions as 'a-b, c' (repeats of a run shown once)."""
    out = []
    for c in positions:
        if out and c in (out[-1][1], out[-1][1] + 1):
            out[-1][1] = c
        else:
            out.append([c, c])
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in out)


def blend_lines(args, cfg, train_ds, valid_ds) -> list[str]:
    """The data lines of a blend's summary: the union, then per source its path, channels, wavelength
    range, samples, held-out samples, weight, statistics and groups (which of its channels each
    channel-parallel rank reads)."""
    P = args.channel_parallel_size
    layout = cfg.source_layout(P)
    shared = sum(1 for u in range(cfg.num_channels) if sum(u in ids for ids in cfg.sources) > 1)
    weights = ", ".join(f"{r['weight']:.3f}" for r in args.data_sources)
    lines = [f"data: a blend of {len(train_ds.parts)} sources, one per training step (weights {weights}); "
             f"{cfg.num_channels} channels in their union ({shared} shared by two sources or more, matched by name, "
             f"then wavelength); tiles {args.img_h} x {args.img_w}, patch {args.patch_dim} ({cfg.num_patches} patches "
             f"per tile); each source holds out the last {args.valid_fraction:.0%} of its tiles (by position)"]
    for s, (rec, train, valid) in enumerate(zip(args.data_sources, train_ds.datasets, valid_ds.datasets)):
        src = train.source
        N, C, H, W = src.shape
        size = f"{H} x {W}" if H is not None else "images of several sizes"
        wl = rec.get("wavelength_range")
        slots = layout.slots(s)
        part = layout.partition(s)
        what = (f"{len(slots)} slots ({C} channels repeated)" if len(slots) > C else f"{C} channels")
        groups = "" if cfg.aggregation == "flat" else \
            f" in {part.num_groups} group(s) of {min(part.group_sizes)}-{max(part.group_sizes)}"
        per_rank = "; ".join(f"rank {r}: {_runs(layout.rank_source_channels(s, r))}" for r in range(P))
        stats = train.stats
        lines.append(f"source {s} {rec['name']}: {src.describe()}, {N} image(s) of {C} channels, {size}"
                     + ("" if not wl else f", {wl[0]:g}-{wl[1]:g} nm")
                     + f"; train {len(train)} / valid {len(valid)} samples (each evaluation scores "
                     f"{_scored(args, len(valid))}); weight {rec['weight']:.3f}; {what}{groups} "
                     f"(channel {per_rank}); statistics: "
                     + ("none (not normalized)" if stats is None else getattr(stats, "origin", "given")))
        edge = train.index.edge_report()
        if edge:
            lines.append(f"source {s} {rec['name']} edges: {edge}")
    return lines


def _summary_rest(args, cfg, ds_config, engine, lines: list[str], notes=()) -> list[str]:
    """The model, layout and training lines of the summary after the data's, then the notes; prints them all."""
    from megatron.core import parallel_state as ps
    T, P = args.tensor_model_parallel_size, args.channel_parallel_size
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
    lines += [f"note: {note}" for note in notes]
    for line in lines:
        say(f"> {line}")
    return lines
