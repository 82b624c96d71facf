"""What the dense per-pixel tasks (regress, segment) share: their targets (``--target-path``, read
by dchag/data/targets.py, tile-aligned with the input), the forward step, the baselines loop, the
held-out pictures and the file prediction. The model's dense head is replicated on every rank
([B, K, H, W]), so losses and metric sums need no channel-group reduction."""

from __future__ import annotations

import os

import numpy as np
import torch

from dchag.tasks.base import Task, heldout_dataset, pictured_methods, valid_images

PICTURE_TARGETS = 3  # regress pictures show the first 3 targets


class DenseTask(Task):
    needs_target_path = True
    picture_file = "dense_maps.png"

    # ---- what a subclass defines ----------------------------------------------------------
    def error_sums(self, pred: torch.Tensor, batch: dict) -> torch.Tensor:
        """[2]: the loss's numerator and weight (the number of valid target values) of a micro-batch."""
        raise NotImplementedError

    def metric_sums(self, pred: torch.Tensor, batch: dict) -> torch.Tensor:
        raise NotImplementedError

    def metrics_from_sums(self, sums: torch.Tensor, targets) -> dict:
        raise NotImplementedError

    def baseline_predictions(self, batch: dict, targets) -> dict:
        """{name: prediction like the model's output} for the held-out ``batch``."""
        raise NotImplementedError

    def num_outputs(self, args, targets) -> int:
        raise NotImplementedError

    def display(self, pred: torch.Tensor, targets) -> np.ndarray:
        """The model's output [B, K, H, W] (normalized / logits) as pictures show it."""
        raise NotImplementedError

    def display_target(self, batch: dict, targets) -> np.ndarray:
        raise NotImplementedError

    # ---- arguments ------------------------------------------------------------------------
    def prepare_args(self, args) -> None:
        """The target file must exist and fit the input (image count and sizes); K = its maps
        (regress) or --num-classes (segment). Values are checked when the datasets are built."""
        from dchag.data.build import open_data_source
        from dchag.data.targets import open_targets
        data = open_data_source(args.data_path, args.data_format, task=self.name, img_h=args.img_h, img_w=args.img_w,
                                num_channels=args.num_channels, seed=args.seed)
        targets = open_targets(args.target_path, data, kind=self.name, num_classes=getattr(args, "num_classes", None),
                               ignore_index=getattr(args, "ignore_index", 255))
        args.num_outputs = self.num_outputs(args, targets)

    # ---- training and evaluation ----------------------------------------------------------
    def forward_step(self, model, batch, args, cfg, iteration: int):
        """The loss of one micro-batch, over ``batch["loss_normalizer"]`` when the loop pools it over
        the global batch (``loss_weight``); at evaluation also ``loss_sums`` and the metric sums."""
        pred = model(valid_images(batch))  # [B, K, H, W]
        sums = self.error_sums(pred, batch)
        if iteration >= 0:
            normalizer = batch.get("loss_normalizer")
            denominator = sums[1] if normalizer is None else normalizer.to(sums.dtype)
            return sums[0] / denominator.clamp_min(1.0)
        return sums[0] / sums[1].clamp_min(1.0), {"loss_sums": sums, self.name: self.metric_sums(pred, batch)}

    def loss_weight(self, batch: dict) -> torch.Tensor:
        """float64 []: the micro-batch's valid target values (every one weighs the same)."""
        return batch["target_valid"].sum().to(torch.float64)

    def metrics(self, sums: dict, args, valid_factory) -> dict:
        return self.metrics_from_sums(sums[self.name], valid_factory.dataset.targets)

    @torch.no_grad()
    def baselines(self, loader, cfg, args) -> dict:
        """Scored with the loss's sums and the metrics on exactly the batches evaluation uses, pooled
        the same way (padding carries no weight)."""
        targets = heldout_dataset(loader).targets
        totals, sums = {}, {}
        for batch in loader:
            for name, pred in self.baseline_predictions(batch, targets).items():
                totals[name] = totals.get(name, 0) + self.error_sums(pred, batch).double()
                sums[name] = sums.get(name, 0) + self.metric_sums(pred, batch)
        return {name: {"val_loss": float(total[0] / total[1]) if total[1] > 0 else float("nan"),
                       "metrics": self.metrics_from_sums(sums[name], targets)} for name, total in totals.items()}

    # ---- pictures -------------------------------------------------------------------------
    @torch.no_grad()
    def picture_arrays(self, model, valid_factory, args, cfg, max_tiles: int) -> dict:
        """Up to ``max_tiles`` distinct held-out tiles, whole on every rank: {"tiles": [{"index",
        "input" [3, H, W] false colour, "target", "prediction"}], "names", "kind", "rgb"}; target
        and prediction in target units (regress [K, H, W]) or classes (segment [H, W]), NaN where
        invalid. Collective: every rank of the model calls it."""
        from dchag.data.visualize import rgb_channels
        from dchag.parallel.comm import reduce_from_channel_parallel_region
        from dchag.training.logging_utils import comm_device
        from dchag.training.loop import to_device
        ds = valid_factory.dataset
        rgb = rgb_channels(cfg.num_channels, ds.source.wavelengths)
        tiles, seen = [], set()
        for batch in valid_factory():
            batch = to_device(batch, comm_device())
            images = valid_images(batch)
            pred = self.display(model(images).float(), ds.targets)
            target = self.display_target(batch, ds.targets)
            planes = images.new_zeros(images.shape[0], len(rgb), cfg.img_h, cfg.img_w, dtype=torch.float32)
            for k, c in enumerate(rgb):  # the rank's own channels, summed over the channel group
                if c in ds.channels:
                    planes[:, k] = torch.where(batch["valid"][:, c - ds.channels.start],
                                               images[:, c - ds.channels.start].float(), torch.nan)
            planes = reduce_from_channel_parallel_region(planes).cpu().numpy()
            for i in range(images.shape[0]):
                index = int(batch["index"][i])
                if len(tiles) < max_tiles and bool(batch["scored"][i]) and index not in seen:  # not padding
                    tiles.append({"index": index, "input": planes[i], "target": target[i], "prediction": pred[i]})
                    seen.add(index)
            if len(tiles) >= max_tiles:
                break
        return {"tiles": tiles, "names": list(ds.targets.names), "kind": self.name, "rgb": rgb}

    def picture(self, model, valid_factory, args, cfg, iteration: int, out_dir: str | None) -> str | None:
        import torch.distributed as dist
        if out_dir is None or len(valid_factory.dataset) == 0:
            return None
        pics = self.picture_arrays(model, valid_factory, args, cfg, max_tiles=8)
        if dist.is_initialized() and dist.get_rank() != 0:
            return None
        os.makedirs(out_dir, exist_ok=True)  # --load FINISHED --save NEW: nothing was saved into NEW yet
        path = os.path.join(out_dir, f"{self.name}_iter_{iteration:07d}.png")
        save_dense_grid(path, pics, [("prediction", [t["prediction"] for t in pics["tiles"]])],
                        f"{self.name}: held-out tiles at iteration {iteration}")
        print(f"> saved target and prediction of {len(pics['tiles'])} held-out tiles {path}", flush=True)
        return path

    def report_picture(self, results: dict, output_dir: str) -> str | None:
        pics, methods = results["pictures"], pictured_methods(results)
        if not methods:
            return None
        path = os.path.join(output_dir, self.picture_file)
        rows = [(m["label"], [t["prediction"] for t in pics[m["spec"]]["tiles"]]) for m in methods]
        save_dense_grid(path, pics[methods[0]["spec"]], rows, f"{self.name}: held-out tiles (first seed)")
        return path

    # ---- export and inference -------------------------------------------------------------
    def export_fields(self, args, normalization: dict | None) -> dict:
        return {"targets": (normalization or {}).get("targets")}

    def predict_tiles(self, model, x, index, options: dict):
        return self.predict(model, x)


def mask_no_data(out: torch.Tensor, x, fill=float("nan")) -> torch.Tensor:
    """``out`` [B, K, H, W] or [B, H, W] with ``fill`` where no channel of the input pixel of ``x``
    [B, C, H, W] holds a valid value (nothing was there to predict from)."""
    t = x if torch.is_tensor(x) else torch.from_numpy(np.asarray(x))
    empty = ~torch.isfinite(t).any(dim=1).to(out.device)  # [B, H, W]
    return out.masked_fill(empty[:, None] if out.ndim == 4 else empty, fill)


# ---- pictures ----------------------------------------------------------------------------


def save_dense_grid(path: str, pics: dict, rows: list[tuple[str, list]], title: str, dpi: int = 110) -> str:
    """Columns: held-out tiles; rows: the input in false colour, then per shown target (regress:
    the first 3; segment: the class map) the target and one labelled row per entry of ``rows``
    (label, one prediction per tile). Regress panels of a target share one colour scale (2nd-98th
    percentile of its targets); classes have one colour each; invalid pixels are grey."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from dchag.data.visualize import band_limits, grid_cell, rgb_renderer, save_grid
    tiles, kind, names = pics["tiles"], pics["kind"], pics["names"]
    shown = list(range(min(PICTURE_TARGETS, len(names)))) if kind == "regress" else [None]
    panel_rows = [("input", "rgb", None, [t["input"] for t in tiles])]
    for k in shown:
        pick = (lambda a, k=k: a[k]) if k is not None else (lambda a: a)
        label = f": {names[k]}" if k is not None else ""
        panel_rows.append((f"target{label}", "map", k, [pick(t["target"]) for t in tiles]))
        panel_rows += [(f"{name}{label}", "map", k, [pick(p) for p in preds]) for name, preds in rows]
    scales = {}
    for k in shown:
        if kind == "regress":
            ref = np.concatenate([np.ravel(t["target"][k]) for t in tiles])
            lo, hi = np.nanpercentile(ref, [2, 98]) if np.isfinite(ref).any() else (0.0, 1.0)
            scales[k] = dict(cmap=_with_grey("viridis"), vmin=lo, vmax=hi if hi > lo else lo + 1)
        else:
            K = len(names)
            scales[k] = dict(cmap=_with_grey("tab20" if K > 10 else "tab10", K), vmin=-0.5, vmax=K - 0.5)
    fig, axes = plt.subplots(len(panel_rows), len(tiles), figsize=(1.7 * len(tiles) + 1.6, 1.7 * len(panel_rows) + 0.3),
                             squeeze=False)
    for i, (label, style, k, images) in enumerate(panel_rows):
        for j, img in enumerate(images):
            kw = dict(row_label=label if j == 0 else None, tile_index=tiles[j]["index"] if i == 0 else None, fontsize=7)
            if style == "rgb":
                grid_cell(axes[i, j], rgb_renderer(img, [0, 1, 2], band_limits(range(3)))(img), **kw)
            else:
                grid_cell(axes[i, j], np.ma.masked_invalid(img), **kw, **scales[k])
    return save_grid(fig, path, title, dpi)


def _with_grey(name: str, n: int | None = None):
    import matplotlib
    cmap = matplotlib.colormaps[name].resampled(n) if n else matplotlib.colormaps[name].copy()
    cmap.set_bad("0.6")
    return cmap
