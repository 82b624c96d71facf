"""Forecast skill at evaluation, per output variable: latitude-weighted RMSE (in the variable's
own units) and the anomaly correlation coefficient ACC against the series' climatology.

Both are pooled over every evaluated sample: each micro-batch contributes five sums per variable
(``metric_sums``), which add over micro-batches and data-parallel ranks; ``metrics_from_sums``
turns the totals into the figures. With weights w = valid x cos(lat), anomalies
a = pred - clim and b = target - clim (all normalized):

    RMSE_v = std_v * sqrt( sum w (pred - target)^2 / sum w )
    ACC_v  = sum w a b / sqrt( sum w a^2 * sum w b^2 )
"""

from __future__ import annotations

import math

import torch

NUM_SUMS = 5


def metric_sums(pred: torch.Tensor, target: torch.Tensor, target_valid: torch.Tensor, lat_weights: torch.Tensor,
                climatology: torch.Tensor) -> torch.Tensor:
    """pred, target, climatology [B, V, H, W]; target_valid bool [B, V, H, W]; lat_weights [B, H].
    Returns float64 [5, V]: sum w err^2, sum w, sum w a b, sum w a^2, sum w b^2."""
    w = target_valid.double() * lat_weights.double()[:, None, :, None]
    p, t, c = pred.double(), torch.where(target_valid, target, torch.zeros_like(target)).double(), climatology.double()
    a, b = p - c, t - c
    dims = (0, 2, 3)
    return torch.stack([(w * (p - t) ** 2).sum(dims), w.sum(dims), (w * a * b).sum(dims),
                        (w * a * a).sum(dims), (w * b * b).sum(dims)])


def metrics_from_sums(sums: torch.Tensor, names, std=None) -> dict[str, float]:
    """{"rmse/<name>": ..., "acc/<name>": ...} from summed ``metric_sums`` [5, V]; ``std`` [V]
    converts RMSE back to the variable's units (None: normalized units)."""
    out = {}
    for v, name in enumerate(names):
        se, w, ab, aa, bb = (float(x) for x in sums[:, v])
        scale = 1.0 if std is None else float(std[v])
        out[f"rmse/{name}"] = scale * math.sqrt(se / w) if w > 0 else float("nan")
        out[f"acc/{name}"] = ab / math.sqrt(aa * bb) if aa > 0 and bb > 0 else float("nan")
    return out
