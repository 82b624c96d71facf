"""Forecasting: latitude-weighted MSE over valid target pixels (replicated over the channel group).

The loss is pooled: sum w (pred - target)^2 / sum w, with w = valid x the row's latitude weight
(WeatherBench 2's cell area or cos(lat), ``--lat-weighting``, over its mean over the whole grid:
``dchag.data.dataset.latitude_axis_weights``), summed over every pixel of the global batch (the
padding of tiles past the grid's edge is invalid: weight 0, so every pixel counts once). A
micro-batch's share of the update is then what its pixels weigh: a micro-batch of polar tiles
counts less than one of equatorial tiles. Training gets there by dividing each micro-batch's
weighted error sum by the mean micro-batch weight of the global batch (``normalizer``, from
``loss_weight`` summed over micro-batches and data-parallel ranks before the forward; DeepSpeed
then averages over both), evaluation by adding the sums (``error_sums``).

``ForecastTask`` (below) is the task object: forward step, the weather metrics
(weather_metrics.py), the persistence and climatology baselines, the forecast maps, export and
prediction.
"""

from __future__ import annotations

import torch

from dchag.parallel.comm import reduce_from_channel_parallel_region
from dchag.tasks.base import Task, baseline_keys, pictured_methods, valid_images
from dchag.tasks.weather_metrics import metric_sums, metrics_from_sums


def _weights(target_valid: torch.Tensor, lat_weights: torch.Tensor, dtype) -> torch.Tensor:
    """[B, V, H, W]: valid x latitude weight of the row."""
    return target_valid.to(dtype) * lat_weights.to(dtype)[:, None, :, None]


def error_sums(pred: torch.Tensor, target: torch.Tensor, target_valid: torch.Tensor,
               lat_weights: torch.Tensor) -> torch.Tensor:
    """[2]: (sum w (pred - target)^2, sum w) of a micro-batch, in fp32 at least (fp64 stays fp64).
    pred, target [B, V, H, W]; target_valid bool [B, V, H, W]; lat_weights [B, H]."""
    dtype = torch.promote_types(pred.dtype, torch.float32)
    w = _weights(target_valid, lat_weights, dtype)
    t = torch.where(target_valid, target, torch.zeros_like(target)).to(dtype)
    return torch.stack([((pred.to(dtype) - t) ** 2 * w).sum(), w.sum()])


def forecast_loss(pred: torch.Tensor, target: torch.Tensor, target_valid: torch.Tensor,
                  lat_weights: torch.Tensor, normalizer: torch.Tensor | float | None = None) -> torch.Tensor:
    """sum w (pred - target)^2 over ``normalizer`` (default: this micro-batch's own sum w).
    pred, target [B, V, H, W]; target_valid bool [B, V, H, W]; lat_weights [B, H]."""
    s = error_sums(pred, target, target_valid, lat_weights)
    denominator = s[1] if normalizer is None else torch.as_tensor(normalizer, dtype=s.dtype, device=s.device)
    return s[0] / denominator.clamp_min(1e-12)


def loss_weight(batch: dict) -> torch.Tensor:
    """float64 []: a micro-batch's total loss weight, sum w over its valid target pixels."""
    return _weights(batch["target_valid"], batch["lat_weights"], torch.float64).sum()


class ForecastTask(Task):
    """The state --lead-time steps ahead from the state now (dense head over the predicted
    channels, lead-time conditioning); latitude-weighted MSE, RMSE and ACC per variable."""

    name = "forecast"
    picture_file = "forecast_maps.png"
    prediction_title = "forecast"
    metrics_caption = "Forecast skill on the held-out period (mean over seeds; RMSE in the variable's units, " \
                      "latitude-weighted):"

    def forward_step(self, model, batch, args, cfg, iteration: int):
        """The loss of one micro-batch, divided by ``batch["loss_normalizer"]`` when the loop set it
        (``loss_weight``). At evaluation (iteration -1) also the sums the evaluation pools over every
        scored sample: ``loss_sums`` (the loss's numerator and weight) and the per-time sums behind
        each variable's RMSE and ACC."""
        images = valid_images(batch)
        lead = torch.full((images.shape[0],), float(args.lead_time), device=images.device)
        pred = model(images, lead_time=lead)
        if iteration >= 0:
            return forecast_loss(pred, batch["target"], batch["target_valid"], batch["lat_weights"],
                                 batch.get("loss_normalizer"))
        sums = error_sums(pred, batch["target"], batch["target_valid"], batch["lat_weights"])
        stats = {"loss_sums": sums}
        if "climatology" in batch:
            stats["forecast"] = metric_sums(pred, batch["target"], batch["target_valid"], batch["lat_weights"],
                                            batch["climatology"], batch["time_slot"], int(batch["time_slots"][0]))
        return sums[0] / sums[1].clamp_min(1e-12), stats

    def loss_weight(self, batch: dict) -> torch.Tensor:
        return loss_weight(batch)

    def metrics(self, sums: dict, args, valid_factory) -> dict:
        """Per output variable: latitude-weighted RMSE (in the variable's units) and ACC, as
        WeatherBench 2 defines them (dchag/tasks/weather_metrics.py)."""
        if "forecast" not in sums:
            return {}
        ds = valid_factory.dataset
        names = [ds.source.channel_names[c] for c in ds.target_channels]
        std = None if ds.target_stats is None else ds.target_stats.safe_std
        return metrics_from_sums(sums["forecast"], names, std)

    def baseline_stats(self, batch, args, cfg, heldout) -> dict:
        """- ``persistence``: the target is the input (the state lead-time steps earlier);
        - ``climatology``: the time-mean of the training period (no held-out step in it).
        Scored with the training loss's sums and the metrics' sums on exactly the pixels evaluation
        scores. A rank holds the input of its own channels only: each scores persistence on the
        target channels it holds, summed over the channel group (collective)."""
        if "climatology" not in batch:  # not the held-out split
            return {}
        images = valid_images(batch)
        target, target_valid, lat = batch["target"], batch["target_valid"], batch["lat_weights"]
        channels, targets = heldout.channels, list(heldout.target_channels)
        held = torch.tensor([c in channels for c in targets], device=target.device)  # [V]
        persistence = torch.stack([images[:, c - channels.start] if c in channels else torch.zeros_like(target[:, 0])
                                   for c in targets], dim=1)
        slot, slots = batch["time_slot"], int(batch["time_slots"][0])
        own = target_valid & held[None, :, None, None]
        out = baseline_keys("persistence", {
            "loss_sums": reduce_from_channel_parallel_region(error_sums(persistence, target, own, lat).double()),
            "forecast": reduce_from_channel_parallel_region(
                metric_sums(persistence, target, own, lat, batch["climatology"], slot, slots))})
        clim = batch["climatology"]
        out.update(baseline_keys("climatology", {
            "loss_sums": error_sums(clim, target, target_valid, lat).double(),
            "forecast": metric_sums(clim, target, target_valid, lat, clim, slot, slots)}))
        return out

    def picture_arrays(self, model, valid_factory, args, cfg, max_tiles: int) -> dict:
        """The first held-out sample's first target variable: target and prediction (normalized)."""
        from dchag.device import run_device as comm_device, to_device
        ds = valid_factory.dataset
        batch = to_device(next(iter(valid_factory())), comm_device())
        images = valid_images(batch)
        lead = torch.full((images.shape[0],), float(args.lead_time), device=images.device)
        with torch.no_grad():
            pred = model(images, lead_time=lead)[0, 0].float().cpu()
        target = torch.where(batch["target_valid"][0, 0], batch["target"][0, 0], torch.nan).float().cpu()
        if "in_image" in batch:  # a tile's padding past the grid's edge: nothing there
            pred = torch.where(batch["in_image"][0].cpu(), pred, torch.nan)
        names = ds.source.channel_names
        return {"variable": names[ds.target_channels[0]], "target": target.numpy(), "prediction": pred.numpy(),
                "index": int(batch["index"][0])}

    def report_picture(self, results: dict, output_dir: str) -> str | None:
        """Rows: methods; columns: target | prediction | error, one variable, first held-out sample."""
        import os

        import matplotlib
        import numpy as np
        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
        pics, methods = results["pictures"], pictured_methods(results)
        if not methods:
            return None
        path = os.path.join(output_dir, self.picture_file)
        first = pics[methods[0]["spec"]]
        lo, hi = np.nanpercentile(first["target"], [2, 98])
        err_max = max(np.nanmax(np.abs(pics[m["spec"]]["prediction"] - pics[m["spec"]]["target"])) for m in methods)
        fig, axes = plt.subplots(len(methods), 3, figsize=(9, 2.2 * len(methods) + 0.4), squeeze=False)
        for i, m in enumerate(methods):
            p = pics[m["spec"]]
            for j, (name, x, kw) in enumerate((("target", p["target"], dict(vmin=lo, vmax=hi, cmap="viridis")),
                                               ("prediction", p["prediction"], dict(vmin=lo, vmax=hi, cmap="viridis")),
                                               ("error", p["prediction"] - p["target"],
                                                dict(vmin=-err_max, vmax=err_max, cmap="RdBu_r")))):
                im = axes[i, j].imshow(x, interpolation="nearest", **kw)
                axes[i, j].set_xticks([])
                axes[i, j].set_yticks([])
                axes[i, j].set_title(f"{m['label']}: {name}" if j else f"{m['label']}: {name}", fontsize=8)
                fig.colorbar(im, ax=axes[i, j], fraction=0.03)
        fig.suptitle(f"{first['variable']} (normalized), held-out sample {first['index']}, first seed", fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path

    def export_fields(self, args, normalization) -> dict:
        return {"lead_time": getattr(args, "lead_time", None)}

    def output_planes(self, cfg) -> int:
        return len(cfg.predicted_channels)

    def predict_tiles(self, model, x, index, options: dict):
        return model.forecast_tiles(x, lead_time=options.get("lead_time"))  # NaN where the input was invalid

    def prediction_rgb(self, y, model, input_rgb):
        """Every channel forecast: the input's colours and stretch; fewer: three of them, with those
        channels' statistics."""
        from dchag.data.visualize import band_limits, rgb_renderer
        if y.shape[0] == model.cfg.num_channels:
            return input_rgb(y)
        out_ch = list(model.cfg.predicted_channels)
        pick = [min(y.shape[0] - 1, c) for c in (0, y.shape[0] // 2, y.shape[0] - 1)]
        limits = band_limits([out_ch[p] for p in pick], model.mean, model.std) if model.mean is not None else None
        return rgb_renderer(y, pick, limits)(y)

    def held_out(self, args) -> str:
        return f"the last {args.valid_fraction:.0%} of the time steps held out, lead time {args.lead_time}"

    def describe_split(self, valid) -> str:
        t = valid.times
        return (f"held-out split (later in time): inputs at time steps {t.start}..{t.stop - 1} of "
                f"{valid.source.shape[0]} (targets {valid.lead_time} step(s) later); every training target "
                "precedes them")
