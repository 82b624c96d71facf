"""Map-style torch Dataset over image tiles, channel-sharded: each item holds only the channels
that this channel-parallel rank owns (``channels``, from ``ChannelPartition.rank_channels``).

Items (tensors; a DataLoader stacks them to [B, ...]):

    mae:      {"images": float32 [c, h, w], "valid": bool [c, h, w], "in_image": bool [h, w], "index": int64 []}
    regress, segment: as mae, plus "target" and "target_valid" of the tile (dchag/data/targets.py)
    forecast: {"images": float32 [c, h, w]  (state at t, the rank's channels),
               "valid":  bool    [c, h, w],
               "target": float32 [V, h, w]  (state at t + lead_time, ALL target channels),
               "target_valid": bool [V, h, w],
               "in_image": bool [h, w],
               "lat_weights": float32 [h]   (the latitude weight of the tile rows, --lat-weighting area
                              or cos, over its mean over the whole latitude axis, so that tiles keep
                              their latitudes' weight; ones without latitudes; 0 on padding rows),
               "climatology": float32 [V, h, w]  (valid split only: the time-mean of the normalized
                              target channels over the training period, for the anomaly correlation ACC;
                              0 on padding),
               "time_slot": int64 [], "time_slots": int64 []  (valid split only: the position of the
                              input time step among the held-out ones, and their number, so that
                              metrics can be pooled per forecast time over tiles),
               "index": int64 []}

c = len(channels), h x w = img_h x img_w, V = len(target_channels) (default all C).
``index`` is the global sample id (stable across layouts and splits): seed per-sample
randomness (MAE masks) from it, never from the rank. ``in_image`` is False on the padding of a
tile on the last row/column of an image that the tile does not divide (dchag/data/tiles.py):
there every value is invalid (``valid``/``target_valid`` False, input 0, latitude weight 0), so
each pixel of an image is trained on and scored once; padding is not counted as invalid data.

Values are normalized per channel, (x - mean) / std, when ``stats`` is given. Invalid values
(NaN/Inf, the format's no-data value) are set to 0 (= the channel mean after normalization) and
marked False in the mask, so the loss can leave them out; the dataset counts them
(``invalid_count``, ``invalid_samples``; per process: DataLoader workers count their own).
With ``strict=True`` an invalid value raises :class:`DataError` instead.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from .errors import DataError
from .readers.base import Source
from .readers.concat import ConcatSource
from .stats import ChannelStats
from .tiles import TileIndex, forecast_split, forecast_train_period, mae_split, pad_to_tile

TASKS = ("mae", "forecast", "regress", "segment")  # every task but forecast tiles space (as mae)
LAT_WEIGHTINGS = ("area", "cos")  # --lat-weighting; the first is the default


def latitude_axis_weights(latitudes: np.ndarray | None, weighting: str = "area") -> np.ndarray | None:
    """float64 [H]: the weight of each row of a latitude axis (degrees, either order), over its mean
    over the whole axis (mean 1); None without latitudes.

    - ``area`` (WeatherBench 2's cell-area weights): the area of each row's cell, sin(upper) -
      sin(lower), with cell bounds halfway between rows and the outer bounds half a row spacing
      beyond the edge rows, clipped to +-90 degrees. On a grid with pole rows (ERA5's 721 or 121
      rows) a pole row gets the area of its half cell (cos(lat) would give it 0); on a cell-centred
      grid (no pole rows) it equals ``cos``.
    - ``cos``: cos(lat) (ClimaX's ``lat_weighted_*``)."""
    if latitudes is None:
        return None
    lat = np.asarray(latitudes, np.float64)
    if weighting == "cos":
        w = np.clip(np.cos(np.deg2rad(lat)), 0.0, None)
    elif weighting == "area":
        if lat.size < 2:
            w = np.ones_like(lat)
        else:
            mid = (lat[:-1] + lat[1:]) / 2
            bounds = np.clip(np.concatenate([[lat[0] - (lat[1] - lat[0]) / 2], mid,
                                             [lat[-1] + (lat[-1] - lat[-2]) / 2]]), -90.0, 90.0)
            w = np.abs(np.diff(np.sin(np.deg2rad(bounds))))
    else:
        raise DataError(f"--lat-weighting {weighting!r} is not one of {', '.join(LAT_WEIGHTINGS)}.")
    m = w.mean()
    return w / m if m > 0 else np.ones_like(w)


def latitude_weights(latitudes: np.ndarray | None, rows: slice, h: int, weighting: str = "area") -> np.ndarray:
    """float32 [h]: the weights (``latitude_axis_weights``) of a tile's rows; ones without
    latitudes; 0 on rows past the last latitude (the padding of the last row of tiles).

    The normalization is global, not per tile, so a tile keeps the weight of its latitudes: a
    polar tile's rows weigh less than 1, an equatorial tile's more, and over the whole globe the
    weights average 1. Pooled sums over tiles (the loss, RMSE, ACC) are then the whole globe's."""
    return tile_latitude_weights(latitude_axis_weights(latitudes, weighting), rows, h)


def tile_latitude_weights(axis_weights: np.ndarray | None, rows: slice, h: int) -> np.ndarray:
    """float32 [h]: ``axis_weights`` [H] (None: ones) at a tile's ``rows``, 0 past the axis' end."""
    out = np.zeros(h, np.float32)
    if axis_weights is None:
        out[:max(0, min(rows.stop, rows.start + h) - rows.start)] = 1.0
        return out
    inside = axis_weights[rows.start:min(rows.stop, len(axis_weights))]
    out[:len(inside)] = inside
    return out


def covering_range(channels) -> range:
    """The smallest contiguous range holding ``channels`` (a range is its own)."""
    if isinstance(channels, range):
        return channels
    channels = [int(c) for c in channels]
    if not channels:
        return range(0)
    return range(min(channels), max(channels) + 1)


class TileDataset(Dataset):
    def __init__(self, source: Source, *, task: str = "mae", img_h: int, img_w: int, channels: range | None = None,
                 stats: ChannelStats | None = None, split: str = "train", valid_fraction: float = 0.1,
                 lead_time: int = 1, target_channels: range | None = None, strict: bool = False,
                 lat_weighting: str = "area"):
        if task not in TASKS:
            raise DataError(f"--task {task!r} is not one of {', '.join(TASKS)}.")
        C = source.num_channels
        self.source, self.task, self.split, self.strict = source, task, split, strict
        self.img_h, self.img_w, self.lead_time = int(img_h), int(img_w), int(lead_time)
        self.channels = range(C) if channels is None else channels
        # A blend's rank reads a tuple of the source's channels (may repeat: slots of a source with fewer
        # channels than groups, dchag/parallel/sources.py): the covering range is read once, then indexed.
        self.read_range, self._pick = covering_range(self.channels), None
        if not isinstance(self.channels, range):
            if task == "forecast":
                raise DataError("forecast reads a contiguous range of channels per rank; a channel tuple is for "
                                "blended MAE sources.")
            self._pick = np.asarray(self.channels, np.int64) - self.read_range.start
        if self.read_range.step != 1 or not (0 <= self.read_range.start < self.read_range.stop <= C):
            raise DataError(f"rank channels {self.channels} are not a non-empty set of channels inside [0, {C}) of "
                            f"{source.describe()}; check --num-channels against the data.")
        self.target_channels = range(C) if target_channels is None else target_channels

        if task != "forecast":
            sizes = [source.image_hw(i) for i in range(source.num_images)]
            self.index = TileIndex(sizes, self.img_h, self.img_w, self._image_name())
            self.samples = mae_split(self.index.num_samples, split, valid_fraction)
        else:
            N, _, H, W = source.shape
            if H is None:
                raise DataError(f"forecast needs one grid for all time steps, but {source.describe()} mixes image "
                                "sizes; regrid the files to one grid.")
            self.index = TileIndex([(H, W)], self.img_h, self.img_w, self._image_name())
            self.per_time = self.index.num_samples
            self.times = forecast_split(N, self.lead_time, split, valid_fraction)
            self.train_period = forecast_train_period(N, self.lead_time, valid_fraction)
            self.samples = range(len(self.times) * self.per_time)
            self.lat_weighting = lat_weighting
            self.lat_axis_weights = latitude_axis_weights(source.latitudes, lat_weighting)  # [H] or None

        self.stats = self.target_stats = None
        if stats is not None:
            self.stats = stats.select(self.read_range)
            if task == "forecast":
                self.target_stats = stats.select(self.target_channels)
        self._climatology = None  # forecast, valid split: [V, H, W], computed on first use
        self.targets = None  # regress, segment: per-pixel targets (dchag.data.targets.attach_targets)
        self.invalid_count = 0  # values zero-filled (inputs and targets)
        self.invalid_samples = 0  # items with at least one invalid value

    # ---- metadata -------------------------------------------------------------------------
    @property
    def channel_names(self) -> list[str]:
        return [self.source.channel_names[c] for c in self.channels]

    @property
    def wavelengths(self) -> np.ndarray | None:
        wl = self.source.wavelengths
        return None if wl is None else np.asarray(wl)[list(self.channels)]

    def _image_name(self) -> str:
        return f"{self.source.format} image of {self.source.path}" if self.source.num_images == 1 \
            else f"{self.source.format} data {self.source.path}: image"

    def __len__(self) -> int:
        return len(self.samples)

    # ---- items ----------------------------------------------------------------------------
    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} outside [0, {len(self)}) of the {self.split} split")
        if self.task != "forecast":
            tile = self.index.tile(self.samples[i])
            x, valid, bad = self._load(tile.image, self.read_range, tile, self.stats)
            if self._pick is not None:  # the covering range -> this rank's channels (repeats copied)
                x, valid = x[self._pick], valid[self._pick]
            self._tally(bad)
            item = {"images": torch.from_numpy(x), "valid": torch.from_numpy(valid),
                    "in_image": torch.from_numpy(self._in_image(tile)),
                    "index": torch.tensor(tile.sample, dtype=torch.int64)}
            if self.targets is not None:
                item.update(self.targets.item(tile))
            return item
        t_pos, j = divmod(i, self.per_time)
        t = self.times[t_pos]
        tile = self.index.tile(j)
        x, valid, bad_x = self._load(t, self.channels, tile, self.stats)
        y, y_valid, bad_y = self._load(t + self.lead_time, self.target_channels, tile, self.target_stats)
        self._tally(bad_x + bad_y)
        sample = t * self.per_time + j
        item = {"images": torch.from_numpy(x), "valid": torch.from_numpy(valid),
                "target": torch.from_numpy(y), "target_valid": torch.from_numpy(y_valid),
                "in_image": torch.from_numpy(self._in_image(tile)),
                "lat_weights": torch.from_numpy(tile_latitude_weights(self.lat_axis_weights, tile.read_rows, self.img_h)),
                "index": torch.tensor(sample, dtype=torch.int64)}
        if self.split == "valid":
            clim = self.climatology()[:, tile.read_rows, tile.read_cols]
            item["climatology"] = torch.from_numpy(np.ascontiguousarray(pad_to_tile(clim, self.img_h, self.img_w, 0.0)))
            item["time_slot"] = torch.tensor(t_pos, dtype=torch.int64)
            item["time_slots"] = torch.tensor(len(self.times), dtype=torch.int64)
        return item

    def climatology(self) -> np.ndarray:
        """float32 [V, H, W]: the mean of the normalized target channels over the training period's
        time steps (``train_period``: none of the held-out ones; non-finite values left out; 0 = the
        channel mean where a pixel is never valid). One read of the target channels per time step,
        once per dataset."""
        if self._climatology is None:
            _, _, H, W = self.source.shape
            total = np.zeros((len(self.target_channels), H, W), np.float64)
            count = np.zeros_like(total)
            for t in self.train_period:
                y = self.source.read(t, self.target_channels, slice(0, H), slice(0, W)).astype(np.float64)
                if self.target_stats is not None:
                    y = (y - self.target_stats.safe_mean[:, None, None]) / self.target_stats.safe_std[:, None, None]
                ok = np.isfinite(y)
                total += np.where(ok, y, 0.0)
                count += ok
            self._climatology = (total / np.maximum(count, 1)).astype(np.float32)
        return self._climatology

    def _load(self, image: int, channels: range, tile, stats: ChannelStats | None):
        """(x float32 [c, h, w] normalized, 0 where invalid; valid bool [c, h, w]; the number of
        invalid values read). The tile's part inside the image is read; its padding (if any) is
        invalid but not counted as invalid data."""
        rows, cols = tile.read_rows, tile.read_cols
        x = self.source.read(image, channels, rows, cols)  # float32 [c, h', w'], no-data already NaN
        valid = np.isfinite(x)
        bad = int(valid.size - np.count_nonzero(valid))
        if bad and self.strict:
            self._raise_invalid(image, channels, rows, cols, valid, bad)
        if stats is not None:
            x -= stats.safe_mean.astype(np.float32)[:, None, None]
            x /= stats.safe_std.astype(np.float32)[:, None, None]
        if bad:
            x[~valid] = 0.0
        return pad_to_tile(x, self.img_h, self.img_w, 0.0), pad_to_tile(valid, self.img_h, self.img_w, False), bad

    def _in_image(self, tile) -> np.ndarray:
        """bool [h, w]: False on the tile's padding."""
        inside = np.zeros((self.img_h, self.img_w), bool)
        inside[:tile.read_rows.stop - tile.read_rows.start, :tile.read_cols.stop - tile.read_cols.start] = True
        return inside

    def _tally(self, bad: int) -> None:
        if bad:
            self.invalid_count += bad
            self.invalid_samples += 1

    def _raise_invalid(self, image, channels, rows, cols, valid, bad):
        where = self.source.path
        if isinstance(self.source, ConcatSource):
            part, local = self.source.locate(image)
            where, image = part.path, local
        bad_ch = [channels.start + int(c) for c in np.nonzero(~valid.reshape(valid.shape[0], -1).all(axis=1))[0]]
        names = ", ".join(self.source.channel_names[c] for c in bad_ch[:8]) + (" ..." if len(bad_ch) > 8 else "")
        nodata = f" or the no-data value {self.source.nodata:g}" if self.source.nodata is not None else ""
        raise DataError(
            f"{bad} invalid values (NaN/Inf{nodata}) in {where}, image {image}, rows {rows.start}:{rows.stop}, "
            f"cols {cols.start}:{cols.stop}, channels {names}. Clean or fill the data, or turn strict checking off to "
            "mask invalid values out of the loss.")
