"""Train a D-CHAG ViT (--task mae, forecast, regress or segment) with megatron-core + DeepSpeed.

    torchrun --nproc_per_node 2 pretrain_dchag.py --task mae --data-path ... --img-h 8 --img-w 8 ...

The task (dchag/tasks) owns the loss, the evaluation metrics and the picture; this file wires
the model, the data and the task into megatron's ``pretrain()`` contract.
"""

from __future__ import annotations


def model_provider(cfg):
    from dchag.model.vit import DChagViT
    return DChagViT(cfg)


def forward_step(model, batch, args, cfg, iteration: int):
    """The task's loss of one micro-batch. At evaluation (iteration -1) also the sums the
    evaluation pools over every scored sample: ``loss_sums`` (the loss's numerator and weight) and
    the task's metric sums."""
    from dchag.tasks import get_task
    return get_task(args.task).forward_step(model, batch, args, cfg, iteration)


def loss_weight(batch, args):
    """A micro-batch's loss weight (forecast: sum of the latitude weights of its valid target pixels; dense
    tasks: its valid target values): the loop pools the training loss over the global batch with
    it. None for MAE (mean per micro-batch)."""
    from dchag.tasks import get_task
    return get_task(args.task).loss_weight(batch)


def datasets_provider(args, cfg, dp_rank: int, dp_size: int, consumed_samples: int):
    from megatron.core import parallel_state as ps
    from dchag.data import build_datasets, build_eval_loader, build_train_loader
    from dchag.data.blend import is_blend
    if is_blend(args.data_path):  # several sources, one per step (dchag/data/blend.py)
        from dchag.data.blend_loader import build_blend
        train, valid = build_blend(args, cfg, ps.get_channel_parallel_rank(), dp_rank, dp_size, consumed_samples)
        if args.data_strict:
            from dchag.training.startup import strict_scan
            strict_scan(*train.dataset.datasets, *valid.dataset.datasets)
        from dchag.tasks import get_task
        task, parts = get_task(args.task), valid.dataset.parts
        # the task's trivial predictors on the same held-out pixels (the loop's baselines), per micro-batch's source
        valid.baseline_stats = lambda batch: task.baseline_stats(batch, args, cfg, parts[int(batch["source"][0])].dataset)
        return train, valid
    channels = cfg.partition(args.channel_parallel_size).rank_channels(ps.get_channel_parallel_rank())
    train_ds, valid_ds = build_datasets(args.data_path, args.data_format, task=args.task, img_h=args.img_h,
                                        img_w=args.img_w, channels=channels, num_channels=args.num_channels,
                                        lead_time=args.lead_time, valid_fraction=args.valid_fraction,
                                        strict=args.data_strict, seed=args.seed, target_path=args.target_path,
                                        num_classes=args.num_classes, ignore_index=args.ignore_index,
                                        lat_weighting=args.lat_weighting,
                                        channels_last=args.channels_last,
                                        # a resume or fine-tune: the statistics its checkpoint or export saved
                                        saved_normalization=getattr(args, "saved_normalization", None),
                                        saved_from=getattr(args, "saved_normalization_from", "the checkpoint"))
    if args.data_strict:  # refuse bad data before training, not when the bad tile is first drawn
        from dchag.training.startup import strict_scan
        strict_scan(train_ds, valid_ds)
    train = build_train_loader(train_ds, args.micro_batch_size, data_parallel_rank=dp_rank,
                               data_parallel_size=dp_size, seed=args.seed, consumed_samples=consumed_samples,
                               global_batch_size=args.global_batch_size, num_workers=args.num_workers)
    k = args.global_batch_size // (args.micro_batch_size * dp_size)

    def valid():
        if len(valid_ds) == 0:
            return []
        return build_eval_loader(valid_ds, args.micro_batch_size, data_parallel_rank=dp_rank,
                                 data_parallel_size=dp_size,
                                 num_micro_batches=None if args.eval_iters is None else args.eval_iters * k)
    valid.dataset = valid_ds  # the opened data (wavelengths, channel names, statistics, targets), for the callbacks
    from dchag.tasks import get_task
    task = get_task(args.task)
    # the task's trivial predictors on the same held-out pixels, added to every evaluation (the loop's baselines)
    valid.baseline_stats = lambda batch: task.baseline_stats(batch, args, cfg, valid_ds)
    return train, valid


def task_picture(model, valid_factory, args, cfg, iteration: int, writer) -> None:
    """A PNG of held-out tiles as the task draws them (MAE reconstructions, dense target |
    prediction), written beside the checkpoints (or the TensorBoard log)."""
    from dchag.tasks import get_task
    get_task(args.task).picture(model, valid_factory, args, cfg, iteration, args.save or args.tensorboard_dir)


def task_metrics(sums, args, valid_factory) -> dict:
    """The task's figures from the summed evaluation statistics (rmse/acc per variable, r2 per target, miou)."""
    from dchag.tasks import get_task
    return get_task(args.task).metrics(sums, args, valid_factory)


def main(argv=None):
    from dchag.training import pretrain
    history = pretrain(model_provider, forward_step, datasets_provider, argv, non_loss_data_func=task_picture,
                       eval_metrics_func=task_metrics, loss_weight_func=loss_weight)
    from dchag.training import shutdown  # the loop's module: imported once the pre-flight has passed
    shutdown(history)


if __name__ == "__main__":
    main()
