"""Semantic segmentation (``--task segment --target-path FILE --num-classes K``): a per-pixel class map.

The dense head gives K logits per pixel. Loss: the cross-entropy over valid pixels (not NaN, not
--ignore-index), pooled over the global batch in training and over every scored held-out sample
in evaluation:

    loss = - sum_{b,y,x} v log softmax(logits)[target] / sum v

Evaluation pools a confusion matrix M [K, K] (rows: true class, columns: predicted = argmax of
the logits) over every held-out valid pixel (micro-batches and data-parallel ranks add). Then

    accuracy = trace(M) / sum(M)
    IoU_k    = M_kk / (sum_j M_kj + sum_i M_ik - M_kk)
    mIoU     = the mean of IoU_k over the classes that occur in the targets or the predictions

The baseline predicts the training class frequencies p everywhere (logits log p): its loss is the
cross-entropy of the class prior, its map the training majority class.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from dchag.tasks.dense import DenseTask, with_grey


def error_sums(logits: torch.Tensor, target: torch.Tensor, target_valid: torch.Tensor) -> torch.Tensor:
    """[2]: (the summed cross-entropy, the number of valid pixels) of a micro-batch, fp32 at least.
    logits [B, K, H, W]; target int64 [B, H, W]; target_valid bool [B, H, W]."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    labels = torch.where(target_valid, target, torch.full_like(target, -100))
    ce = F.cross_entropy(logits.to(dtype), labels, ignore_index=-100, reduction="sum")
    return torch.stack([ce, target_valid.sum().to(dtype)])


def confusion_matrix(logits: torch.Tensor, target: torch.Tensor, target_valid: torch.Tensor) -> torch.Tensor:
    """float64 [K, K]: pixels of true class i predicted as class j (argmax), over valid pixels."""
    K = logits.shape[1]
    pred = logits.argmax(dim=1)
    idx = (target * K + pred)[target_valid]
    return torch.bincount(idx, minlength=K * K).reshape(K, K).double()


def segment_metrics(confusion: torch.Tensor) -> dict[str, float]:
    """{"accuracy", "miou"} from a summed confusion matrix [K, K]."""
    m = confusion.double()
    total = float(m.sum())
    tp = torch.diagonal(m)
    union = m.sum(0) + m.sum(1) - tp
    present = union > 0
    return {"accuracy": float(tp.sum()) / total if total > 0 else float("nan"),
            "miou": float((tp[present] / union[present]).mean()) if present.any() else float("nan")}


class SegmentTask(DenseTask):
    name = "segment"
    prediction_title = "classes"
    metrics_caption = "Held-out overall accuracy and mean IoU (mean over seeds):"

    def error_sums(self, pred, batch):
        return error_sums(pred, batch["target"], batch["target_valid"])

    def metric_sums(self, pred, batch):
        return confusion_matrix(pred, batch["target"], batch["target_valid"])

    def metrics_from_sums(self, sums, targets) -> dict:
        return segment_metrics(sums)

    def baseline_predictions(self, batch, targets) -> dict:
        prior = torch.as_tensor(targets.class_counts, dtype=torch.float64, device=batch["target"].device)
        logits = (prior / prior.sum()).clamp_min(1e-12).log().float()  # [K]
        B, (H, W) = batch["target"].shape[0], batch["target"].shape[1:]
        return {"training class prior (majority class)": logits[None, :, None, None].expand(B, -1, H, W)}

    def display(self, pred, targets) -> np.ndarray:
        return pred.argmax(dim=1).float().cpu().numpy()

    def picture_planes(self, names):
        return [None]  # the class map

    def colour_scale(self, tiles, plane, names) -> dict:
        K = len(names)
        return dict(cmap=class_colours(K), vmin=-0.5, vmax=K - 0.5)

    def display_target(self, batch, targets) -> np.ndarray:
        return np.where(batch["target_valid"].cpu().numpy(), batch["target"].cpu().numpy(), np.nan)

    # ---- inference --------------------------------------------------------------------------
    def output_planes(self, cfg) -> int:
        return 1

    def prediction_rgb(self, y, model, input_rgb):
        """Each class its colour (as in the training pictures), pixels without a class grey."""
        K = model.cfg.num_outputs
        return class_colours(K)(np.ma.masked_invalid(np.asarray(y[0], np.float64)).astype(np.int64))[..., :3]

    def stitch_planes(self, cfg) -> int:
        return cfg.num_outputs  # the class probabilities are blended, then the most probable class taken

    def predict(self, model, x):
        """[B, K, h, w] float32: the class probabilities, NaN where the input pixel holds no valid value."""
        return model.segment_tiles(x, return_probabilities=True)

    def finish_stitched(self, block):
        """[K, rows, W] blended probabilities -> [1, rows, W]: the class index (float), NaN where none."""
        empty = np.isnan(block).all(axis=0)
        classes = np.nan_to_num(block, nan=-1.0).argmax(axis=0).astype(np.float32)
        return np.where(empty, np.nan, classes)[None]

def class_colours(num_classes: int):
    """One colour per class (tab10, tab20 beyond 10 classes), NaN / masked grey."""
    return with_grey("tab20" if num_classes > 10 else "tab10", num_classes)
