"""``pretrain()``: initialize, build, train with DeepSpeed, evaluate, checkpoint, log."""

from __future__ import annotations

import math
import sys
import time

import torch
import torch.distributed as dist

from dchag.arguments import model_config, parse_args
from dchag.data.errors import DataError
from dchag.parallel.partition import LayoutError
from dchag.training import checkpoint as ckpt
from dchag.training.ds_config import ConfigError, build_ds_config
from dchag.training.initialize import check_layout, init_distributed, init_model_parallel
from dchag.training.logging_utils import log_line, peak_memory_mb, reset_peak_memory, tensorboard_writer
from dchag.training.lr import LRScheduler

USER_ERRORS = (LayoutError, DataError, ConfigError, ckpt.CheckpointError)


def _print0(msg: str, log_file=None) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(msg, flush=True)
        if log_file:
            with open(log_file, "a") as f:
                f.write(msg + "\n")


def _build_optimizer(model, args):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_eps)


def _num_channels(args) -> int:
    if args.num_channels is not None:
        return args.num_channels
    from dchag.data import open_source
    return open_source(args.data_path, args.data_format).num_channels


def run(args, model_provider, forward_step, datasets_provider, non_loss_data_func=None) -> dict:
    """Train; returns {"losses": {iteration: loss}, "val_losses": {...}} (on every rank)."""
    import deepspeed
    from megatron.core import parallel_state as ps

    init_distributed()
    world = dist.get_world_size()
    args.num_channels = _num_channels(args)
    cfg = model_config(args)
    check_layout(args, cfg, world)
    dp = world // args.tensor_model_parallel_size
    if args.global_batch_size_default:
        args.global_batch_size = args.micro_batch_size * dp
    ds_config = build_ds_config(args, dp)
    if args.load:
        ckpt.check_compatible(args)
    init_model_parallel(args)
    dp_rank = ps.get_data_parallel_rank()
    num_micro = ds_config["gradient_accumulation_steps"]

    model = model_provider(cfg)
    optimizer = _build_optimizer(model, args)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config,
                                                   mpu=_mpu(), dist_init_required=False)
    decay_iters = args.lr_decay_iters or args.train_iters
    scheduler = LRScheduler(engine.optimizer, args.lr, args.min_lr, args.lr_warmup_iters, decay_iters,
                            args.lr_decay_style)
    iteration, consumed = 0, 0
    if args.load:
        iteration, consumed = ckpt.load(engine, args, scheduler)
        _print0(f"> loaded checkpoint {args.load} at iteration {iteration}", args.log_file)

    train_loader, valid_factory = datasets_provider(args, cfg, dp_rank, dp, consumed)
    train_iter = iter(train_loader)
    writer = tensorboard_writer(args.tensorboard_dir) if dist.get_rank() == 0 else None
    history = {"losses": {}, "val_losses": {}}
    dp_group = ps.get_data_parallel_group()
    skipped = nans = 0
    interval_loss, interval_count, interval_time = 0.0, 0, 0.0
    reset_peak_memory()
    engine.train()
    while iteration < args.train_iters:
        t0 = time.time()
        total = torch.zeros(1, dtype=torch.float64)
        for _ in range(num_micro):
            batch = next(train_iter)
            loss = forward_step(engine, batch, args, cfg, iteration)
            engine.backward(loss)
            engine.step()
            total += loss.detach().double()
        dist.all_reduce(total, group=dp_group)
        loss_value = total.item() / (num_micro * dp)
        scheduler.step()
        iteration += 1
        consumed += args.global_batch_size
        dt = time.time() - t0
        gn = engine.get_global_grad_norm()
        gn = None if gn is None else float(gn)
        if not math.isfinite(loss_value) or (gn is not None and not math.isfinite(gn)):
            nans += 1
        history["losses"][iteration] = loss_value
        interval_loss += loss_value
        interval_count += 1
        interval_time += dt
        if iteration % args.log_interval == 0 or iteration == args.train_iters:
            mem = peak_memory_mb()
            avg_loss = interval_loss / interval_count
            ms = 1000 * interval_time / interval_count
            sps = args.global_batch_size * interval_count / max(interval_time, 1e-9)
            lr = scheduler.get_lr(iteration - 1)
            _print0(log_line(iteration, args.train_iters, consumed, ms, lr, args.global_batch_size, avg_loss,
                             gn, sps, mem, skipped, nans), args.log_file)
            if writer is not None:
                for tag, v in (("loss", avg_loss), ("learning-rate", lr), ("grad-norm", gn if gn is not None else float("nan")),
                               ("iteration-time", ms), ("samples-per-second", sps), ("peak-memory-mb", mem)):
                    writer.add_scalar(tag, v, iteration)
                writer.flush()
            interval_loss, interval_count, interval_time = 0.0, 0, 0.0
            reset_peak_memory()
        if args.eval_interval and iteration % args.eval_interval == 0:
            val = evaluate(engine, valid_factory, forward_step, args, cfg, dp_group, dp)
            history["val_losses"][iteration] = val
            _print0(f"validation loss at iteration {iteration} | val loss: {val:.6E} |", args.log_file)
            if writer is not None:
                writer.add_scalar("val/loss", val, iteration)
                writer.flush()
        saved = False
        if args.save and args.save_interval and iteration % args.save_interval == 0:
            ckpt.save(engine, args, iteration, consumed, scheduler)
            saved = True
            _print0(f"> saved checkpoint {args.save}/{ckpt.tag_for(iteration)}", args.log_file)
        if args.exit_interval and iteration % args.exit_interval == 0:
            if args.save and not saved:
                ckpt.save(engine, args, iteration, consumed, scheduler)
                _print0(f"> saved checkpoint {args.save}/{ckpt.tag_for(iteration)}", args.log_file)
            _print0(f"> exiting at iteration {iteration} (--exit-interval {args.exit_interval})", args.log_file)
            break
    else:
        if args.save and not (args.save_interval and iteration % args.save_interval == 0):
            ckpt.save(engine, args, iteration, consumed, scheduler)
            _print0(f"> saved checkpoint {args.save}/{ckpt.tag_for(iteration)}", args.log_file)
    if non_loss_data_func is not None:  # pictures etc. of the trained model, on every rank
        engine.eval()
        non_loss_data_func(engine, valid_factory, args, cfg, iteration, writer)
        engine.train()
    if writer is not None:
        writer.close()
    history["engine"] = engine
    return history


def evaluate(engine, valid_factory, forward_step, args, cfg, dp_group, dp) -> float:
    engine.eval()
    total, n = torch.zeros(1, dtype=torch.float64), 0
    with torch.no_grad():
        for batch in valid_factory():
            total += forward_step(engine, batch, args, cfg, -1).detach().double()
            n += 1
    dist.all_reduce(total, group=dp_group)
    engine.train()
    return total.item() / max(n * dp, 1)


def _mpu():
    from megatron_patches.deepspeed_mpu import mpu
    return mpu


def pretrain(model_provider, forward_step, datasets_provider, argv=None, non_loss_data_func=None) -> dict:
    """Entry point: parse the command line, run, turn user errors into a one-line message + exit 1.

    ``non_loss_data_func(model, valid_factory, args, cfg, iteration, writer)``, when given, runs
    once after training on every rank (megatron's name for evaluation outputs that are not a
    loss, e.g. pictures)."""
    args = parse_args(argv)
    try:
        return run(args, model_provider, forward_step, datasets_provider, non_loss_data_func)
    except USER_ERRORS as e:
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
