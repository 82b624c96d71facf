"""The interface every task implements, and what tasks share.

A task is a stateless object (``dchag.tasks.get_task(name)``); its callers:

    prepare_args(args)                    the run's loop, before the model is built: check the task's
                                          flags, set ``args.num_outputs`` (the dense head's planes)
    forward_step(model, batch, args, cfg, iteration)
                                          pretrain_dchag.py: the loss of one micro-batch; at evaluation
                                          (iteration -1) (loss, {"loss_sums": [error, weight], name: sums}),
                                          additive over micro-batches and DP ranks
    loss_weight(batch)                    the micro-batch's weight in a loss pooled over the global batch
    metrics(sums, args, valid_factory)    the figures behind the validation line (rmse/..., r2/..., miou)
    baseline_stats(batch, args, cfg, heldout)
                                          the trivial predictors' evaluation statistics of one held-out
                                          micro-batch, under baseline/<name>/<key> (additive like the
                                          model's; the loop adds them at every evaluation, on the same
                                          pixels: the validation line's baselines and TensorBoard's
                                          baseline/<name>)
    baselines(loader, cfg, args)          tools/parity.py: the same, over every batch of a loader
    baseline_figures(sums, args, valid_factory)
                                          {name: {"val_loss", "metrics"}} from summed baseline statistics
    picture(model, valid_factory, args, cfg, iteration, out_dir)
                                          after training: a PNG of held-out tiles (collective; rank 0 writes)
    picture_arrays(...) / report_picture(results, output_dir)
                                          tools/parity.py: the same pictures, one row per method
    export_fields(args, normalization)    what the export's config.json needs (mask ratio, lead time, targets)
    output_planes(cfg) / predict_tiles(model, x, index, options) / stitch_planes(cfg) / finish_stitched(block)
                                          tools/predict.py: [B, planes, h, w] in data or target units per
                                          tile, blended where tiles overlap, then the output
    predict_plan(model, options)          tools/predict.py: a line on how it predicts (MAE: the masks)
    prediction_title / prediction_rgb(y, model, input_rgb)
                                          tools/predict.py --picture: the output panel
    held_out(args) / describe_split(valid)
                                          the start-up summary's and the parity report's split sentence
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch

BASELINE = "baseline/"  # evaluation statistics of a baseline: baseline/<name>/<key> (key as the model's)


class Task:
    name = "?"
    needs_target_path = False
    picture_file: str | None = None  # tools/parity.py's picture of the held-out predictions
    metrics_caption = "Held-out metrics (mean over seeds):"  # tools/parity.py's heading of the metric table
    prediction_title = "prediction"  # tools/predict.py --picture: the output panel's title

    # ---- arguments ------------------------------------------------------------------------
    def prepare_args(self, args) -> None:
        """Refuse flags this task does not read; set ``args.num_outputs`` (dchag/tasks/flags.py:
        torch-free, so that the pre-flight runs it before any heavy import)."""
        from dchag.tasks.flags import prepare_args
        prepare_args(args, self.name)

    # ---- training and evaluation ----------------------------------------------------------
    def forward_step(self, model, batch, args, cfg, iteration: int):
        raise NotImplementedError

    def loss_weight(self, batch: dict):
        """float64 []: a micro-batch's loss weight, with which the loop pools the training loss over
        the global batch (``batch["loss_normalizer"]``); None: the loss is the micro-batch's mean."""
        return None

    def metrics(self, sums: dict, args, valid_factory) -> dict:
        return {}

    def baseline_stats(self, batch: dict, args, cfg, heldout) -> dict:
        """The baselines' statistics of one held-out micro-batch (``heldout``: the held-out
        TileDataset of this rank's channels): ``baseline_keys(name, {"loss_sums": [2], <the model's
        metric sums>})`` per baseline, summed over micro-batches and data-parallel ranks as the
        model's are. Collective over the channel group where a baseline needs other ranks' channels."""
        return {}

    def baseline_figures(self, sums: dict, args, valid_factory) -> dict:
        """{"<baseline>": {"val_loss": float, "metrics": {...}}} from summed evaluation statistics:
        the pooled loss and the task's own metrics of each baseline."""
        return {name: {"val_loss": pooled_loss(s["loss_sums"]), "metrics": self.metrics(s, args, valid_factory)}
                for name, s in split_baselines(sums).items()}

    @torch.no_grad()
    def baselines(self, loader, cfg, args) -> dict:
        """``baseline_figures`` over every batch of ``loader`` (a P = 1 evaluation loader over all
        channels; ``loader.dataset`` is the held-out split), pooled as evaluation pools them
        (padding carries no weight)."""
        heldout = heldout_dataset(loader)
        sums = {}
        for batch in loader:
            for key, value in self.baseline_stats(batch, args, cfg, heldout).items():
                sums[key] = sums.get(key, 0) + value.double()
        return self.baseline_figures(sums, args, SimpleNamespace(dataset=heldout))

    # ---- pictures -------------------------------------------------------------------------
    def picture(self, model, valid_factory, args, cfg, iteration: int, out_dir: str | None) -> str | None:
        return None

    def picture_arrays(self, model, valid_factory, args, cfg, max_tiles: int) -> dict:
        return {}

    def report_picture(self, results: dict, output_dir: str) -> str | None:
        return None

    # ---- export and inference -------------------------------------------------------------
    def export_fields(self, args, normalization: dict | None) -> dict:
        return {}

    def output_planes(self, cfg) -> int:
        raise NotImplementedError

    def predict_tiles(self, model, x, index, options: dict):
        """[B, C, h, w] raw tiles -> [B, stitch_planes, h, w] (a :class:`PretrainedDChag` ``model``):
        what neighbouring tiles' outputs are blended over."""
        raise NotImplementedError

    def stitch_planes(self, cfg) -> int:
        """Planes of :meth:`predict_tiles`, blended where tiles overlap (default: the output's)."""
        return self.output_planes(cfg)

    def finish_stitched(self, block):
        """Blended [stitch_planes, rows, W] -> the output [output_planes, rows, W] (default: as it is)."""
        return block

    def predict_plan(self, model, options: dict) -> str | None:
        """tools/predict.py: one line saying how the prediction will be made, or None."""
        return None

    def prediction_rgb(self, y, model, input_rgb):
        """tools/predict.py --picture: one image's output [planes, H, W] as RGB [H, W, 3];
        ``input_rgb`` renders C channels with the input panel's colours and stretch."""
        raise NotImplementedError

    # ---- descriptions ---------------------------------------------------------------------
    def held_out(self, args) -> str:
        return f"the last {args.valid_fraction:.0%} of the tiles held out"

    def describe_split(self, valid) -> str:
        s = valid.samples
        return (f"held-out split (spatial): the last {len(s)} of {s.stop} tiles in storage order (samples "
                f"{s.start}..{s.stop - 1}; image-major, then tile row, then tile column), none seen in training")


def baseline_keys(name: str, stats: dict) -> dict:
    """A baseline's statistics under the keys evaluation sums: ``baseline/<name>/<key>``."""
    return {f"{BASELINE}{name}/{key}": value for key, value in stats.items()}


def split_baselines(sums: dict) -> dict[str, dict]:
    """{name: {key: summed statistics}} of the baselines in summed evaluation statistics, in order."""
    out: dict[str, dict] = {}
    for key, value in sums.items():
        if key.startswith(BASELINE):
            name, part = key[len(BASELINE):].rsplit("/", 1)
            out.setdefault(name, {})[part] = value
    return out


def pooled_loss(loss_sums) -> float:
    """A loss pooled from its sums [numerator, weight]: numerator / weight (NaN for no weight)."""
    return float(loss_sums[0] / loss_sums[1]) if float(loss_sums[1]) > 0 else math.nan


def baseline_losses(sums: dict) -> dict[str, float]:
    """{name: pooled loss} of every baseline in summed evaluation statistics."""
    return {name: pooled_loss(s["loss_sums"]) for name, s in split_baselines(sums).items() if "loss_sums" in s}


def valid_images(batch: dict) -> torch.Tensor:
    """The batch's images with invalid values zero-filled (= the channel mean after normalization)."""
    return torch.where(batch["valid"], batch["images"], torch.zeros_like(batch["images"]))


def heldout_dataset(loader):
    """The TileDataset behind an evaluation loader (``build_eval_loader`` wraps it in ``PaddedEval``)."""
    ds = loader.dataset
    return getattr(ds, "dataset", ds)


def pictured_methods(results: dict) -> list[dict]:
    """The methods of a parity study whose first seed left pictures (``results["pictures"]``)."""
    pics = results["pictures"]
    return [m for m in results["methods"].values() if m["spec"] in pics]
