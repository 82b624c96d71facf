"""Forecasting: latitude-weighted MSE over valid target pixels (replicated over the channel group).

The loss is pooled: sum w (pred - target)^2 / sum w, with w = valid x cos(lat) / mean(cos(lat))
(``dchag.data.dataset.latitude_weights``), summed over every pixel of the global batch. A
micro-batch's share of the update is then what its pixels weigh: a micro-batch of polar tiles
counts less than one of equatorial tiles. Training gets there by dividing each micro-batch's
weighted error sum by the mean micro-batch weight of the global batch (``normalizer``, from
``loss_weight`` summed over micro-batches and data-parallel ranks before the forward; DeepSpeed
then averages over both), evaluation by adding the sums (``error_sums``).
"""

from __future__ import annotations

import torch


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
