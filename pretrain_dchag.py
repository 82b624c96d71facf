"""Pretrain a D-CHAG ViT (MAE or forecasting) with megatron-core + DeepSpeed.

    torchrun --nproc_per_node 2 pretrain_dchag.py --task mae --data-path ... --img-h 8 --img-w 8 ...
"""

from __future__ import annotations

import torch


def model_provider(cfg):
    from dchag.model.vit import DChagViT
    return DChagViT(cfg)


def forward_step(model, batch, args, cfg, iteration: int):
    """The loss of one micro-batch. At evaluation (iteration -1) also the sums the evaluation
    pools over every scored sample: ``loss_sums`` (the loss's numerator and weight) and, for a
    forecast, the per-time sums behind each variable's RMSE and ACC. A forecast's training loss is
    divided by ``batch["loss_normalizer"]`` when the loop set it (``loss_weight``)."""
    from dchag.tasks import forecast as fc
    from dchag.tasks import mae, patch_mask
    from dchag.tasks.weather_metrics import metric_sums
    valid = batch["valid"]
    images = torch.where(valid, batch["images"], torch.zeros_like(batch["images"]))
    if args.task == "mae":
        mask = patch_mask(batch["index"].cpu(), cfg.num_patches, args.mask_ratio, args.seed,
                          max(iteration, 0)).to(images.device)
        pred = model(images, patch_mask=mask)
        sums = mae.error_sums(pred, images, valid, mask, cfg.grid, cfg.patch_dim)
        loss = sums[0] / sums[1].clamp_min(1.0)
        return loss if iteration >= 0 else (loss, {"loss_sums": sums})
    lead = torch.full((images.shape[0],), float(args.lead_time), device=images.device)
    pred = model(images, lead_time=lead)
    if iteration >= 0:
        return fc.forecast_loss(pred, batch["target"], batch["target_valid"], batch["lat_weights"],
                                batch.get("loss_normalizer"))
    sums = fc.error_sums(pred, batch["target"], batch["target_valid"], batch["lat_weights"])
    stats = {"loss_sums": sums}
    if "climatology" in batch:
        stats["forecast"] = metric_sums(pred, batch["target"], batch["target_valid"], batch["lat_weights"],
                                        batch["climatology"], batch["time_slot"], int(batch["time_slots"][0]))
    return sums[0] / sums[1].clamp_min(1e-12), stats


def loss_weight(batch, args):
    """A forecast micro-batch's loss weight (sum of cos(lat) over its valid target pixels): the loop
    pools the training loss over the global batch with it. None for MAE (mean per micro-batch)."""
    if args.task != "forecast":
        return None
    from dchag.tasks.forecast import loss_weight as forecast_loss_weight
    return forecast_loss_weight(batch)


def datasets_provider(args, cfg, dp_rank: int, dp_size: int, consumed_samples: int):
    from megatron.core import parallel_state as ps
    from dchag.data import build_datasets, build_eval_loader, build_train_loader
    channels = cfg.partition(args.channel_parallel_size).rank_channels(ps.get_channel_parallel_rank())
    train_ds, valid_ds = build_datasets(args.data_path, args.data_format, task=args.task, img_h=args.img_h,
                                        img_w=args.img_w, channels=channels, num_channels=args.num_channels,
                                        lead_time=args.lead_time, valid_fraction=args.valid_fraction,
                                        strict=args.data_strict, seed=args.seed)
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
                                 data_parallel_size=dp_size, num_micro_batches=args.eval_iters * k)
    valid.dataset = valid_ds  # the opened data (wavelengths, channel names, statistics), for the callbacks
    return train, valid


def reconstruction_picture(model, valid_factory, args, cfg, iteration: int, writer) -> None:
    """MAE only: a PNG of up to 8 held-out tiles (input | masked input | reconstruction), written
    beside the checkpoints (or the TensorBoard log)."""
    import os

    import torch.distributed as dist

    from dchag.data.visualize import band_limits, save_reconstruction_grid
    from dchag.tasks.mae import heldout_reconstructions, rgb_label
    out_dir = args.save or args.tensorboard_dir
    if args.task != "mae" or out_dir is None or len(valid_factory.dataset) == 0:
        return
    pics = heldout_reconstructions(model, valid_factory, cfg, args.mask_ratio, args.seed, max_tiles=8)
    if dist.get_rank() != 0:
        return
    os.makedirs(out_dir, exist_ok=True)  # --load FINISHED --save NEW: nothing was saved into NEW yet
    path = os.path.join(out_dir, f"reconstruction_iter_{iteration:07d}.png")
    save_reconstruction_grid(path, pics["tiles"], [("reconstruction", [t["reconstruction"] for t in pics["tiles"]])],
                             f"held-out tiles at iteration {iteration}, RGB = {rgb_label(pics)}",
                             limits=band_limits(range(3)))  # normalized values: the stretch tools/predict.py uses
    print(f"> saved reconstruction of {len(pics['tiles'])} held-out tiles {path}", flush=True)


def forecast_metrics(sums, args, valid_factory) -> dict:
    """Per output variable: latitude-weighted RMSE (in the variable's units) and ACC, as
    WeatherBench 2 defines them (dchag/tasks/weather_metrics.py)."""
    from dchag.tasks.weather_metrics import metrics_from_sums
    if "forecast" not in sums:
        return {}
    ds = valid_factory.dataset
    names = [ds.source.channel_names[c] for c in ds.target_channels]
    std = None if ds.target_stats is None else ds.target_stats.safe_std
    return metrics_from_sums(sums["forecast"], names, std)


def main(argv=None):
    from dchag.training import pretrain, shutdown
    history = pretrain(model_provider, forward_step, datasets_provider, argv, non_loss_data_func=reconstruction_picture,
                       eval_metrics_func=forecast_metrics, loss_weight_func=loss_weight)
    shutdown(history)


if __name__ == "__main__":
    main()
