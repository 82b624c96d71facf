"""Per-pixel targets of the dense tasks, tile-aligned with the input (``--target-path``).

    regress   K target maps: [K, H, W] (one input image) or [N, K, H, W] (N = the input's image
              count), in any format the readers open (npy, ENVI, HDF5, Zarr, NetCDF; a folder of
              files like the input's). Non-finite values and the format's no-data value are
              invalid: left out of the loss and the metrics.
    segment   one integer class map per image: [H, W] (.npy), [1, H, W], [N, H, W] or [N, 1, H, W].
              Pixels equal to --ignore-index (default 255) or NaN are ignored; any other value
              outside [0, --num-classes) is an error at start-up, naming the value.
    synthetic ``--target-path synthetic`` with ``--data-path synthetic:...``: the generator's
              endmember abundances (regress, K = its endmember count) or their argmax (segment).

A target tile is read at the input tile's image, rows and columns, so it shares the input's
tiles and train/held-out split; the padding of a tile past the image's edge is invalid
(``target_valid`` False), as in the input. Regression targets are normalized per target with the mean and
standard deviation of the *training* tiles' valid values (``fit``); the statistics travel with
every checkpoint and the export (``describe``), as the channels' do. Dataset items gain

    regress:  "target" float32 [K, h, w] (normalized, 0 where invalid), "target_valid" bool [K, h, w]
    segment:  "target" int64 [h, w] (0 where ignored),                  "target_valid" bool [h, w]
"""

from __future__ import annotations

import os

import numpy as np

from .errors import DataError
from .readers import open_source
from .readers.base import Source, require_file
from .stats import ChannelStats
from .tiles import pad_to_tile

SYNTHETIC = "synthetic"
KINDS = ("regress", "segment")  # the tasks whose samples carry per-pixel targets


class _PlaneSource(Source):
    """A 2-D .npy class map [H, W] as one image of one channel."""

    format = "npy"
    _HANDLE_ATTRS = ("_arr",)

    def __init__(self, path: str):
        super().__init__(path)
        H, W = self._open().shape
        self._shape = (1, 1, H, W)
        self.channel_names = ["class"]

    def _open(self) -> np.ndarray:
        if self._fresh() or getattr(self, "_arr", None) is None:
            self._arr = np.load(self.path, mmap_mode="r", allow_pickle=False)
        return self._arr

    def _read_block(self, index, c0, c1, r0, r1, k0, k1):
        return self._open()[None, r0:r1, k0:k1]


def _open_target_source(path: str, data: Source, data_format: str, kind: str) -> Source:
    if path == SYNTHETIC:
        from .readers.synthetic import SyntheticSource, SyntheticTargetSource
        if not isinstance(data, SyntheticSource):
            raise DataError(f"--target-path synthetic gives the synthetic generator's abundances, but --data-path is "
                            f"{data.describe()}; use --data-path synthetic:... or give a target file.")
        return SyntheticTargetSource(data, kind)
    require_file(path.split("::")[0], "target file", "--target-path")
    if path.endswith(".npy") and os.path.isfile(path):
        try:
            if np.load(path, mmap_mode="r", allow_pickle=False).ndim == 2:
                return _PlaneSource(path)
        except (ValueError, OSError):
            pass  # the npy reader names the problem
    return open_source(path, data_format)


class TargetMaps:
    """The target planes of every input image: ``read(image, rows, cols)`` -> float32 [K, h, w] in
    target units (NaN = invalid). Subclasses add what a task needs (statistics, class checks)."""

    kind = "?"

    def __init__(self, path: str, source: Source, data: Source, planes_are_images: bool):
        self.path, self.source = path, source
        self.invalid: dict | None = None  # set by fit: ignored target values (the start-up summary)
        # segment [N, H, W] read by every reader as one image of N channels: plane n is image n
        self.planes_are_images = planes_are_images
        self.num_planes = 1 if planes_are_images else source.num_channels
        N = data.num_images
        for i in range(N):
            got = source.image_hw(0 if planes_are_images else i)
            want = tuple(data.image_hw(i))
            if tuple(got) != want:
                # [H, W, K] read channels-first: K planes of W x K' -- say so
                last = " It looks channels-last ([H, W, K]): store it as [K, H, W] (np.moveaxis(a, -1, -3))." \
                    if (source.num_channels, got[0]) == want else ""
                raise DataError(f"--target-path {path}: image {i} of the targets is {got[0]} x {got[1]} but the input "
                                f"image is {want[0]} x {want[1]}; targets must be pixel-aligned with --data-path (the "
                                f"same H x W for every image).{last}")

    def read(self, image: int, rows: slice, cols: slice) -> np.ndarray:
        if self.planes_are_images:
            return self.source.read(0, range(image, image + 1), rows, cols)
        return self.source.read(image, range(self.num_planes), rows, cols)

    def read_tile(self, tile) -> np.ndarray:
        """float32 [K, h, w] of a tile (``dchag.data.tiles.Tile``): NaN (invalid) on its padding."""
        h, w = tile.rows.stop - tile.rows.start, tile.cols.stop - tile.cols.start
        return pad_to_tile(self.read(tile.image, tile.read_rows, tile.read_cols), h, w)

    def valid_mask(self, y: np.ndarray) -> np.ndarray:
        """Which raw values are targets (the rest are ignored): finite ones."""
        return np.isfinite(y)

    def _training_blocks(self, tiles):
        for tile in tiles:
            yield self.read(tile.image, tile.read_rows, tile.read_cols).astype(np.float64)


class RegressionTargets(TargetMaps):
    kind = "regress"

    def __init__(self, path, source, data):
        if source.num_images != data.num_images:
            raise DataError(f"--target-path {path} holds {source.num_images} image(s) of {source.num_channels} target "
                            f"map(s), but --data-path has {data.num_images} image(s): give [K, H, W] for one image or "
                            f"[N, K, H, W] with N = {data.num_images}, pixel-aligned with the input.")
        super().__init__(path, source, data, planes_are_images=False)
        self.names = [str(n) for n in source.channel_names]
        self.stats: ChannelStats | None = None

    def fit(self, train_tiles, all_tiles=()) -> None:
        """Per-target mean and std over the valid values of the training tiles (Chan's merge of
        per-tile moments, float64)."""
        K = self.num_planes
        count, mean, m2 = np.zeros(K, np.int64), np.zeros(K), np.zeros(K)
        invalid = _InvalidCount()
        for tile in _held_out(train_tiles, all_tiles):
            invalid.add("valid", self.valid_mask(self.read(tile.image, tile.read_rows, tile.read_cols)))
        for y in self._training_blocks(train_tiles):
            y = y.reshape(K, -1)
            ok = np.isfinite(y)
            invalid.add("train", ok)
            n_b = ok.sum(1)
            mean_b = np.where(ok, y, 0.0).sum(1) / np.maximum(n_b, 1)
            m2_b = (np.where(ok, y - mean_b[:, None], 0.0) ** 2).sum(1)
            n = count + n_b
            delta = mean_b - mean
            frac = n_b / np.maximum(n, 1)
            mean = mean + delta * frac
            m2 = m2 + m2_b + delta ** 2 * count * frac
            count = n
        empty = [self.names[k] for k in range(K) if count[k] == 0]
        if empty:
            raise DataError(f"--target-path {self.path}: target(s) {', '.join(empty[:5])} have no valid value in the "
                            "training tiles; nothing to learn from (check the no-data value and the alignment).")
        std = np.sqrt(m2 / count)
        self.stats = ChannelStats(mean, std, count, self.names)
        self.invalid = invalid.result()

    def reuse(self, saved: dict) -> None:
        """The statistics a checkpoint saved (``describe``) instead of the fitted ones."""
        self.stats = ChannelStats(np.asarray(saved["mean"], float), np.asarray(saved["std"], float),
                                  np.asarray(saved.get("count") or self.stats.count), self.names)

    def item(self, tile) -> dict:
        y = self.read_tile(tile)  # float32 [K, h, w], NaN on padding
        valid = np.isfinite(y)
        y = (y - self.stats.safe_mean.astype(np.float32)[:, None, None]) / self.stats.safe_std.astype(
            np.float32)[:, None, None]
        y[~valid] = 0.0
        import torch  # here, not at the top: the pre-flight opens the targets without torch
        return {"target": torch.from_numpy(y), "target_valid": torch.from_numpy(valid)}

    def describe(self) -> dict:
        s = self.stats
        return {"kind": self.kind, "path": self.path, "names": list(self.names), "mean": s.safe_mean.tolist(),
                "std": s.safe_std.tolist(), "count": s.count.tolist()}

    def summary(self) -> str:
        return (f"{self.num_planes} target map(s) from {self.path} ({', '.join(self.names[:6])}"
                f"{' ...' if self.num_planes > 6 else ''}), normalized with the training tiles' mean and std; "
                + _describe_invalid(self.invalid, "invalid target value(s) (NaN, Inf, no-data)"))


def _key(tile) -> tuple:
    return tile.image, tile.rows.start, tile.cols.start


def _held_out(train_tiles, all_tiles) -> list:
    train = {_key(t) for t in train_tiles}
    return [t for t in all_tiles if _key(t) not in train]


class _InvalidCount:
    """Invalid (ignored) target values of the training and the held-out tiles, for the start-up summary."""

    def __init__(self):
        self.counts = {"train": [0, 0], "valid": [0, 0]}

    def add(self, split: str, valid: np.ndarray) -> None:
        self.counts[split][0] += int(valid.size - valid.sum())
        self.counts[split][1] += int(valid.size)

    def result(self) -> dict:
        return {k: tuple(v) for k, v in self.counts.items()}


def _describe_invalid(invalid: dict | None, what: str) -> str:
    """'N <what> ignored: a of b (x %) in the training tiles, ... held out' (the start-up summary)."""
    if not invalid:
        return f"no {what} ignored"
    parts = [f"{bad:,} of {total:,} ({bad / total:.1%}) in the {name}" for name, (bad, total) in
             (("training tiles", invalid["train"]), ("held-out tiles", invalid["valid"])) if total]
    if not any(bad for bad, _ in invalid.values()):
        return f"no {what}"
    return f"{what} ignored: " + ", ".join(parts)


class ClassTargets(TargetMaps):
    kind = "segment"

    def __init__(self, path, source, data, num_classes: int, ignore_index: int | None):
        n, c = source.num_images, source.num_channels
        if c == 1 and n == data.num_images:
            planes_are_images = False
        elif n == 1 and c == data.num_images:
            planes_are_images = True  # [N, H, W]
        else:
            raise DataError(f"--target-path {path} has shape (N, C, H, W) = {source.shape}, but a class map is one "
                            f"plane per input image: [H, W], [1, H, W], [N, H, W] or [N, 1, H, W] with N = "
                            f"{data.num_images} (the images of --data-path).")
        super().__init__(path, source, data, planes_are_images)
        self.num_classes, self.ignore_index = int(num_classes), ignore_index
        self.names = [f"class{k}" for k in range(self.num_classes)]
        self.class_counts: np.ndarray | None = None

    def valid_mask(self, y: np.ndarray) -> np.ndarray:
        """Finite and not --ignore-index."""
        valid = np.isfinite(y)
        if self.ignore_index is not None:
            valid &= y != self.ignore_index
        return valid

    def classes(self, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Raw values -> (int64 classes, 0 where ignored; bool valid)."""
        valid = self.valid_mask(y)
        return np.where(valid, y, 0).astype(np.int64), valid

    def check_classes(self, data: Source, rows_per_block: int = 1024) -> None:
        """Every pixel of the class map (every image, whole, in row blocks) is a class of --num-classes
        K or ignored; else refused, naming the class count the map needs (the pre-flight)."""
        K, top, bad = self.num_classes, -1, None
        for image in range(data.num_images):
            H, W = data.image_hw(image)
            for r0 in range(0, H, rows_per_block):
                y = self.read(image, slice(r0, min(H, r0 + rows_per_block)), slice(0, W))[0]
                valid = self.valid_mask(y)
                if valid.any():
                    top = max(top, float(y[valid].max()))
                odd = valid & ((y != np.round(y)) | (y < 0))
                if bad is None and odd.any():
                    r, c = (int(v[0]) for v in np.nonzero(odd))
                    bad = (image, r0 + r, c, float(y[r, c]))
        ignore = f" and not --ignore-index {self.ignore_index}" if self.ignore_index is not None else ""
        if bad is not None:
            image, r, c, value = bad
            raise DataError(f"--target-path {self.path}: image {image}, row {r}, column {c} holds {value:g}, which is not "
                            f"a class (an integer >= 0){ignore}; mark such pixels with --ignore-index.")
        if top >= K:
            raise DataError(f"--target-path {self.path} holds class values 0 .. {top:g}{ignore}, so it needs "
                            f"--num-classes {int(top) + 1}, not {K} (or mark the pixels of the extra classes with "
                            "--ignore-index).")

    def fit(self, train_tiles, all_tiles=()) -> None:
        """Refuses values that are not a class, in every tile (training and held-out); counts the
        training tiles' classes (the majority-class baseline)."""
        K = self.num_classes
        counts = np.zeros(K, np.int64)
        invalid = _InvalidCount()
        train = {_key(t) for t in train_tiles}
        for tile in list(train_tiles) + _held_out(train_tiles, all_tiles):
            y = self.read(tile.image, tile.read_rows, tile.read_cols)[0]  # inside the image
            cls, valid = self.classes(y)
            invalid.add("train" if _key(tile) in train else "valid", valid)
            bad = valid & ((y != np.round(y)) | (y < 0) | (y >= K))
            if bad.any():
                r, c = (int(v[0]) for v in np.nonzero(bad))
                value = y[r, c]
                ignore = f" and not --ignore-index {self.ignore_index}" if self.ignore_index is not None else ""
                raise DataError(
                    f"--target-path {self.path}: image {tile.image}, row {tile.rows.start + r}, column "
                    f"{tile.cols.start + c} holds {value:g}, which is not a class of --num-classes {K} (an integer in "
                    f"[0, {K})){ignore}. Raise --num-classes, or mark such pixels with --ignore-index.")
            if _key(tile) in train:
                counts += np.bincount(cls[valid], minlength=K)
        if counts.sum() == 0:
            raise DataError(f"--target-path {self.path}: every pixel of the training tiles is ignored (NaN or "
                            f"--ignore-index {self.ignore_index}); nothing to learn from.")
        self.class_counts = counts
        self.invalid = invalid.result()

    def reuse(self, saved: dict) -> None:
        """The training class counts a checkpoint saved (``describe``) instead of the counted ones."""
        if int(saved.get("num_classes", -1)) == self.num_classes and saved.get("class_counts") is not None:
            self.class_counts = np.asarray(saved["class_counts"], np.int64)

    def item(self, tile) -> dict:
        cls, valid = self.classes(self.read_tile(tile)[0])
        import torch
        return {"target": torch.from_numpy(cls), "target_valid": torch.from_numpy(valid)}

    def describe(self) -> dict:
        return {"kind": self.kind, "path": self.path, "names": list(self.names), "num_classes": self.num_classes,
                "ignore_index": self.ignore_index, "class_counts": self.class_counts.tolist()}

    def summary(self) -> str:
        share = self.class_counts / max(int(self.class_counts.sum()), 1)
        return (f"class map from {self.path}, {self.num_classes} classes (training share "
                + ", ".join(f"{s:.0%}" for s in share[:10]) + (" ..." if self.num_classes > 10 else "")
                + (f"), --ignore-index {self.ignore_index}" if self.ignore_index is not None else ")") + "; "
                + _describe_invalid(self.invalid, "pixel(s) without a class (NaN or --ignore-index)"))


def open_targets(path: str, data: Source, *, kind: str, num_classes: int | None = None,
                 ignore_index: int | None = 255, data_format: str = "auto") -> TargetMaps:
    """The targets of ``kind`` ("regress" or "segment") at ``path``, checked against the input
    source ``data`` (image count and sizes). Not yet fitted: call ``fit(train_tiles, all_tiles)``."""
    if not path:
        raise DataError(f"--task {kind} needs --target-path (a file of per-pixel targets aligned with --data-path, "
                        "or 'synthetic' with synthetic data).")
    source = _open_target_source(str(path), data, data_format, kind)
    if kind == "regress":
        return RegressionTargets(str(path), source, data)
    if kind == "segment":
        if not num_classes or num_classes < 2:
            raise DataError(f"--task segment needs --num-classes K >= 2, got {num_classes}.")
        return ClassTargets(str(path), source, data, num_classes, ignore_index)
    raise DataError(f"targets of kind {kind!r}: use one of {', '.join(KINDS)}.")


def attach_targets(train, valid, path: str, *, kind: str, num_classes=None, ignore_index=255,
                   data_format: str = "auto", saved: dict | None = None) -> TargetMaps:
    """Open the targets beside ``train.source``, fit them on the training tiles and give both
    datasets the same object (items then carry "target" and "target_valid"). ``saved``: the
    targets' description a resumed or fine-tuned run's checkpoint saved (``describe``): when it is
    of the same kind and targets, its statistics (regress) / class counts (segment) are reused."""
    targets = open_targets(path, train.source, kind=kind, num_classes=num_classes, ignore_index=ignore_index,
                           data_format=data_format)
    train_tiles = [train.index.tile(s) for s in train.samples]
    targets.fit(train_tiles, [valid.index.tile(s) for s in valid.samples])  # also checks every value
    if saved and saved.get("kind") == kind and list(saved.get("names") or []) == list(targets.names):
        targets.reuse(saved)
    train.targets = valid.targets = targets
    return targets
