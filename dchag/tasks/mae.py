"""Masked autoencoding: random patch masks and the masked-patch MSE over valid pixels."""

from __future__ import annotations

import torch

from dchag.parallel.comm import reduce_from_channel_parallel_region
from dchag.tasks.base import Task, baseline_keys, pictured_methods, valid_images


def _permutation(seed: int, sample: int, iteration: int, num_patches: int) -> torch.Tensor:
    """The random patch order of one sample: a function of (seed, sample index, iteration) only."""
    g = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(sample) * 7919 + int(iteration) * 104_729) % (2**63))
    return torch.randperm(num_patches, generator=g)


def patch_mask(index: torch.Tensor, num_patches: int, mask_ratio: float, seed: int, iteration: int) -> torch.Tensor:
    """[B, L] bool (True = masked). Each sample's mask depends only on (seed, sample index,
    iteration): identical on every rank and every layout."""
    n_mask = int(round(mask_ratio * num_patches))
    rows = []
    for i in index.tolist():
        m = torch.zeros(num_patches, dtype=torch.bool)
        m[_permutation(seed, i, iteration, num_patches)[:n_mask]] = True
        rows.append(m)
    return torch.stack(rows)


def complementary_masks(index: torch.Tensor, num_patches: int, mask_ratio: float, seed: int) -> torch.Tensor:
    """[P, B, L] bool: P = ceil(L / n) passes that together hide every patch, each hiding n =
    round(mask_ratio x L) patches, as in training (P = ceil(1 / mask_ratio) up to the rounding of n).
    Pass p hides patches perm[p n : (p + 1) n] of the sample's random order (pass 0 is
    ``patch_mask``'s mask at iteration 0); the last pass hides the last n, so when n does not divide
    L it repeats a few patches of the pass before."""
    n = int(round(mask_ratio * num_patches))
    if not 0 < n <= num_patches:
        raise ValueError(f"complementary masks need a mask ratio that hides at least one of the {num_patches} "
                         f"patches, got {mask_ratio}.")
    passes = -(-num_patches // n)
    out = torch.zeros(passes, len(index), num_patches, dtype=torch.bool)
    for b, i in enumerate(index.tolist()):
        perm = _permutation(seed, i, 0, num_patches)
        for p in range(passes):
            start = min(p * n, num_patches - n)
            out[p, b, perm[start:start + n]] = True
    return out


def pixel_mask(mask: torch.Tensor, grid: tuple[int, int], patch_dim: int) -> torch.Tensor:
    """[B, L] -> [B, 1, H, W]."""
    gh, gw = grid
    m = mask.reshape(-1, gh, gw)
    return m.repeat_interleave(patch_dim, 1).repeat_interleave(patch_dim, 2)[:, None]


def error_sums(pred: torch.Tensor, images: torch.Tensor, valid: torch.Tensor, mask: torch.Tensor,
               grid: tuple[int, int], patch_dim: int, channel_weight: torch.Tensor | None = None) -> torch.Tensor:
    """[2]: (sum of squared errors, number of terms) over the masked patches' valid pixels of all
    channels, summed over the channel group (this rank holds c_r channels); fp32 at least.
    ``channel_weight`` [B, c_r] (a blend's source with repeated slots): 0 leaves a repeat out, so
    each channel counts once."""
    dtype = torch.promote_types(pred.dtype, torch.float32)  # accumulate in fp32 at least (fp64 stays fp64)
    w = (pixel_mask(mask, grid, patch_dim) & valid).to(dtype)
    if channel_weight is not None:
        w = w * channel_weight.to(dtype)[:, :, None, None]
    target = torch.where(valid, images, torch.zeros_like(images)).to(dtype)
    err = (pred.to(dtype) - target) ** 2 * w
    return reduce_from_channel_parallel_region(torch.stack([err.sum(), w.sum()]))


def mae_loss(pred: torch.Tensor, images: torch.Tensor, valid: torch.Tensor, mask: torch.Tensor,
             grid: tuple[int, int], patch_dim: int) -> torch.Tensor:
    """Global mean over masked patches and valid pixels of all channels (this rank holds c_r)."""
    s = error_sums(pred, images, valid, mask, grid, patch_dim)
    return s[0] / s[1].clamp_min(1.0)


@torch.no_grad()
def reconstruction_planes(model, batch: dict, cfg, channels, picked: list[int], mask_ratio: float, seed: int,
                          sample: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``picked`` channels of one held-out tile, whole on every rank: (planes [2, k, H, W] =
    input | reconstruction, mask [L]). The reconstruction is the model's output on the masked
    patches with the visible patches pasted from the input, as in the MAE paper's figures.

    Every rank of the model runs the forward (TP collectives need all of them); each rank holds
    only its channels [c_r], so the planes are summed over the channel group (a rank contributes
    the planes it owns, zeros elsewhere). The mask is the one evaluation uses (iteration 0). Invalid
    pixels (no-data, the padding of a tile past the image's edge) are NaN in both planes.

    ``channels``: the data channels of the rank's input, in order (a range; for a blend's source a
    tuple that may repeat a channel: only its scored slot, ``batch["channel_weight"]`` > 0,
    contributes, so every channel comes from one rank)."""
    valid = batch["valid"][sample:sample + 1]
    images = batch["images"][sample:sample + 1]
    images = torch.where(valid, images, torch.zeros_like(images))  # [1, c_r, H, W]
    index = batch["index"][sample:sample + 1].cpu()
    mask = patch_mask(index, cfg.num_patches, mask_ratio, seed, 0).to(images.device)  # [1, L]
    source = {"source": int(batch["source"][sample])} if "source" in batch else {}
    pred = model(images, patch_mask=mask, **source).float()  # [1, c_r, H, W]
    hidden = pixel_mask(mask, cfg.grid, cfg.patch_dim)[0, 0]  # [H, W]
    pred = torch.where(hidden, pred, images.float())
    nan = torch.tensor(float("nan"), device=images.device)
    planes = images.new_zeros(2, len(picked), cfg.img_h, cfg.img_w, dtype=torch.float32)
    weight = batch.get("channel_weight")
    where = {}
    for j, c in enumerate(channels):  # the rank's slot of each data channel it scores
        if weight is None or float(weight[sample, j]) > 0:
            where.setdefault(int(c), j)
    for k, c in enumerate(picked):
        if c in where:  # invalid pixels (no-data, a tile's padding past the image's edge) are NaN: grey
            ok = valid[0, where[c]]
            planes[0, k] = torch.where(ok, images[0, where[c]].float(), nan)
            planes[1, k] = torch.where(ok, pred[0, where[c]], nan)
    return reduce_from_channel_parallel_region(planes).cpu(), mask[0].cpu()


def heldout_reconstructions(model, valid_factory, cfg, mask_ratio: float, seed: int, max_tiles: int,
                            source: int | None = None) -> dict:
    """Up to ``max_tiles`` distinct held-out tiles in false colour, whole on every rank:
    {"tiles": [{"index", "input" [3, H, W], "reconstruction" [3, H, W], "mask" [L]}], "rgb": channels,
    "rgb_nm": their wavelengths or None}. Collective: every rank of the model calls it. A blend:
    the tiles of data ``source`` (its channels, its colours)."""
    from dchag.data.visualize import rgb_channels
    from dchag.device import run_device, to_device
    ds = valid_factory.dataset
    batches = valid_factory()
    if source is not None:  # a blend (dchag/data/blend_loader.py): one source's held-out batches
        ds, batches = ds.parts[source].dataset, batches.of_source(source)
    rgb = rgb_channels(ds.source.num_channels, ds.source.wavelengths)
    tiles, seen = [], set()
    for batch in batches:
        batch = to_device(batch, run_device())
        for i in range(batch["images"].shape[0]):
            index = int(batch["index"][i])
            if len(tiles) < max_tiles and bool(batch["scored"][i]) and index not in seen:  # not padding
                planes, mask = reconstruction_planes(model, batch, cfg, ds.channels, rgb, mask_ratio, seed, sample=i)
                tiles.append({"index": index, "input": planes[0].numpy(), "reconstruction": planes[1].numpy(),
                              "mask": mask.numpy()})
                seen.add(index)
        if len(tiles) >= max_tiles:
            break
    wl = ds.source.wavelengths
    return {"tiles": tiles, "rgb": rgb, "rgb_nm": None if wl is None else [float(wl[c]) for c in rgb]}


def rgb_label(pictures: dict) -> str:
    nm = pictures["rgb_nm"]
    return ", ".join(f"{w:.0f} nm" for w in nm) if nm else f"channels {pictures['rgb']}"


def mae_plan(given, trained, complementary: bool, num_patches: int) -> str:
    """One line: which share of each tile is hidden, where it comes from, and how many passes."""
    ratio = float(trained or 0.0) if given is None else given
    origin = "the model's training --mask-ratio" if given is None else "--mask-ratio"
    hidden = int(round(ratio * num_patches))
    if complementary and hidden == 0:
        raise ValueError(f"--complementary-masks needs a mask ratio that hides at least one of the {num_patches} "
                         f"patches per tile, got {ratio} ({origin}); give --mask-ratio, e.g. 0.5.")
    passes = -(-num_patches // hidden) if complementary else 1
    return (f"> mae: {hidden} of {num_patches} patches hidden per pass ({ratio:g}, {origin}); {passes} pass(es)"
            + (", complementary masks: every patch predicted while hidden" if complementary else ""))


def _visible_mean(images, valid, hidden):
    """[B, C, H, W] -> per-sample, per-channel mean of visible valid pixels, broadcast to [B, C, H, W]."""
    w = (valid & ~hidden).to(images.dtype)
    mean = (images * w).sum((2, 3)) / w.sum((2, 3)).clamp_min(1.0)
    return mean[:, :, None, None].expand_as(images)


class MAETask(Task):
    """Masked autoencoding: hide --mask-ratio of each tile's patches, reconstruct every channel
    there; the loss is the masked-patch MSE over valid pixels (channel-sharded head and loss)."""

    name = "mae"
    prediction_title = "reconstruction"
    picture_file = "reconstructions.png"

    def forward_step(self, model, batch, args, cfg, iteration: int):
        """The masked-patch MSE of one micro-batch; at evaluation also its ``loss_sums``."""
        images, valid = valid_images(batch), batch["valid"]
        mask = patch_mask(batch["index"].cpu(), cfg.num_patches, args.mask_ratio, args.seed,
                          max(iteration, 0)).to(images.device)
        source = {"source": int(batch["source"][0])} if "source" in batch else {}  # a blend: one source per batch
        pred = model(images, patch_mask=mask, **source)
        sums = error_sums(pred, images, valid, mask, cfg.grid, cfg.patch_dim, batch.get("channel_weight"))
        loss = sums[0] / sums[1].clamp_min(1.0)
        return loss if iteration >= 0 else (loss, {"loss_sums": sums})

    def baseline_stats(self, batch, args, cfg, heldout) -> dict:
        """- ``channel mean``: predict every hidden pixel as its channel's mean over the training
        data (0 after normalization): the loss of knowing nothing about the tile;
        - ``visible-pixel mean``: predict a hidden pixel as the mean of its channel's visible,
        valid pixels in the same tile: a local mean spectrum, what a model gets for free from the input.
        Scored with the training loss's sums on exactly the pixels and masks evaluation uses (the
        masks of iteration 0), summed over the channel group like the model's."""
        valid = batch["valid"]
        images = valid_images(batch)
        mask = patch_mask(batch["index"].cpu(), cfg.num_patches, args.mask_ratio, args.seed, 0).to(images.device)
        hidden = pixel_mask(mask, cfg.grid, cfg.patch_dim).expand_as(images)
        preds = {"channel mean": torch.zeros_like(images), "visible-pixel mean": _visible_mean(images, valid, hidden)}
        out = {}
        for name, pred in preds.items():
            out.update(baseline_keys(name, {"loss_sums": error_sums(pred, images, valid, mask, cfg.grid, cfg.patch_dim,
                                                                    batch.get("channel_weight"))}))
        return out

    def picture(self, model, valid_factory, args, cfg, iteration: int, out_dir: str | None) -> str | None:
        """A PNG of up to 8 held-out tiles (input | masked input | reconstruction)."""
        import os

        import torch.distributed as dist

        from dchag.data.visualize import band_limits, save_reconstruction_grid
        if out_dir is None or len(valid_factory.dataset) == 0:
            return None
        names = getattr(valid_factory.dataset, "names", None)  # a blend: one picture per source
        path = None
        for source, name in (enumerate(names) if names else [(None, None)]):
            if source is not None and len(valid_factory.dataset.parts[source]) == 0:
                continue
            pics = heldout_reconstructions(model, valid_factory, cfg, args.mask_ratio, args.seed, max_tiles=8,
                                           source=source)
            if dist.get_rank() != 0:
                continue
            os.makedirs(out_dir, exist_ok=True)  # --load FINISHED --save NEW: nothing was saved into NEW yet
            what = "" if name is None else f"_{name}"
            path = os.path.join(out_dir, f"reconstruction{what}_iter_{iteration:07d}.png")
            of = "" if name is None else f" of {name}"
            save_reconstruction_grid(path, pics["tiles"],
                                     [("reconstruction", [t["reconstruction"] for t in pics["tiles"]])],
                                     f"held-out tiles{of} at iteration {iteration}, RGB = {rgb_label(pics)}",
                                     limits=band_limits(range(3)))  # normalized values: tools/predict.py's stretch
            print(f"> saved reconstruction of {len(pics['tiles'])} held-out tiles{of} {path}", flush=True)
        return path

    def picture_arrays(self, model, valid_factory, args, cfg, max_tiles: int) -> dict:
        return heldout_reconstructions(model, valid_factory, cfg, args.mask_ratio, args.seed, max_tiles)

    def report_picture(self, results: dict, output_dir: str) -> str | None:
        """Rows: input, masked input, one row per method; columns: held-out tiles (first seed)."""
        import os

        from dchag.data.visualize import band_limits, save_reconstruction_grid
        pics, methods = results["pictures"], pictured_methods(results)
        if not methods:
            return None
        path = os.path.join(output_dir, self.picture_file)
        first = pics[methods[0]["spec"]]
        rows = [(m["label"], [t["reconstruction"] for t in pics[m["spec"]]["tiles"]]) for m in methods]
        save_reconstruction_grid(path, first["tiles"], rows,
                                 f"held-out reconstructions (first seed), RGB = {rgb_label(first)}",
                                 limits=band_limits(range(3)))
        return path

    def export_fields(self, args, normalization) -> dict:
        return {"mask_ratio": getattr(args, "mask_ratio", None)}

    def predict_plan(self, model, options: dict) -> str:
        return mae_plan(options.get("mask_ratio"), model.config.get("mask_ratio"), options.get("complementary", False),
                        model.cfg.num_patches)

    def output_planes(self, cfg) -> int:
        return cfg.num_channels

    def prediction_rgb(self, y, model, input_rgb):
        return input_rgb(y)  # the input's channels, colours and stretch

    def predict_tiles(self, model, x, index, options: dict):
        return model.reconstruct_tiles(x, mask_ratio=options.get("mask_ratio"), seed=options.get("seed", 0),
                                       sample_index=index, complementary=options.get("complementary", False))
