"""Dense regression (``--task regress --target-path FILE``): K per-pixel target maps.

Targets are normalized per target with the training tiles' mean and std (dchag/data/targets.py).
Loss: the MSE over valid target values, in normalized units, pooled over the global batch in
training (every valid value weighs the same, as the loop's ``loss_weight`` pooling does) and over
every scored held-out sample in evaluation:

    loss = sum_{b,k,y,x} v (pred - t)^2 / sum v          v = 1 where the target is valid

Evaluation pools four additive sums per target over every held-out pixel (micro-batches and
data-parallel ranks add): n = sum v, S = sum v t, Q = sum v t^2, E = sum v (t - pred)^2. Then

    R^2_k  = 1 - E_k / (Q_k - S_k^2 / n_k)          (SS_tot around the held-out mean of target k)
    RMSE_k = std_k * sqrt(E_k / n_k)                (in the target's units)

R^2 is unchanged by the normalization (an affine map applied to target and prediction alike).
The baseline predicts each target's training mean everywhere (0 in normalized units): R^2 about 0.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from dchag.tasks.dense import DenseTask, with_grey

def error_sums(pred: torch.Tensor, target: torch.Tensor, target_valid: torch.Tensor) -> torch.Tensor:
    """[2]: (sum v (pred - t)^2, sum v) over a micro-batch's valid target values, fp32 at least.
    pred, target [B, K, H, W]; target_valid bool [B, K, H, W]."""
    dtype = torch.promote_types(pred.dtype, torch.float32)  # accumulate in fp32 at least (fp64 stays fp64)
    w = target_valid.to(dtype)
    t = torch.where(target_valid, target, torch.zeros_like(target)).to(dtype)
    return torch.stack([((pred.to(dtype) - t) ** 2 * w).sum(), w.sum()])


def regress_sums(pred: torch.Tensor, target: torch.Tensor, target_valid: torch.Tensor) -> torch.Tensor:
    """float64 [4, K]: n, sum t, sum t^2, sum (t - pred)^2 over the valid values of each target."""
    w = target_valid.double()
    t = torch.where(target_valid, target, torch.zeros_like(target)).double()
    dims = (0, 2, 3)
    return torch.stack([w.sum(dims), (w * t).sum(dims), (w * t * t).sum(dims),
                        (w * (t - pred.double()) ** 2).sum(dims)])


def regress_metrics(sums: torch.Tensor, names, std=None) -> dict[str, float]:
    """{"r2/<name>", "rmse/<name>"} from summed ``regress_sums`` [4, K]; ``std`` [K] converts the
    RMSE to target units (None: normalized units)."""
    out = {}
    for k, name in enumerate(names):
        n, s, q, e = (float(v) for v in sums[:, k])
        total = q - s * s / n if n > 0 else 0.0
        out[f"r2/{name}"] = 1.0 - e / total if total > 0 else float("nan")
        out[f"rmse/{name}"] = (1.0 if std is None else float(std[k])) * math.sqrt(e / n) if n > 0 else float("nan")
    return out


class RegressTask(DenseTask):
    name = "regress"
    prediction_title = "regression (targets 1, K/2, K)"
    metrics_caption = "Held-out R^2 and RMSE per target (mean over seeds; RMSE in the target's units):"

    def error_sums(self, pred, batch):
        return error_sums(pred, batch["target"], batch["target_valid"])

    def metric_sums(self, pred, batch):
        return regress_sums(pred, batch["target"], batch["target_valid"])

    def metrics_from_sums(self, sums, targets) -> dict:
        return regress_metrics(sums, targets.names, targets.stats.safe_std)

    def baseline_predictions(self, batch, targets) -> dict:
        return {"training mean": torch.zeros_like(batch["target"])}

    def display(self, pred, targets) -> np.ndarray:
        return denormalize(pred, targets.stats.safe_mean, targets.stats.safe_std).cpu().numpy()

    def picture_planes(self, names):
        return list(range(min(3, len(names))))  # the first 3 targets

    def colour_scale(self, tiles, plane, names) -> dict:
        """viridis over the 2nd-98th percentile of the shown tiles' targets."""
        ref = np.concatenate([np.ravel(t["target"][plane]) for t in tiles])
        lo, hi = np.nanpercentile(ref, [2, 98]) if np.isfinite(ref).any() else (0.0, 1.0)
        return dict(cmap=with_grey("viridis"), vmin=lo, vmax=hi if hi > lo else lo + 1)

    def display_target(self, batch, targets) -> np.ndarray:
        y = self.display(batch["target"].float(), targets)
        return np.where(batch["target_valid"].cpu().numpy(), y, np.nan)

    # ---- inference --------------------------------------------------------------------------
    def output_planes(self, cfg) -> int:
        return cfg.num_outputs

    def predict(self, model, x):
        return model.regress_tiles(x)

    def prediction_rgb(self, y, model, input_rgb):
        """Targets 1, K/2 and K as R, G, B, each spanning its training mean +- 2 std."""
        from dchag.data.visualize import band_limits, rgb_renderer
        K = y.shape[0]
        pick = [0, K // 2, K - 1]
        targets = model.config.get("targets") or {}
        stats = (targets["mean"], targets["std"]) if targets.get("mean") is not None else None
        return rgb_renderer(y, pick, band_limits(pick, *stats) if stats else None)(y)


def denormalize(pred: torch.Tensor, mean, std) -> torch.Tensor:
    """Normalized [B, K, H, W] -> target units, with the training tiles' per-target ``mean``, ``std`` [K]."""
    mean, std = (torch.as_tensor(np.asarray(a), dtype=pred.dtype, device=pred.device) for a in (mean, std))
    return pred * std[:, None, None] + mean[:, None, None]
