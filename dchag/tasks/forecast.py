"""Forecasting: latitude-weighted MSE over valid target pixels (replicated over the channel group)."""

from __future__ import annotations

import torch


def forecast_loss(pred: torch.Tensor, target: torch.Tensor, target_valid: torch.Tensor,
                  lat_weights: torch.Tensor) -> torch.Tensor:
    """pred, target [B, V, H, W]; target_valid bool [B, V, H, W]; lat_weights [B, H]."""
    w = target_valid.to(torch.float32) * lat_weights.to(torch.float32)[:, None, :, None]
    t = torch.where(target_valid, target, torch.zeros_like(target)).to(torch.float32)
    err = (pred.to(torch.float32) - t) ** 2 * w
    return err.sum() / w.sum().clamp_min(1e-12)
