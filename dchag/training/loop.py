"""``pretrain()``: initialize, build, train with DeepSpeed, evaluate, checkpoint, log."""

from __future__ import annotations

import math
import os
import time

import torch
import torch.distributed as dist

from dchag.data.errors import DataError
from dchag.device import DeviceError, to_device
from dchag.parallel.partition import LayoutError
from dchag.checkpointing import compat, engine as ckpt, lock as save_lock, rng, tags, universal as ckpt_universal
from dchag.checkpointing.errors import CheckpointError
from dchag.checkpointing.write_errors import cause_of
from dchag.training import preflight, startup
from dchag.training.ds_config import ConfigError
from dchag.training.initialize import init_distributed, init_model_parallel
from dchag.training.launch import LaunchError
from dchag.training.logging_utils import invalid_input_values, comm_device, log_line, peak_memory_mb, reset_peak_memory, tensorboard_writer
from dchag.training.batch_checks import empty_samples
from dchag.training.blend_log import SourceMeter, val_losses
from dchag.training.lr import LRScheduler, ScheduleError
from dchag.training.nonfinite import NonFiniteError, Streak, is_nonfinite
from dchag.training.signals import ExitRequest, progress
from dchag import transfer
from dchag.tasks.base import baseline_losses
from dchag.model.lora import dropout_keys as lora_dropout_keys
from dchag.transfer.errors import FinetuneError

USER_ERRORS = (NonFiniteError, LayoutError, DataError, ConfigError, CheckpointError, ScheduleError, DeviceError,
               FinetuneError, preflight.PreflightError, LaunchError)


def _print0(msg: str, log_file=None) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(msg, flush=True)
        if log_file:
            with open(log_file, "a") as f:
                f.write(msg + "\n")


def coefficient_lr_scales(model) -> dict[int, float]:
    """id(parameter) -> 1/n for each D-CHAG-L level's coefficients, n = the level's tokens per
    segment over the whole model (C/G at level 1, 2 above it; layout-independent).

    A coefficient starts at 1/n (the segment mean) and AdamW moves it by about the LR per step
    whatever its size, so at the plain rate a coefficient of a 16-channel group changes by 3 % of
    itself per step at lr 2e-3, and the whole group token with it. At lr/n it moves at the same
    relative rate for every group size (docs/PARITY.md, "Where the MAE gap comes from")."""
    from dchag.model.aggregation import LinearReduce
    levels = [m for m in model.modules() if isinstance(m, LinearReduce)]
    if any(m.plans is not None for m in levels):  # a blend: one coefficient row per identity, segments differ by source
        raise LayoutError("--dchag-coefficient-lr-scale size needs one data source (a blend's channels sit in "
                          "segments of different sizes per source); use --dchag-coefficient-lr-scale none.")
    return {id(m.weight): m.level.global_out / m.level.global_in for m in levels}


def _build_optimizer(model, args):
    """AdamW over the trainable parameters (--freeze-encoder leaves the encoder out), in groups:
    weight matrices decay, the rest not; each group's ``lr_mult`` (megatron's, applied by the LR
    scheduler) is the product of ``--dchag-partial-lr-mult`` for D-CHAG's partial aggregation,
    ``--new-params-lr-mult`` for a fine-tune's new or interpolated parameters (dchag.transfer) and,
    with ``--dchag-coefficient-lr-scale size``, 1/n for D-CHAG-L's coefficients of segments of n tokens."""
    from dchag.model.aggregation import PartialAggregation
    from dchag.model.init import is_weight_matrix
    from dchag.transfer import is_new_parameter
    partial = {id(p) for m in model.modules() if isinstance(m, PartialAggregation) for p in m.parameters()}
    coefficient_scale = coefficient_lr_scales(model) if getattr(args, "dchag_coefficient_lr_scale", "none") == "size" \
        else {}
    groups = {}
    for p in model.parameters():
        if p.requires_grad:  # only weight matrices decay: the model tags them by role where it builds them
            lr_mult = (args.dchag_partial_lr_mult if id(p) in partial else 1.0) * \
                (getattr(args, "new_params_lr_mult", 1.0) if is_new_parameter(p) else 1.0) * \
                coefficient_scale.get(id(p), 1.0)
            groups.setdefault((is_weight_matrix(p), lr_mult), []).append(p)
    groups = [{"params": params, "weight_decay": args.weight_decay if decay else 0.0, "lr_mult": lr_mult}
              for (decay, lr_mult), params in sorted(groups.items(), key=lambda kv: (not kv[0][0], -kv[0][1]))]
    # lr 0 until the LR schedule sets it: DeepSpeed's ZeRO-0 bf16 wrapper (FP16_Optimizer) takes
    # one zero-gradient step at setup, which must not decay the weights (see _undo_setup_step).
    return torch.optim.AdamW(groups, lr=0.0, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_eps)


def run(args, model_provider, forward_step, datasets_provider, non_loss_data_func=None,
        eval_metrics_func=None, loss_weight_func=None, found: preflight.Found | None = None) -> dict:
    """Train; returns {"losses": {iteration: loss}, "val_losses": {...}, "engine": engine} (on
    every rank; losses are the exact float values the log line rounds). Call ``release(history)``
    before training again in the same process. On an exception the engine is released here.
    ``found``: the pre-flight's result when the caller ran it (``pretrain`` does), else it runs here."""
    built = {"exit_request": ExitRequest(args, time.time()).install()}
    progress.update(iteration=0, saved=None)
    try:
        if found is None:
            found = preflight.run(args)
        return _run(args, model_provider, forward_step, datasets_provider, non_loss_data_func, eval_metrics_func,
                    built, found, loss_weight_func)
    except BaseException as e:
        if "engine" in built and not isinstance(e, KeyboardInterrupt):  # a peer may be gone: no teardown
            try:
                release(built["engine"])
            except Exception:  # noqa: BLE001 - never mask the error that stopped the run
                pass
        raise
    finally:
        built["exit_request"].restore()
        if built.get("save_lock") is not None:
            built["save_lock"].release()


def release(history_or_engine) -> None:
    """Free what a run holds in this process: DeepSpeed keeps global references to the model's
    modules and parameters (and through their hooks the engine and its process groups, each
    with its own communication threads) until ``engine.destroy()``; then the model-parallel
    groups. Needed only when one process trains more than once (tests, notebooks)."""
    import gc
    from megatron.core import parallel_state as ps
    engine = history_or_engine.pop("engine", None) if isinstance(history_or_engine, dict) else history_or_engine
    if engine is not None:
        engine.destroy()
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    gc.collect()


def shutdown(history: dict) -> None:
    """End of a training process: release the run, then the default process group. Exiting
    with live gloo groups lets their threads be destroyed mid-flight at interpreter exit
    ('terminate called without an active exception', SIGABRT on a finished run)."""
    release(history)
    if dist.is_initialized():
        dist.barrier()  # no rank tears down while another still runs a collective (the picture)
        dist.destroy_process_group()


def _run(args, model_provider, forward_step, datasets_provider, non_loss_data_func, eval_metrics_func,
         built: dict, found: preflight.Found, loss_weight_func=None) -> dict:
    # The pre-flight has checked everything that needs no process group (arguments, JSON, layout,
    # data, checkpoint compatibility): from here on, the ranks meet.
    if os.environ.get("RANK", "0") == "0":  # the first line, before the slow imports and rendezvous
        print(f"> dchag: starting {found.world_size} rank(s): initializing torch.distributed ...", flush=True)
    import megatron_patches
    megatron_patches.import_megatron()  # before anything imports megatron-core (start-up time on the CPU)
    import deepspeed
    from megatron.core import parallel_state as ps

    init_distributed()
    from megatron_patches.optional import startup_line
    if startup_line():
        _print0(startup_line(), args.log_file)
    dp = found.data_parallel_size
    ds_config, cfg = found.ds_config, found.cfg
    universal, load_tag, pretrained = found.universal, found.load_tag, found.pretrained
    # One job per --save folder: the lock is taken here, by the run, never by the pre-flight (which only
    # checks that no live job holds it). Interrupted saves beyond the start are moved aside only under it:
    # a folder another job is still writing has no manifest either.
    built["save_lock"] = save_lock.acquire_for_run(args.save)
    compat.check_save_dir(args, found.start_iteration)
    init_model_parallel(args)
    dp_rank = ps.get_data_parallel_rank()
    num_micro = ds_config["gradient_accumulation_steps"]

    with startup.phase("building the model and the DeepSpeed engine"):
        model = model_provider(cfg)
        ckpt_universal.prepare_module(model)
        if pretrained is not None:  # a resume (load_tag) takes its weights from --load, but the same groups
            transfer.apply(model, pretrained, args, load_weights=not load_tag, log=lambda m: _print0(m, args.log_file))
        optimizer = _build_optimizer(model, args)
        engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config,
                                                       mpu=_mpu(), dist_init_required=False)
    built["engine"] = engine
    _record_fp32_grad_norm(engine)
    _guard_nonfinite_step(engine)
    _undo_setup_step(engine)
    decay_iters = args.lr_decay_iters or args.train_iters
    scheduler = LRScheduler(engine.optimizer, args.lr, args.min_lr, args.lr_warmup_iters, decay_iters,
                            args.lr_decay_style)
    iteration, consumed = 0, 0
    if load_tag:
        with startup.phase(f"loading checkpoint {args.load}/{load_tag}"):
            iteration, consumed = ckpt.load(engine, args, scheduler, load_tag, universal)
        _print0(f"> loaded checkpoint {args.load}/{load_tag} at iteration {iteration} "
                f"(consumed samples {consumed})", args.log_file)
    elif args.load:
        _print0(f"> no checkpoint in {args.load} yet: starting from iteration 0", args.log_file)
    start_iteration = iteration
    _saved_normalization(args, load_tag, pretrained)

    data = args.data_path if isinstance(args.data_path, str) else " ".join(args.data_path)
    with startup.phase(f"opening {data} and its statistics"):
        train_loader, valid_factory = datasets_provider(args, cfg, dp_rank, dp, consumed)
    bands = _bands_without_values(getattr(train_loader, "dataset", None), args)
    if hasattr(train_loader, "dataset") and hasattr(valid_factory, "dataset"):
        history_summary = startup.summary(args, cfg, ds_config, engine, train_loader.dataset, valid_factory.dataset,
                                          notes=bands + found.notes)
    else:
        history_summary = []
    train_iter = iter(train_loader)
    from dchag.checkpointing import normalization
    # The statistics the data is normalized with, saved with every checkpoint.
    norm = normalization.gather(getattr(train_loader, "dataset", None), cfg) if args.save else None
    writer = tensorboard_writer(args.tensorboard_dir) if dist.get_rank() == 0 else None
    history = {"losses": {}, "val_losses": {}, "val_metrics": {}, "val_baselines": {}, "grad_norms": {},
               "summary": history_summary}
    meter = SourceMeter.of(args)  # a blend: the loss and share of each source (None for one source)
    if meter is not None:
        history["source_losses"], history["val_source_losses"] = {}, {}
    dp_group = ps.get_data_parallel_group()
    device = comm_device()  # the engine's device: batches and loss sums go there
    skipped = nans = interval_empty = 0  # per log interval (Megatron)
    streak = Streak(args.max_consecutive_nan_iters, f"{args.load}/{load_tag}" if load_tag else None)
    history["lrs"], history["skipped"] = {}, []
    history["iteration_ms"], history["peak_memory_mb"] = {}, {}  # per log interval
    interval_loss, interval_count, interval_good, interval_time = 0.0, 0, 0, 0.0
    interval_invalid = torch.zeros((), dtype=torch.int64, device=device)
    reset_peak_memory()
    engine.train()
    while iteration < args.train_iters:
        t0 = time.time()
        lr_used = scheduler.get_lr()
        total = torch.zeros(1, dtype=torch.float64, device=device)
        batches = [to_device(next(train_iter), device) for _ in range(num_micro)]
        empty, samples = empty_samples(batches)
        interval_empty += empty
        if loss_weight_func is not None and empty < samples:
            _pool_loss_over_global_batch(batches, loss_weight_func, args, dp_group, num_micro * dp, device)
        for batch in batches if empty < samples else ():  # an all-empty batch: no update at all
            interval_invalid += invalid_values(batch)
            with lora_dropout_keys(batch["index"], iteration):  # LoRA's dropout masks: (sample, iteration)
                loss = forward_step(engine, batch, args, cfg, iteration)
                engine.backward(loss)
            engine.step()
            total += loss.detach().double()
        if empty == samples:
            interval_invalid += sum(invalid_values(b) for b in batches)
        dist.all_reduce(total, group=dp_group)
        loss_value = total.item() / (num_micro * dp) if empty < samples else float("nan")
        iteration += 1
        consumed += args.global_batch_size
        dt = time.time() - t0
        gn = engine.get_global_grad_norm()
        gn = None if gn is None or empty == samples else float(gn)
        # A non-finite grad norm (the consequence of a non-finite loss) makes DeepSpeed's optimizer
        # skip the update on every rank (the norm is global; see guard_nonfinite_step for ZeRO 0);
        # the LR schedule does not advance either (Megatron: only on a successful update).
        if empty == samples or is_nonfinite(loss_value, gn):  # nothing to learn from, or a NaN: skipped
            skipped, nans = skipped + 1, nans + (empty < samples)
            history["skipped"].append(iteration)
            streak.skip(iteration, empty == samples, loss_value, gn)  # raises at --max-consecutive-nan-iters
        else:
            streak.update()
            scheduler.step()
        history["lrs"][iteration] = lr_used
        history["losses"][iteration] = loss_value
        history["grad_norms"][iteration] = gn
        counted = not history["skipped"] or history["skipped"][-1] != iteration  # skipped ones are left out (Megatron)
        if counted:
            interval_loss += loss_value
            interval_good += 1
        if meter is not None:
            meter.step(iteration, loss_value if counted else None)
        interval_count += 1
        interval_time += dt
        if iteration % args.log_interval == 0 or iteration == args.train_iters:
            mem = peak_memory_mb()
            invalid = invalid_input_values(interval_invalid)
            avg_loss = interval_loss / interval_good if interval_good else float("nan")
            ms = 1000 * interval_time / interval_count
            sps = args.global_batch_size * interval_count / max(interval_time, 1e-9)
            lr = lr_used
            per_source = meter.interval(iteration) if meter is not None else {}
            if per_source:
                history["source_losses"][iteration] = per_source
            history["iteration_ms"][iteration], history["peak_memory_mb"][iteration] = ms, mem  # the log line's
            _print0(log_line(iteration, args.train_iters, consumed, ms, lr, args.global_batch_size, avg_loss,
                             gn, sps, mem, skipped, nans, invalid, interval_empty)
                    + SourceMeter.log_fields(per_source), args.log_file)
            if writer is not None:
                for tag, v in (("loss", avg_loss), ("learning-rate", lr), ("grad-norm", gn if gn is not None else float("nan")),
                               ("iteration-time", ms), ("samples-per-second", sps), ("peak-memory-mb", mem),
                               ("invalid-input-values", invalid), ("skipped-iterations", skipped),
                               ("nan-iterations", nans), ("empty-samples", interval_empty)):
                    writer.add_scalar(tag, v, iteration)
                SourceMeter.write(writer, per_source, iteration)
                writer.flush()
            interval_loss, interval_count, interval_good, interval_time = 0.0, 0, 0, 0.0
            interval_invalid.zero_()
            skipped = nans = interval_empty = 0
            reset_peak_memory()
        if args.eval_interval and iteration % args.eval_interval == 0:
            val, sums = evaluate(engine, valid_factory, forward_step, args, cfg, dp_group, dp)
            metrics = eval_metrics_func(sums, args, valid_factory) if eval_metrics_func and sums else {}
            baselines = baseline_losses(sums)
            history["val_losses"][iteration] = val
            history["val_metrics"][iteration] = metrics
            history["val_baselines"][iteration] = baselines
            per_source = val_losses(sums, meter.names) if meter is not None else {}
            if per_source:
                history["val_source_losses"][iteration] = per_source
            _print0(f"validation loss at iteration {iteration} | val loss: {val:.6E} |"
                    + "".join(f" {name}: {v:.6E} |" for name, v in per_source.items())
                    + "".join(f" {name}: {v:.4g} |" for name, v in metrics.items())
                    + _scored_part(sums, valid_factory) + _baselines_part(val, baselines), args.log_file)
            if writer is not None:
                writer.add_scalar("val/loss", val, iteration)
                for name, v in per_source.items():
                    writer.add_scalar(name, v, iteration)
                for name, v in metrics.items():
                    writer.add_scalar(f"val/{name}", v, iteration)
                for name, v in baselines.items():
                    writer.add_scalar(f"baseline/{name}", v, iteration)
                writer.flush()
        saved = False
        if args.save and args.save_interval and iteration % args.save_interval == 0:
            saved = _save(engine, args, iteration, consumed, scheduler, norm, streak, found.fingerprint)
        progress["iteration"] = iteration
        reason = built["exit_request"].check()  # every rank agrees (one tiny all-reduce)
        if reason is None and args.exit_interval and iteration % args.exit_interval == 0:
            reason = f"--exit-interval {args.exit_interval}"
        if reason is not None:
            if args.save and not saved:
                saved = _save(engine, args, iteration, consumed, scheduler, norm, streak, found.fingerprint)
            where = (f"checkpoint {args.save}/{tags.tag_for(iteration)}" if saved else streak.not_saved(iteration)
                     if args.save else "no --save: nothing saved")
            _print0(f"> exiting at iteration {iteration} of {args.train_iters}: {reason}; {where}", args.log_file)
            history["exit_reason"] = reason
            break
    else:
        if args.save and iteration > start_iteration and not (args.save_interval and iteration % args.save_interval == 0):
            _save(engine, args, iteration, consumed, scheduler, norm, streak, found.fingerprint)
    if non_loss_data_func is not None and "exit_reason" not in history:  # pictures etc. of the trained model, on every rank
        engine.eval()
        try:
            non_loss_data_func(engine, valid_factory, args, cfg, iteration, writer)
        except OSError as e:  # a --save turned read-only after the last save: one line, as a save says it
            where = e.filename or args.save or args.tensorboard_dir or "."
            raise CheckpointError(f"the pictures of iteration {iteration} could not be written: {where}: "
                                  f"{cause_of(e, where)}. The checkpoints saved so far are kept; make the folder "
                                  "writable (or move the run) before resuming.") from e
        engine.train()
    if writer is not None:
        writer.close()
    history["engine"] = engine
    return history


def _save(engine, args, iteration, consumed, scheduler, normalization, streak, data_fingerprint=None) -> bool:
    """Save, unless the iterations since the last update include a non-finite one; True if saved."""
    if streak.blocks_saving:
        _print0(f"> checkpoint at iteration {iteration} {streak.not_saved(iteration)}", args.log_file)
        return False
    ckpt.save(engine, args, iteration, consumed, scheduler, normalization, data_fingerprint=data_fingerprint)
    progress["saved"] = f"{args.save}/{tags.tag_for(iteration)}"
    streak.saved(progress["saved"])
    _print0(f"> saved checkpoint {progress['saved']}", args.log_file)
    return True


def _saved_normalization(args, load_tag, pretrained) -> None:
    """A resumed run normalizes with the statistics its checkpoint saved, a fine-tune with its
    pretrained model's (for the channels it names; docs/DATA.md): ``args.saved_normalization``
    and ``args.saved_normalization_from``, which the datasets provider hands to build_datasets."""
    from dchag.checkpointing import normalization
    if load_tag:
        folder, where = os.path.join(args.load, load_tag), f"checkpoint {args.load}/{load_tag}"
    elif pretrained is not None:
        folder, where = pretrained.folder, f"the pretrained model {pretrained.folder}"
    else:
        return
    args.saved_normalization, args.saved_normalization_from = normalization.saved(folder), where



def _bands_without_values(dataset, args) -> list[str]:
    """Channels with no valid value (every value NaN, Inf or no-data), judged by the statistics'
    valid-value counts over the channel-parallel ranks (each holds its own channels'); the same
    verdict on every rank. Data without any valid value is refused before training (every batch
    would be skipped); a few such channels are ignored, and the start-up summary says so (the
    returned notes). A blend: each source on its own, named."""
    from dchag.data.errors import DataError
    parts = getattr(dataset, "datasets", None)
    notes = []
    for ds, where in (zip(parts, (f"data source {r['name']} ({r['path']})" for r in args.data_sources))
                      if parts is not None else [(dataset, args.data_path)]):
        dead = startup.bands_without_values(ds)
        if not dead:
            continue
        if len(dead) == ds.source.num_channels:
            raise DataError(f"{where} has no valid value at all (every value is NaN, Inf or the no-data value), so "
                            "there is nothing to train on; check the file, --data-format and the no-data value of "
                            "the data.")
        notes.append(("" if parts is None else f"{where}: ") + startup.bands_note(dead, ds.source.num_channels))
    return notes


def invalid_values(batch: dict) -> torch.Tensor:
    """The micro-batch's invalid input values (zero-filled, masked): the padding of tiles past an
    image's edge (``in_image`` False) is invalid too but no fault of the data, so not counted."""
    invalid = ~batch["valid"]
    if "in_image" in batch:
        invalid = invalid & batch["in_image"][:, None]
    return invalid.sum()


def _pool_loss_over_global_batch(batches, loss_weight_func, args, dp_group, count: int, device) -> None:
    """Make the update the gradient of the loss pooled over the global batch (Megatron's
    per-token loss): each micro-batch's loss becomes its weighted error sum over the mean
    micro-batch weight W / count of the global batch (W summed over micro-batches and DP ranks,
    count = micro-batches x DP); DeepSpeed's averaging over both then yields sum / W. Sets
    ``batch["loss_normalizer"]``; ``loss_weight_func(batch, args)`` -> float64 [] or None (the
    task does not pool)."""
    weights = [loss_weight_func(b, args) for b in batches]
    if any(w is None for w in weights):
        return
    total = torch.stack([w.to(torch.float64) for w in weights]).sum().to(device)
    dist.all_reduce(total, group=dp_group)
    for b in batches:
        b["loss_normalizer"] = total / count


def evaluate(engine, valid_factory, forward_step, args, cfg, dp_group, dp) -> tuple[float, dict]:
    """(validation loss, summed evaluation statistics). ``forward_step`` at evaluation (iteration
    -1) returns a loss, or ``(loss, {name: tensor})`` whose tensors are summed over micro-batches
    and data-parallel ranks (e.g. the sums behind an RMSE). With ``loss_sums`` ([2]: the loss's
    numerator and weight) the validation loss is pooled over every scored sample, sum / weight, so
    a padded or partial micro-batch weighs what its samples weigh; without, it is the mean of the
    micro-batch losses. ``samples_scored`` counts the held-out samples scored (each once; not the
    padding of the last micro-batches). With ``valid_factory.baseline_stats(batch)`` (the task's
    ``baseline_stats``, set by the datasets provider) the sums also hold every baseline's
    ``baseline/<name>/<key>`` on the same batches. Leaves every RNG
    stream as it found it (the eval loader draws a seed from the global generator), so training
    is the same whatever --eval-interval is."""
    state = rng.rng_state()
    try:
        return _evaluate(engine, valid_factory, forward_step, args, cfg, dp_group, dp)
    finally:
        rng.set_rng_state(state)


def _evaluate(engine, valid_factory, forward_step, args, cfg, dp_group, dp) -> tuple[float, dict]:
    engine.eval()
    device = comm_device()
    total, n, sums = torch.zeros(1, dtype=torch.float64, device=device), 0, {}
    scored, counted = torch.zeros((), dtype=torch.float64, device=device), False
    baseline_stats = getattr(valid_factory, "baseline_stats", None)
    with torch.no_grad():
        for batch in valid_factory():
            if "scored" in batch:  # padding of the last micro-batches is not a sample
                scored += batch["scored"].to(device).sum()
                counted = True
            batch = to_device(batch, device)
            out = forward_step(engine, batch, args, cfg, -1)
            loss, stats = out if isinstance(out, tuple) else (out, {})
            if baseline_stats is not None:  # the trivial predictors on the same pixels (no model)
                stats = {**stats, **baseline_stats(batch)}
            if "source" in batch and "loss_sums" in stats:  # a blend: each micro-batch is one source
                stats = {**stats, f"loss_sums/{cfg.source_names[int(batch['source'][0])]}": stats["loss_sums"]}
            total += loss.detach().double()
            for name, value in stats.items():
                sums[name] = sums.get(name, 0) + value.detach().double()
            n += 1
    dist.all_reduce(total, group=dp_group)
    if counted:  # every rank evaluates the same number of batches: the same keys everywhere
        sums["samples_scored"] = scored
    for name in sorted(sums):  # every rank evaluates the same number of batches, so the same names
        dist.all_reduce(sums[name], group=dp_group)
    engine.train()
    if "loss_sums" in sums:
        pooled = sums["loss_sums"]
        val = float(pooled[0] / pooled[1]) if pooled[1] > 0 else float("nan")
    else:
        val = total.item() / max(n * dp, 1)
    return val, {name: v.cpu() for name, v in sums.items()}


def _scored_part(sums: dict, valid_factory) -> str:
    """The validation line's ' scored: n of N held-out samples |' (N: the held-out split's size)."""
    if "samples_scored" not in sums:
        return ""
    held_out = getattr(valid_factory, "dataset", None)
    of = f" of {len(held_out)}" if held_out is not None else ""
    return f" scored: {int(sums['samples_scored'])}{of} held-out samples |"


def _baselines_part(val: float, baselines: dict) -> str:
    """The validation line's baselines (' baseline <name>: <loss> |' each) and, when the model's loss
    is not below the best of them, ' NOT BELOW baseline <name> |'."""
    if not baselines:
        return ""
    out = "".join(f" baseline {name}: {v:.6E} |" for name, v in baselines.items())
    finite = {name: v for name, v in baselines.items() if math.isfinite(v)}
    if finite:
        best = min(finite, key=finite.get)
        if not val < finite[best]:
            out += f" NOT BELOW baseline {best} |"
    return out


def _record_fp32_grad_norm(engine) -> None:
    """ZeRO 0 in fp32 runs the client optimizer unwrapped: DeepSpeed clips the gradients
    (``clip_fp32_gradients``) but drops the norm, so ``get_global_grad_norm()`` is None and the
    log would say 'nan'. Keep the norm its clipping computes (same function, same mpu)."""
    if engine.zero_optimization() or engine.bfloat16_enabled() or engine.fp16_enabled():
        return
    from deepspeed.runtime.utils import clip_grad_norm_

    def clip_fp32_gradients():
        norm = clip_grad_norm_(parameters=engine.module.parameters(), max_norm=engine.gradient_clipping(),
                               mpu=engine.mpu)
        engine._global_grad_norm = float(norm)

    engine.clip_fp32_gradients = clip_fp32_gradients


def _guard_nonfinite_step(engine) -> None:
    """ZeRO 1-3 and DeepSpeed's bf16 optimizers skip the update when the global gradient norm is
    not finite; ZeRO 0 in fp32 steps the client optimizer unconditionally. Give it the same rule:
    the norm is global (the same on every rank), so every rank skips together."""
    if engine.zero_optimization() or engine.bfloat16_enabled() or engine.fp16_enabled():
        return
    from deepspeed.runtime.utils import clip_grad_norm_
    optimizer, inner = engine.optimizer, engine.optimizer.step

    def step(*a, **k):
        if engine.gradient_clipping() <= 0:  # no clipping, so no norm yet: the same function, no clip
            engine._global_grad_norm = float(clip_grad_norm_(parameters=engine.module.parameters(),
                                                             max_norm=float("inf"), mpu=engine.mpu))
        if not math.isfinite(engine._global_grad_norm or 0.0):
            return None
        return inner(*a, **k)

    optimizer.step = step


def _undo_setup_step(engine) -> None:
    """ZeRO 0 with bf16 wraps the optimizer in DeepSpeed's FP16_(Unfused)Optimizer, whose
    ``initialize_optimizer_states`` runs ``optimizer.step()`` once with zero gradients. For AdamW
    that counts as step 1, so every later bias correction is off (the first real update is ~0.74x
    too small). The moments it left are zero; reset the step counts so the first real step is
    step 1, as under ZeRO 1-3. (With lr = 0 at that point the weights did not move.)"""
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    if not isinstance(engine.optimizer, (FP16_Optimizer, FP16_UnfusedOptimizer)):
        return
    for state in engine.optimizer.optimizer.state.values():
        step = state.get("step")
        if torch.is_tensor(step):
            step.zero_()
        elif step is not None:
            state["step"] = 0


def _mpu():
    from megatron_patches.deepspeed_mpu import mpu
    return mpu
