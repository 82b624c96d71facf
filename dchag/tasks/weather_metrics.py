"""Forecast skill at evaluation, per output variable, as WeatherBench 2 defines it: the
latitude-weighted RMSE (in the variable's own units) and the anomaly correlation ACC.

Both are per forecast time first, over the whole globe, then averaged over the held-out times.
A time step's globe may be cut into tiles that land in different micro-batches and
data-parallel ranks, so each micro-batch contributes five sums per (held-out time, variable)
(``metric_sums``, [T, 5, V]); they add over micro-batches and ranks, and ``metrics_from_sums``
turns the totals into the figures. With weights w = valid x the row's latitude weight (``--lat-weighting``:
WB2's cell area by default, or cos(lat); mean 1 over the whole grid; 0 on the padding of tiles
past the grid's edge, so every grid point counts once) and the
anomalies a = pred - clim, b = target - clim (all normalized), per time t:

    MSE_t = sum_t w (pred - target)^2 / sum_t w
    ACC_t = sum_t w a b / sqrt( sum_t w a^2 * sum_t w b^2 )
    RMSE_v = std_v * sqrt( mean_t MSE_t )        (WB2's RMSE: the square root of the time-mean MSE)
    ACC_v  = mean_t ACC_t

The ACC is **not centred**: the anomalies are taken against the climatology (the time-mean of
the training period, ``TileDataset.climatology``) and their spatial mean is not removed, as in
WeatherBench 2 (``metrics.ACC``). ClimaX's ``lat_weighted_acc`` centres them (it subtracts the
anomalies' mean over the batch) and pools over the batch instead of per time; WB2's is the one
computed here. WB2's climatology is per day of year and hour; ours is one time-mean map.
Times with no valid target pixel are left out of the means.
"""

from __future__ import annotations

import math

import torch

NUM_SUMS = 5


def metric_sums(pred: torch.Tensor, target: torch.Tensor, target_valid: torch.Tensor, lat_weights: torch.Tensor,
                climatology: torch.Tensor, time_slot: torch.Tensor | None = None, num_slots: int = 1) -> torch.Tensor:
    """pred, target, climatology [B, V, H, W]; target_valid bool [B, V, H, W]; lat_weights [B, H];
    time_slot int [B] (which held-out time each sample belongs to, in [0, num_slots); None: all
    in slot 0). Returns float64 [num_slots, 5, V]: per time, sum w err^2, sum w, sum w a b,
    sum w a^2, sum w b^2."""
    w = target_valid.double() * lat_weights.double()[:, None, :, None]
    p, t, c = pred.double(), torch.where(target_valid, target, torch.zeros_like(target)).double(), climatology.double()
    a, b = p - c, t - c
    dims = (2, 3)
    per_sample = torch.stack([(w * (p - t) ** 2).sum(dims), w.sum(dims), (w * a * b).sum(dims),
                              (w * a * a).sum(dims), (w * b * b).sum(dims)], dim=1)  # [B, 5, V]
    slots = torch.zeros(p.shape[0], dtype=torch.long, device=p.device) if time_slot is None else time_slot.long()
    out = per_sample.new_zeros(int(num_slots), NUM_SUMS, p.shape[1])
    return out.index_add_(0, slots, per_sample)


def metrics_from_sums(sums: torch.Tensor, names, std=None) -> dict[str, float]:
    """{"rmse/<name>": ..., "acc/<name>": ...} from summed ``metric_sums`` ([T, 5, V], or [5, V] for
    one time); ``std`` [V] converts RMSE back to the variable's units (None: normalized units)."""
    sums = sums.double().cpu()
    if sums.dim() == 2:
        sums = sums[None]
    out = {}
    for v, name in enumerate(names):
        se, w, ab, aa, bb = sums[:, :, v].unbind(1)  # each [T]
        scale = 1.0 if std is None else float(std[v])
        timed = w > 0
        out[f"rmse/{name}"] = scale * math.sqrt(float((se[timed] / w[timed]).mean())) if timed.any() else float("nan")
        correlated = timed & (aa > 0) & (bb > 0)
        out[f"acc/{name}"] = float((ab[correlated] / torch.sqrt(aa[correlated] * bb[correlated])).mean()) \
            if correlated.any() else float("nan")
    return out
