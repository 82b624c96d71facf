"""What a model must beat on the held-out batches it is scored on.

MAE (loss over masked, valid pixels, normalized units):
- ``channel mean``: predict every hidden pixel as its channel's mean over the data (0 after
  normalization): the loss of knowing nothing about the tile;
- ``visible-pixel mean``: predict a hidden pixel as the mean of its channel's visible, valid
  pixels in the same tile: a local mean spectrum, what a model gets for free from the input.
Forecast (latitude-weighted MSE over valid target pixels, normalized units):
- ``persistence``: the target is the input (the state lead-time steps earlier);
- ``climatology``: the time-mean of the training period (no held-out step in it).

Each is scored with the training loss's sums on exactly the batches and masks evaluation uses,
pooled the same way: sum of weighted squared errors over the sum of weights, over every scored
sample (padding carries no weight).
"""

from __future__ import annotations

import torch

from dchag.tasks import forecast as fc
from dchag.tasks import mae, patch_mask
from dchag.tasks.mae import pixel_mask
from dchag.tasks.weather_metrics import metric_sums, metrics_from_sums


def _visible_mean(images, valid, hidden):
    """[B, C, H, W] -> per-sample, per-channel mean of visible valid pixels, broadcast to [B, C, H, W]."""
    w = (valid & ~hidden).to(images.dtype)
    mean = (images * w).sum((2, 3)) / w.sum((2, 3)).clamp_min(1.0)
    return mean[:, :, None, None].expand_as(images)


@torch.no_grad()
def baseline_losses(loader, cfg, task: str, mask_ratio: float, seed: int, target_channels=None,
                    target_names=None, target_std=None) -> dict:
    """{"<baseline>": {"val_loss": float, "metrics": {...}}} over every batch of ``loader``
    (a P = 1 evaluation loader over all channels)."""
    totals, sums = {}, {}
    for batch in loader:
        valid = batch["valid"]
        images = torch.where(valid, batch["images"], torch.zeros_like(batch["images"]))
        if task == "mae":
            mask = patch_mask(batch["index"], cfg.num_patches, mask_ratio, seed, 0)  # evaluation's masks
            hidden = pixel_mask(mask, cfg.grid, cfg.patch_dim).expand_as(images)
            preds = {"channel mean": torch.zeros_like(images),
                     "visible-pixel mean": _visible_mean(images, valid, hidden)}
            for name, pred in preds.items():
                totals[name] = totals.get(name, 0) + mae.error_sums(pred, images, valid, mask, cfg.grid,
                                                                    cfg.patch_dim).double()
        else:
            preds = {"persistence": images[:, list(target_channels)], "climatology": batch["climatology"]}
            for name, pred in preds.items():
                totals[name] = totals.get(name, 0) + fc.error_sums(pred, batch["target"], batch["target_valid"],
                                                                   batch["lat_weights"]).double()
                s = metric_sums(pred, batch["target"], batch["target_valid"], batch["lat_weights"],
                                batch["climatology"], batch["time_slot"], int(batch["time_slots"][0]))
                sums[name] = sums.get(name, 0) + s
    out = {}
    for name, total in totals.items():
        metrics = metrics_from_sums(sums[name], target_names, target_std) if name in sums else {}
        out[name] = {"val_loss": float(total[0] / total[1]) if total[1] > 0 else float("nan"), "metrics": metrics}
    return out
