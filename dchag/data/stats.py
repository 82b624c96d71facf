"""Per-channel normalization statistics: compute, save beside the data, load, slice per rank.

File (JSON; an ``.npz`` with the same keys is also accepted):

    {"format": "dchag-channel-stats", "version": 1, "num_channels": C,
     "channel_names": [...C], "mean": [...C], "std": [...C], "count": [...C],   # valid values only
     "source": "<path>", "data_format": "envi", "shape": [N, C, H, W]}

Statistics exclude invalid values (non-finite and the format's no-data value), in the physical
units ``Source.read`` returns. Training normalizes with statistics of its **training samples
only** (``TrainingSamples``: the training tiles, or the training period of a forecast): no
held-out pixel shapes the normalization it is scored with. A file records which samples it covers
(``"training_samples"``: the split that defines them, beside the data's ``shape``); one computed
over the whole data set has none. Where it lives: ``<data file without extension>.stats.json``
beside a file or store, or ``<folder>/stats.json`` for a folder of files (see :func:`stats_path_for`).
Training uses that file only if it covers exactly this run's training samples, else computes them
at start-up (``resolve_stats``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np

from .errors import DataError
from .readers.base import Source
from .readers.detect import split_selector

STATS_FORMAT = "dchag-channel-stats"


@dataclass
class ChannelStats:
    """mean/std/count [C'] of channels ``channels`` (a range of global channel indices)."""

    mean: np.ndarray
    std: np.ndarray
    count: np.ndarray
    channel_names: list[str]
    channels: range = None  # type: ignore[assignment]
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.mean = np.asarray(self.mean, np.float64)
        self.std = np.asarray(self.std, np.float64)
        self.count = np.asarray(self.count, np.int64)
        if self.channels is None:
            self.channels = range(len(self.mean))

    @property
    def safe_std(self) -> np.ndarray:
        """std with 1 where a channel is constant or has no valid value (avoid dividing by 0)."""
        s = self.std.copy()
        s[~np.isfinite(s) | (s <= 0)] = 1.0
        return s

    @property
    def safe_mean(self) -> np.ndarray:
        m = self.mean.copy()
        m[~np.isfinite(m)] = 0.0
        return m

    def select(self, channels: range) -> "ChannelStats":
        """The statistics of global ``channels`` (must be covered by these stats)."""
        lo, hi = channels.start - self.channels.start, channels.stop - self.channels.start
        if channels.step != 1 or lo < 0 or hi > len(self.mean):
            raise DataError(f"statistics cover channels {self.channels.start}..{self.channels.stop - 1}, not "
                            f"{channels.start}..{channels.stop - 1}; recompute them with tools/compute_stats.py.")
        out = ChannelStats(self.mean[lo:hi], self.std[lo:hi], self.count[lo:hi],
                           self.channel_names[lo:hi], channels, dict(self.meta))
        if hasattr(self, "origin"):
            out.origin = self.origin
        return out

    def to_dict(self) -> dict:
        return {"format": STATS_FORMAT, "version": 1, "num_channels": len(self.mean),
                "channel_names": list(self.channel_names), "mean": self.mean.tolist(),
                "std": self.std.tolist(), "count": self.count.tolist(), **self.meta}


def stats_path_for(data_path: str) -> str:
    """Default stats file of a data path: beside a file/store, inside a plain folder."""
    base, _ = split_selector(str(data_path))
    base = base.rstrip("/\\")
    from .readers.detect import is_zarr_store

    if os.path.isdir(base) and not is_zarr_store(base) and not base.endswith(".zarr"):
        return os.path.join(base, "stats.json")
    stem, ext = os.path.splitext(base)
    return (stem if ext else base) + ".stats.json"


@dataclass(frozen=True)
class TrainingSamples:
    """The training samples of a run's split, for its statistics: ``windows`` (image, rows, cols)
    holding exactly their pixels (``dchag.data.tiles.training_windows``), ``key`` what a stats file
    records to say it covers them, ``description`` for messages."""

    key: dict
    windows: tuple
    description: str

    @classmethod
    def of(cls, source: Source, task: str, img_h: int, img_w: int, valid_fraction: float,
           lead_time: int = 1) -> "TrainingSamples":
        from .tiles import training_windows
        if task == "forecast":
            key = {"split": "time", "valid_fraction": float(valid_fraction), "lead_time": int(lead_time)}
            sizes = [source.image_hw(0)] * source.num_images
        else:
            key = {"split": "tiles", "img_h": int(img_h), "img_w": int(img_w), "valid_fraction": float(valid_fraction)}
            sizes = [source.image_hw(i) for i in range(source.num_images)]
        windows = tuple(training_windows(sizes, task, img_h, img_w, valid_fraction, lead_time))
        if task == "forecast":
            what = f"the training period (time steps 0-{len(windows) - 1} of {source.num_images})"
        else:
            what = (f"the training tiles ({img_h} x {img_w}, the last {valid_fraction:g} of the tiles held out)")
        return cls(key, windows, what)

    def flags(self) -> str:
        """tools/compute_stats.py's flags for these samples."""
        k = self.key
        if k["split"] == "time":
            return f"--task forecast --valid-fraction {k['valid_fraction']:g} --lead-time {k['lead_time']}"
        return f"--task mae --img-h {k['img_h']} --img-w {k['img_w']} --valid-fraction {k['valid_fraction']:g}"

    def elements(self, num_channels: int) -> int:
        return num_channels * sum((r.stop - r.start) * (c.stop - c.start) for _, r, c in self.windows)


def compute_stats(source: Source, channels: range | None = None, max_block_elements: int = 1 << 24,
                  max_images: int | None = None, progress=None, training: TrainingSamples | None = None
                  ) -> ChannelStats:
    """Per-channel mean/std over the pixels of ``training`` (the training samples' windows), or
    else over all images (or the first ``max_images``) of ``source``, for ``channels`` (default all).

    Streams window by window and channel block by channel block (at most ``max_block_elements``
    float32 values in memory) and merges partial (count, mean, M2) with Chan's formula, in float64.
    ``progress(windows_done, windows)`` (a float: whole windows plus the channel fraction) after each block.
    """
    C = source.num_channels
    channels = range(C) if channels is None else channels
    n_ch = len(channels)
    count = np.zeros(n_ch, np.int64)
    mean = np.zeros(n_ch, np.float64)
    m2 = np.zeros(n_ch, np.float64)
    if training is not None:
        windows = list(training.windows)
    else:
        num = source.num_images if max_images is None else min(max_images, source.num_images)
        windows = [(i, None, None) for i in range(num)]
    num = len(windows)
    for i, (image, rows, cols) in enumerate(windows):
        H, W = source.image_hw(image)
        area = (H if rows is None else rows.stop - rows.start) * (W if cols is None else cols.stop - cols.start)
        step = max(1, max_block_elements // max(1, area))
        for j0 in range(0, n_ch, step):
            j1 = min(n_ch, j0 + step)
            x = source.read(image, range(channels.start + j0, channels.start + j1), rows, cols).astype(np.float64)
            x = x.reshape(j1 - j0, -1)
            ok = np.isfinite(x)
            n_b = ok.sum(axis=1)
            xs = np.where(ok, x, 0.0)
            with np.errstate(invalid="ignore", divide="ignore"):
                mean_b = np.where(n_b > 0, xs.sum(axis=1) / np.maximum(n_b, 1), 0.0)
                m2_b = (np.where(ok, x - mean_b[:, None], 0.0) ** 2).sum(axis=1)
            n_a = count[j0:j1]
            n = n_a + n_b
            delta = mean_b - mean[j0:j1]
            with np.errstate(invalid="ignore", divide="ignore"):
                frac = np.where(n > 0, n_b / np.maximum(n, 1), 0.0)
            mean[j0:j1] += delta * frac
            m2[j0:j1] += m2_b + delta ** 2 * n_a * frac
            count[j0:j1] = n
            if progress is not None:
                progress(i + j1 / n_ch, num)
    std = np.where(count > 0, np.sqrt(m2 / np.maximum(count, 1)), np.nan)
    mean = np.where(count > 0, mean, np.nan)
    names = [source.channel_names[c] for c in channels]
    meta = {"source": source.path, "data_format": source.format, "shape": list(source.shape),
            "channel_start": channels.start}
    if training is not None:
        meta["training_samples"] = dict(training.key)
    return ChannelStats(mean, std, count, names, channels, meta)


def save_stats(stats: ChannelStats, path: str) -> str:
    """Write JSON (or .npz by extension) atomically: a crash never leaves a half-written file."""
    src = stats.meta.get("source")
    if src and os.path.exists(str(src).split("::")[0]):
        rel = os.path.relpath(os.path.abspath(src), os.path.dirname(os.path.abspath(path)))
        if not rel.startswith(".."):  # beside the data: relative, so data and stats move together
            stats = ChannelStats(stats.mean, stats.std, stats.count, stats.channel_names, stats.channels,
                                 {**stats.meta, "source": rel})
    tmp = f"{path}.tmp{os.getpid()}"
    if path.endswith(".npz"):
        d = stats.to_dict()
        with open(tmp, "wb") as f:  # a dict (training_samples) as JSON text: npz holds no objects
            np.savez(f, **{k: np.asarray(json.dumps(v) if isinstance(v, dict) else v) for k, v in d.items()
                           if k != "meta"})
    else:
        with open(tmp, "w") as f:
            json.dump(stats.to_dict(), f, indent=1)
            f.write("\n")
    os.replace(tmp, path)
    return path


def load_stats(path: str, source: Source | None = None) -> ChannelStats:
    """Read a stats file; with ``source``, check it describes the same channels."""
    if not os.path.exists(path):
        raise DataError(f"statistics file {path} does not exist; create it with "
                        f"`python tools/compute_stats.py --data-path <data>` (or pass the right stats path).")
    try:
        if path.endswith(".npz"):
            with np.load(path, allow_pickle=False) as z:
                d = {k: z[k].tolist() for k in z.files}
        else:
            with open(path) as f:
                d = json.load(f)
        mean, std = d["mean"], d["std"]
        count = d.get("count", [1] * len(mean))
        names = [str(n) for n in d.get("channel_names", [f"ch{i}" for i in range(len(mean))])]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"statistics file {path} is unreadable or incomplete ({type(e).__name__}: {e}); delete it and "
                        "rerun tools/compute_stats.py.") from e
    if not (len(mean) == len(std) == len(count) == len(names)):
        raise DataError(f"statistics file {path} has lists of different lengths; rerun tools/compute_stats.py.")
    if isinstance(d.get("training_samples"), str):  # an .npz file's JSON text
        d["training_samples"] = json.loads(d["training_samples"])
    start = int(d.get("channel_start", 0))
    meta = {k: v for k, v in d.items() if k not in ("mean", "std", "count", "channel_names", "format", "version",
                                                    "num_channels")}
    stats = ChannelStats(np.asarray(mean, float), np.asarray(std, float), np.asarray(count),
                         names, range(start, start + len(mean)), meta)
    if source is not None:
        check_stats_match(stats, source, path)
    return stats


def check_stats_match(stats: ChannelStats, source: Source, path: str = "statistics") -> None:
    C = source.num_channels
    if stats.channels != range(C):
        raise DataError(f"{path} has statistics for {len(stats.mean)} channels but {source.describe()} has {C}; the "
                        "file belongs to other data. Rerun `python tools/compute_stats.py --data-path "
                        f"{source.path}`.")
    if list(stats.channel_names) != list(source.channel_names):
        bad = next(i for i, (a, b) in enumerate(zip(stats.channel_names, source.channel_names)) if a != b)
        raise DataError(f"{path}: channel {bad} is {stats.channel_names[bad]!r} in the statistics but "
                        f"{source.channel_names[bad]!r} in the data; the file belongs to other data (or another "
                        "variable selection). Rerun tools/compute_stats.py for this data.")


def resolve_stats(source: Source, channels: range, *, data_path: str | None = None, stats_path: str | None = None,
                  training: TrainingSamples | None = None, saved: "ChannelStats | None" = None,
                  max_on_the_fly_elements: int = 1 << 27) -> ChannelStats:
    """Statistics for ``channels`` of ``source``, from the training samples only:

    1. ``saved`` (a resumed or fine-tuned run: the statistics saved with its checkpoint or export),
       for every channel whose name it holds; the others as below;
    2. ``stats_path`` when given (an explicit file, used as given: it must exist);
    3. the file beside the data, if it covers exactly ``training`` (its ``training_samples`` and
       the data's shape); a file over the whole data set (held-out samples included) is not used;
    4. else computed at start-up over ``training``'s pixels for ``channels`` only (each channel's
       statistics depend only on that channel, so every rank gets the numbers a full computation
       would give, without reading other ranks' channels), if the rank's share is small; else an
       error naming the tools/compute_stats.py command for these training samples.
    Synthetic data (stationary by construction) uses the training samples of its first 4 images.
    ``training`` None: every sample (the API's default when no split is known)."""
    names = source.channel_names
    if saved is not None:
        matched = [c for c in channels if names[c] in saved.channel_names]
        if matched:
            fresh = None if len(matched) == len(channels) else resolve_stats(
                source, channels, data_path=data_path, stats_path=stats_path, training=training,
                max_on_the_fly_elements=max_on_the_fly_elements)
            return _from_saved(saved, source, channels, fresh)
    if source.format == "synthetic" and not stats_path:
        # Stationary by construction: a few images give the statistics of all of them.
        if training is None:
            return _origin(compute_stats(source, channels, max_images=4), "computed at start-up from 4 synthetic images")
        first = TrainingSamples(training.key, tuple(w for w in training.windows if w[0] < 4), training.description)
        return _origin(compute_stats(source, channels, training=first),
                       f"computed at start-up from {training.description}, their first 4 synthetic images")
    if stats_path:
        return _origin(load_stats(stats_path, source).select(channels), f"file {stats_path}")  # must exist
    path = stats_path_for(data_path) if data_path else None
    candidates = [path] if path else []
    if data_path and os.path.isdir(str(data_path)) and len(getattr(source, "parts", [None])) == 1:
        from .readers.detect import list_folder  # a folder holding one file: that file's stats count too

        candidates += [stats_path_for(f) for f in list_folder(str(data_path))][:1]
    passed = ""
    for cand in candidates:
        if os.path.exists(cand):
            stats = load_stats(cand, source)
            if training is None or covers(stats, source, training):
                return _origin(stats.select(channels), f"file {cand}")
            passed = f"; {cand} covers {_coverage(stats)}, not this run's training samples: not used"
            break
    where = training.description if training is not None else "every sample"
    need = training.elements(len(channels)) if training is not None else source.num_images * len(channels) * int(
        np.prod(max(source.image_hw(i) for i in range(source.num_images))))
    if need > max_on_the_fly_elements:
        flags = f" {training.flags()}" if training is not None else ""
        raise DataError(
            f"no statistics file of {where} for {source.describe()} (looked for {path}{passed}) and the data is too "
            f"large ({need:,} values for this rank's channels) to compute them at start-up; run `python "
            f"tools/compute_stats.py --data-path {data_path or source.path}{flags} --force` once before training.")
    return _origin(compute_stats(source, channels, training=training), f"computed at start-up from {where}{passed}")


def covers(stats: ChannelStats, source: Source, training: TrainingSamples) -> bool:
    """Whether a statistics file covers exactly ``training``'s samples of this data."""
    return stats.meta.get("training_samples") == training.key and list(stats.meta.get("shape", [])) == [
        None if v is None else int(v) for v in source.shape]


def _coverage(stats: ChannelStats) -> str:
    key = stats.meta.get("training_samples")
    return "every sample (held-out ones included)" if not key else f"other training samples ({key})"


def stats_from_normalization(doc: dict | None) -> ChannelStats | None:
    """The statistics a checkpoint or export saved (``dchag.checkpointing.normalization``'s
    document: channel names, mean, std, count), or None when it has none."""
    if not doc or not doc.get("normalized") or doc.get("mean") is None:
        return None
    return ChannelStats(np.asarray(doc["mean"], float), np.asarray(doc["std"], float),
                        np.asarray(doc.get("count") or [0] * len(doc["mean"])), [str(n) for n in doc["channel_names"]],
                        meta={"saved": True})


def _from_saved(saved: ChannelStats, source: Source, channels: range, fresh: ChannelStats | None) -> ChannelStats:
    """``channels``' statistics from ``saved`` by channel name, the rest from ``fresh``."""
    names = source.channel_names
    position = {n: k for k, n in enumerate(saved.channel_names)}
    mean = np.array([saved.mean[position[names[c]]] if names[c] in position else fresh.mean[c - channels.start]
                     for c in channels])
    std = np.array([saved.std[position[names[c]]] if names[c] in position else fresh.std[c - channels.start]
                    for c in channels])
    count = np.array([saved.count[position[names[c]]] if names[c] in position else fresh.count[c - channels.start]
                      for c in channels])
    out = ChannelStats(mean, std, count, [names[c] for c in channels], channels, {"saved": True})
    kept = sum(names[c] in position for c in channels)
    origin = getattr(saved, "origin", "saved")
    if fresh is None:
        return _origin(out, origin)
    return _origin(out, f"{origin} for {kept} of {len(channels)} channels (by name); the others "
                        f"{getattr(fresh, 'origin', 'computed')}")


def _origin(stats: ChannelStats, origin: str) -> ChannelStats:
    """Where the statistics came from, for the start-up summary (kept out of saved files)."""
    stats.origin = origin
    return stats
