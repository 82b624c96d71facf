"""Forecasting: latitude-weighted MSE over valid target pixels (replicated over the channel group)."""

from __future__ import annotations

import torch


def forecast_loss(pred: torch.Tensor, target: torch.Tensor, target_valid: torch.Tensor,
                  lat_weights: torch.Tensor) -> torch.Tensor:
    """pred, target [B, V, H, W]; target_valid bool [B, V, H, W]; lat_weights [B, H]."""
    dtype = torch.promote_types(pred.dtype, torch.float32)  # accumulate in fp32 at least (fp64 stays fp64)
    w = target_valid.to(dtype) * lat_weights.to(dtype)[:, None, :, None]
    t = torch.where(target_valid, target, torch.zeros_like(target)).to(dtype)
    err = (pred.to(dtype) - t) ** 2 * w
    return err.sum() / w.sum().clamp_min(1e-12)
