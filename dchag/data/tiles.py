"""Where samples come from: non-overlapping tiles of each image, and the train/valid split.

Pure index arithmetic over image sizes; no data is read here.

Tiles: an image of H x W is cut into ceil(H / img_h) x ceil(W / img_w) non-overlapping tiles
from the top-left corner, so that every pixel lies in exactly one tile. Where H or W is not a
multiple of the tile, the last row (column) of tiles runs past the bottom (right) edge: its
window is read as far as the image goes and the rest is padding, invalid pixels (NaN in the read,
``valid`` False, zero-filled input; ``pad_to_tile``), as the data layer treats no-data values. A
loss or metric that leaves invalid pixels out then scores every pixel of the image once, with no
further mask. Samples are numbered image-major, then tile row, then tile column.

Split (deterministic, no randomness): the *last* part of the data is held out.
- mae: the last ``valid_count(S)`` of the S tile samples.
- forecast: the last nv = max(valid_count(N), lead + 1) time steps (at least one input/target
  pair); train inputs t < b - lead (so no training target lies in the held-out period),
  held-out inputs b <= t < N - lead, where b = N - nv.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np

from .errors import DataError


def valid_count(total: int, fraction: float) -> int:
    """How many of ``total`` units to hold out: round(fraction * total), at least 1 if fraction > 0,
    at most total - 1 (training keeps at least one)."""
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"the validation fraction must be in [0, 1), got {fraction}.")
    if fraction == 0.0 or total < 2:
        return 0
    return min(total - 1, max(1, int(math.floor(fraction * total + 0.5))))


def tile_grid(hw: tuple[int, int], img_h: int, img_w: int, where: str) -> tuple[int, int]:
    """(tile rows, tile columns) of an image: ceil(H / img_h) x ceil(W / img_w), the last ones padded."""
    H, W = hw
    if img_h < 1 or img_w < 1:
        raise DataError(f"--img-h/--img-w must be positive, got {img_h} x {img_w}.")
    if H < img_h or W < img_w:
        raise DataError(
            f"{where} is {H} x {W} (H x W), smaller than one {img_h} x {img_w} tile; set --img-h <= {H} and "
            f"--img-w <= {W} (an image must fill at least one tile; only the last row and column of tiles are "
            "padded).")
    return -(-H // img_h), -(-W // img_w)


@dataclass(frozen=True)
class Tile:
    """One sample's window. ``rows`` x ``cols`` is the whole img_h x img_w window, which runs past
    the image's bottom/right edge on the last row/column of tiles; ``read_rows`` x ``read_cols``
    is the part inside the image (what a reader is asked for), the rest is padding."""

    sample: int  # global sample id (position in the unsplit enumeration)
    image: int  # image / time index in the source
    rows: slice
    cols: slice
    image_hw: tuple[int, int] = (0, 0)  # (H, W) of the image

    @property
    def read_rows(self) -> slice:
        return slice(self.rows.start, min(self.rows.stop, self.image_hw[0]))

    @property
    def read_cols(self) -> slice:
        return slice(self.cols.start, min(self.cols.stop, self.image_hw[1]))

    @property
    def padded(self) -> bool:
        return self.rows.stop > self.image_hw[0] or self.cols.stop > self.image_hw[1]


def pad_to_tile(block: np.ndarray, h: int, w: int, fill: float = np.nan) -> np.ndarray:
    """[..., h', w'] (h' <= h, w' <= w: a tile's part inside the image) -> [..., h, w], the padding
    at the bottom/right set to ``fill`` (NaN: invalid, as a no-data value). No copy when h' = h, w' = w."""
    hh, ww = block.shape[-2:]
    if (hh, ww) == (h, w):
        return block
    out = np.full(block.shape[:-2] + (h, w), fill, dtype=block.dtype)
    out[..., :hh, :ww] = block
    return out


class TileIndex:
    """Enumerates (image, tile) samples of a source and splits them."""

    def __init__(self, image_sizes: list[tuple[int, int]], img_h: int, img_w: int, describe: str = "image"):
        self.img_h, self.img_w = img_h, img_w
        self.sizes = [tuple(hw) for hw in image_sizes]
        self.grids = [tile_grid(hw, img_h, img_w, f"{describe} {i}" if len(image_sizes) > 1 else describe)
                      for i, hw in enumerate(image_sizes)]
        counts = [gy * gx for gy, gx in self.grids]
        self.starts = np.cumsum([0] + counts)
        self.num_samples = int(self.starts[-1])

    def edge_report(self) -> str | None:
        """How the last row/column of tiles is padded where the tile does not divide an image, or None."""
        padded = {}
        for (gy, gx), (H, W) in zip(self.grids, self.sizes):
            rows, cols = gy * self.img_h - H, gx * self.img_w - W
            if rows or cols:
                padded.setdefault((rows, cols, H, W), 0)
                padded[(rows, cols, H, W)] += 1
        if not padded:
            return None
        parts = [f"{n} image(s) of {H} x {W}: the last row of tiles padded with {rows} row(s), the last column with "
                 f"{cols} column(s)" for (rows, cols, H, W), n in sorted(padded.items())]
        return "; ".join(parts) + (f" (tiles are {self.img_h} x {self.img_w}; padding is invalid: zero-filled, out of "
                                   "every loss and metric, so each pixel is trained on and scored once)")

    def tiles_per_image(self, image: int) -> int:
        gy, gx = self.grids[image]
        return gy * gx

    def tile(self, sample: int) -> Tile:
        image = int(np.searchsorted(self.starts, sample, side="right") - 1)
        j = sample - int(self.starts[image])
        gx = self.grids[image][1]
        ty, tx = divmod(j, gx)
        r0, k0 = ty * self.img_h, tx * self.img_w
        return Tile(sample, image, slice(r0, r0 + self.img_h), slice(k0, k0 + self.img_w), self.sizes[image])


def mae_split(num_samples: int, split: str, valid_fraction: float) -> range:
    """Global sample ids of ``split`` ('train', 'valid' or 'all')."""
    nv = valid_count(num_samples, valid_fraction)
    if split == "all":
        return range(num_samples)
    if num_samples == 1 and valid_fraction > 0:
        warnings.warn("only one tile in the data: the validation split reuses the training tile; use smaller "
                      "--img-h/--img-w or more images for a real held-out set.", stacklevel=3)
        return range(1)
    if split == "train":
        return range(num_samples - nv)
    if split == "valid":
        return range(num_samples - nv, num_samples)
    raise DataError(f"split must be 'train', 'valid' or 'all', got {split!r}.")


def training_windows(image_sizes: list[tuple[int, int]], task: str, img_h: int, img_w: int, valid_fraction: float,
                     lead_time: int = 1) -> list[tuple[int, slice, slice]]:
    """The pixels of the training samples of a split, as few windows (image, rows, cols) inside the
    images: whole images, then the first tile rows and tiles of the image the held-out part starts
    in (mae, regress, segment: tiles in storage order), or the training period's time steps
    (forecast). What normalization statistics are computed over: no held-out pixel is in them."""
    if task == "forecast":
        N = len(image_sizes)
        H, W = image_sizes[0] if N else (0, 0)
        return [(t, slice(0, H), slice(0, W)) for t in forecast_train_period(N, lead_time, valid_fraction)]
    index = TileIndex(image_sizes, img_h, img_w)
    stop = mae_split(index.num_samples, "train", valid_fraction).stop
    out = []
    for image, (H, W) in enumerate(index.sizes):
        first, last = int(index.starts[image]), int(index.starts[image + 1])
        if stop >= last:
            out.append((image, slice(0, H), slice(0, W)))
            continue
        if stop > first:  # the held-out tiles start inside this image: its first tiles in storage order
            gx = index.grids[image][1]
            rows, cols = divmod(stop - first, gx)
            if rows:
                out.append((image, slice(0, min(rows * img_h, H)), slice(0, W)))
            if cols:
                out.append((image, slice(rows * img_h, min(rows * img_h + img_h, H)), slice(0, min(cols * img_w, W))))
        break
    return out


def forecast_train_period(num_times: int, lead_time: int, valid_fraction: float) -> range:
    """Time steps before the held-out period, [0, b): every training input and target lies in it
    (all time steps when nothing is held out). The climatology of the anomaly correlation is the
    mean over these steps only, so no held-out state leaks into a baseline or a metric."""
    forecast_split(num_times, lead_time, "all", valid_fraction)  # the same checks as the splits
    nv = valid_count(num_times, valid_fraction)
    return range(num_times - max(nv, lead_time + 1) if nv else num_times)


def forecast_split(num_times: int, lead_time: int, split: str, valid_fraction: float) -> range:
    """Input time indices t of ``split``; the target is t + lead_time."""
    if lead_time < 1:
        raise DataError(f"--lead-time must be >= 1 time step, got {lead_time}.")
    if num_times <= lead_time:
        raise DataError(f"forecasting {lead_time} step(s) ahead needs more than {lead_time} time steps, but the data "
                        f"has {num_times}; lower --lead-time or use a longer time series.")
    if split == "all":
        return range(num_times - lead_time)
    nv = valid_count(num_times, valid_fraction)
    if nv:  # the held-out period must hold at least one (input, target) pair
        nv = max(nv, lead_time + 1)
    b = num_times - nv
    if split == "train":
        r = range(b - lead_time if nv else num_times - lead_time)
    elif split == "valid":
        r = range(b, num_times - lead_time)
    else:
        raise DataError(f"split must be 'train', 'valid' or 'all', got {split!r}.")
    if len(r) == 0 and (split == "train" or nv):
        raise DataError(
            f"the {split} split of {num_times} time steps is empty with --lead-time {lead_time} and validation "
            f"fraction {valid_fraction} ({nv} held-out steps: inputs and targets must both fall in the held-out "
            "period); lower --lead-time, change the validation fraction, or use a longer time series.")
    return r
