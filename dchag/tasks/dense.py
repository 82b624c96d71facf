"""What the dense per-pixel tasks (regress, segment) share: their targets (``--target-path``, read
by dchag/data/targets.py, tile-aligned with the input), the forward step, the baselines loop, the
held-out pictures and the file prediction. The model's dense head is replicated on every rank
([B, K, H, W]), so losses and metric sums need no channel-group reduction."""

from __future__ import annotations

import os

import numpy as np
import torch

from dchag.tasks.base import Task, baseline_keys, pictured_methods, valid_images


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

    def display(self, pred: torch.Tensor, targets) -> np.ndarray:
        """The model's output [B, K, H, W] (normalized / logits) as pictures show it."""
        raise NotImplementedError

    def display_target(self, batch: dict, targets) -> np.ndarray:
        raise NotImplementedError

    def picture_planes(self, names: list[str]) -> list[int | None]:
        """Which planes of a target/prediction a picture shows (None: the whole [H, W] map)."""
        raise NotImplementedError

    def colour_scale(self, tiles: list[dict], plane: int | None, names: list[str]) -> dict:
        """imshow's cmap / vmin / vmax for one shown plane (invalid pixels grey)."""
        raise NotImplementedError

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

    def baseline_stats(self, batch, args, cfg, heldout) -> dict:
        """Each of ``baseline_predictions`` scored with the loss's sums and the metric sums on exactly
        the pixels evaluation scores (padding carries no weight)."""
        out = {}
        for name, pred in self.baseline_predictions(batch, heldout.targets).items():
            out.update(baseline_keys(name, {"loss_sums": self.error_sums(pred, batch).double(),
                                            self.name: self.metric_sums(pred, batch)}))
        return out

    # ---- pictures -------------------------------------------------------------------------
    @torch.no_grad()
    def picture_arrays(self, model, valid_factory, args, cfg, max_tiles: int) -> dict:
        """Up to ``max_tiles`` distinct held-out tiles, whole on every rank: {"tiles": [{"index",
        "input" [3, H, W] false colour, "target", "prediction"}], "names", "rgb"}; target
        and prediction in target units (regress [K, H, W]) or classes (segment [H, W]), NaN where
        invalid. Collective: every rank of the model calls it."""
        from dchag.data.visualize import rgb_channels
        from dchag.parallel.comm import reduce_from_channel_parallel_region
        from dchag.device import run_device as comm_device, to_device
        ds = valid_factory.dataset
        rgb = rgb_channels(cfg.num_channels, ds.source.wavelengths)
        tiles, seen = [], set()
        for batch in valid_factory():
            batch = to_device(batch, comm_device())
            images = valid_images(batch)
            pred = self.display(model(images).float(), ds.targets)
            if "in_image" in batch:  # a tile's padding past the image's edge: nothing there
                inside = batch["in_image"].cpu().numpy()
                pred = np.where(inside[:, None] if pred.ndim == 4 else inside, pred, np.nan)
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
        return {"tiles": tiles, "names": list(ds.targets.names), "rgb": rgb}

    def picture(self, model, valid_factory, args, cfg, iteration: int, out_dir: str | None) -> str | None:
        import torch.distributed as dist
        if out_dir is None or len(valid_factory.dataset) == 0:
            return None
        pics = self.picture_arrays(model, valid_factory, args, cfg, max_tiles=8)
        if dist.is_initialized() and dist.get_rank() != 0:
            return None
        os.makedirs(out_dir, exist_ok=True)  # --load FINISHED --save NEW: nothing was saved into NEW yet
        path = os.path.join(out_dir, f"{self.name}_iter_{iteration:07d}.png")
        self.save_grid(path, pics, [("prediction", [t["prediction"] for t in pics["tiles"]])],
                       f"{self.name}: held-out tiles at iteration {iteration}")
        print(f"> saved target and prediction of {len(pics['tiles'])} held-out tiles {path}", flush=True)
        return path

    def report_picture(self, results: dict, output_dir: str) -> str | None:
        pics, methods = results["pictures"], pictured_methods(results)
        if not methods:
            return None
        path = os.path.join(output_dir, self.picture_file)
        rows = [(m["label"], [t["prediction"] for t in pics[m["spec"]]["tiles"]]) for m in methods]
        self.save_grid(path, pics[methods[0]["spec"]], rows, f"{self.name}: held-out tiles (first seed)")
        return path

    # ---- export and inference -------------------------------------------------------------
    def export_fields(self, args, normalization: dict | None) -> dict:
        return {"targets": (normalization or {}).get("targets")}

    def predict_tiles(self, model, x, index, options: dict):
        return self.predict(model, x)

    # ---- pictures -------------------------------------------------------------------------
    def save_grid(self, path: str, pics: dict, rows: list[tuple[str, list]], title: str, dpi: int = 110) -> str:
        """Columns: held-out tiles; rows: the input in false colour, then per shown plane (regress:
        the first 3 targets; segment: the class map) the target and one labelled row per entry of
        ``rows`` (label, one prediction per tile), in the plane's colour scale."""
        import matplotlib
        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
        from dchag.data.visualize import band_limits, grid_cell, rgb_renderer, save_grid
        tiles, names = pics["tiles"], pics["names"]
        panel_rows = [("input", None, [t["input"] for t in tiles])]
        for k in self.picture_planes(names):
            pick = (lambda a, k=k: a[k]) if k is not None else (lambda a: a)
            label = f": {names[k]}" if k is not None else ""
            scale = self.colour_scale(tiles, k, names)
            panel_rows.append((f"target{label}", scale, [pick(t["target"]) for t in tiles]))
            panel_rows += [(f"{name}{label}", scale, [pick(p) for p in preds]) for name, preds in rows]
        fig, axes = plt.subplots(len(panel_rows), len(tiles), squeeze=False,
                                 figsize=(1.7 * len(tiles) + 1.6, 1.7 * len(panel_rows) + 0.3))
        for i, (label, scale, images) in enumerate(panel_rows):
            for j, img in enumerate(images):
                kw = dict(row_label=label if j == 0 else None, tile_index=tiles[j]["index"] if i == 0 else None,
                          fontsize=7)
                if scale is None:  # the input: normalized values, the statistics stretch of MAE's pictures
                    grid_cell(axes[i, j], rgb_renderer(img, [0, 1, 2], band_limits(range(3)))(img), **kw)
                else:
                    grid_cell(axes[i, j], np.ma.masked_invalid(img), **kw, **scale)
        return save_grid(fig, path, title, dpi)


def mask_no_data(out: torch.Tensor, x, fill=float("nan")) -> torch.Tensor:
    """``out`` [B, K, H, W] or [B, H, W] with ``fill`` where no channel of the input pixel of ``x``
    [B, C, H, W] holds a valid value (nothing was there to predict from)."""
    t = x if torch.is_tensor(x) else torch.from_numpy(np.asarray(x))
    empty = ~torch.isfinite(t).any(dim=1).to(out.device)  # [B, H, W]
    return out.masked_fill(empty[:, None] if out.ndim == 4 else empty, fill)


def with_grey(name: str, n: int | None = None):
    """The colormap ``name`` (resampled to ``n`` colours) with invalid values grey."""
    import matplotlib
    cmap = matplotlib.colormaps[name]
    return (cmap.resampled(n) if n else cmap).with_extremes(bad="0.6")
