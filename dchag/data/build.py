"""One call from the training loop: open the data, resolve statistics, build both splits."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import DataError
from .readers import open_source
from .readers.base import Source


def open_data_source(data_path, data_format: str = "auto", *, task: str, img_h: int, img_w: int,
                     num_channels: int | None = None, seed: int = 0, source_opts: dict | None = None,
                     channels_last: bool = False) -> Source:
    """The Source training reads (metadata only until read; numpy only, no torch: the pre-flight
    opens the data with it): synthetic data takes its C/H/W from num_channels/img_h/img_w and its
    seed from ``seed`` unless the path or ``source_opts`` say otherwise. ``channels_last``
    (--channels-last): plain arrays are stored [H, W, C] / [N, H, W, C]."""
    opts = dict(source_opts or {})
    if channels_last:
        opts["channels_last"] = True
    if data_format == "synthetic" or str(data_path).startswith("synthetic"):
        from .readers.synthetic import parse_spec, spec_channel_count
        if num_channels is None and spec_channel_count(parse_spec(str(data_path))) is None:
            raise DataError("synthetic data needs --num-channels (or c=N or a band set in its spec: "
                            "synthetic:c=16,... or synthetic:bands=s2,...).")
        opts.setdefault("height", img_h)
        opts.setdefault("width", img_w)
        opts.setdefault("seed", seed)
        if task == "forecast":
            opts.setdefault("global_grid", True)
    return open_source(data_path, data_format, num_channels=num_channels, **opts)


def build_datasets(data_path, data_format: str = "auto", *, task: str, img_h: int, img_w: int,
                   channels: range | tuple | None = None, num_channels: int | None = None, lead_time: int = 1,
                   valid_fraction: float = 0.1, stats_path: str | None = None, normalize: bool = True,
                   strict: bool = False, seed: int = 0, source_opts: dict | None = None,
                   target_path: str | None = None, num_classes: int | None = None, ignore_index: int | None = 255,
                   lat_weighting: str = "area", channels_last: bool = False, saved_normalization: dict | None = None,
                   saved_from: str = "the checkpoint") -> tuple[TileDataset, TileDataset]:  # noqa: F821 - imported inside (torch)
    """(train, valid) datasets of this rank's ``channels`` over one shared source (a range, or for a
    blend's source a tuple of its channels, repeats allowed: ``SourceLayout.rank_source_channels``).

    - ``num_channels`` (--num-channels) is checked against the data (clear error on mismatch).
    - synthetic data takes its C/H/W from num_channels/img_h/img_w and its seed from ``seed``
      unless ``data_path`` ('synthetic:k=v,...') or ``source_opts`` say otherwise.
    - statistics come from the training samples only (``resolve_stats``): ``saved_normalization``
      (the normalization document a resumed or fine-tuned run's checkpoint or export saved,
      ``saved_from`` naming it) for every channel it names; else ``stats_path`` or the stats file
      beside the data when it covers this split's training samples; else computed on the fly over
      the training samples for the channels this rank needs (its own; all target channels for forecast).
    - regress/segment: the targets at ``target_path`` (dchag/data/targets.py), fitted on the
      training tiles (or their saved statistics), shared by both splits.
    - forecast: ``lat_weighting`` (--lat-weighting, "area" or "cos") weighs the rows of a grid
      with latitudes (``dchag.data.dataset.latitude_axis_weights``).
    """
    from .dataset import TileDataset, covering_range  # torch: the pre-flight opens the data with open_data_source alone
    from .stats import TrainingSamples, resolve_stats, stats_from_normalization
    from .targets import KINDS as TARGET_KINDS, attach_targets
    source = open_data_source(data_path, data_format, task=task, img_h=img_h, img_w=img_w, num_channels=num_channels,
                              seed=seed, source_opts=source_opts, channels_last=channels_last)
    C = source.num_channels
    channels = range(C) if channels is None else channels
    stats = None
    if normalize:
        need = range(C) if task == "forecast" else covering_range(channels)
        training = TrainingSamples.of(source, task, img_h, img_w, valid_fraction, lead_time)
        saved = stats_from_normalization(saved_normalization)
        if saved is not None:
            saved.origin = f"saved with {saved_from}"
        stats = resolve_stats(source, need, data_path=str(data_path), stats_path=stats_path, training=training,
                              saved=saved)
    common = dict(task=task, img_h=img_h, img_w=img_w, channels=channels, stats=stats,
                  valid_fraction=valid_fraction, lead_time=lead_time, strict=strict, lat_weighting=lat_weighting)
    train, valid = TileDataset(source, split="train", **common), TileDataset(source, split="valid", **common)
    if task in TARGET_KINDS:
        attach_targets(train, valid, target_path, kind=task, num_classes=num_classes, ignore_index=ignore_index,
                       saved=(saved_normalization or {}).get("targets"))
    return train, valid


@dataclass
class BlendSource:
    """One source of a blend, opened (metadata only)."""
    name: str  # in logs and TensorBoard (dchag.data.blend.unique_names)
    path: str
    source: Source
    channels: tuple[int, ...]  # the union ids of its channels, in its own order
    train_samples: int
    valid_samples: int
    weight: float = 0.0  # normalized

    def record(self) -> dict:
        """What the run's arguments, every checkpoint and the export keep of the source."""
        import math
        wl = self.source.wavelengths
        finite = [float(w) for w in (wl if wl is not None else []) if math.isfinite(float(w))]
        return {"name": self.name, "path": self.path, "format": self.source.format, "weight": self.weight,
                "channels": list(self.channels), "num_channels": self.source.num_channels,
                "train_samples": self.train_samples, "valid_samples": self.valid_samples,
                "wavelength_range": [min(finite), max(finite)] if finite else None}


def open_blend(spec, data_format: str = "auto", *, img_h: int, img_w: int, valid_fraction: float, seed: int = 0,
               prefer: str | None = None):
    """The sources of a blended ``--data-path`` (a ``dchag.data.blend.BlendSpec``) opened, their
    channels matched into one union (dchag/data/identity.py: by name, then wavelength) and their
    weights resolved: (union ChannelIds, [BlendSource]). Numpy only (the pre-flight calls it).

    Each source is read as it would be alone (its format, its own channel names and wavelengths);
    a synthetic source takes its channel count from its own spec (``synthetic:c=13,...``). ``prefer``
    (--match-channels): which identity stands where a name match's wavelengths contradict it."""
    from .blend import proportional_weights, unique_names
    from .identity import channel_ids, union_of
    from .readers.open import check_channel_axis
    from .readers.synthetic import parse_spec, spec_channel_count
    from .tiles import TileIndex, mae_split
    names = unique_names(spec.paths)
    opened, problems = [], []
    for name, path in zip(names, spec.paths):
        try:
            count = None
            if str(path).startswith("synthetic") or data_format == "synthetic":
                count = spec_channel_count(parse_spec(str(path)))
                if count is None:
                    raise DataError(f"data source {name} ({path}) of the blend: a synthetic source of a blend gives "
                                    "its channel count in its own spec, e.g. synthetic:c=16,... or a band set, "
                                    "synthetic:bands=s2,scene_channels=211 (--num-channels is the union of the sources' "
                                    "channels).")
            src = open_data_source(path, data_format, task="mae", img_h=img_h, img_w=img_w, num_channels=count,
                                   seed=seed)
            check_channel_axis(src, None)
            index = TileIndex([src.image_hw(i) for i in range(src.num_images)], img_h, img_w,
                              f"{src.format} data {src.path}")
            train = len(mae_split(index.num_samples, "train", valid_fraction))
            valid = len(mae_split(index.num_samples, "valid", valid_fraction))
            opened.append((name, str(path), src, train, valid))
        except DataError as e:
            problems.append(e)
    if problems:
        raise problems[0] if len(problems) == 1 else DataError("\n".join(str(p) for p in problems))
    labels = [f"data source {name} ({path})" for name, path, *_ in opened]
    ids = [channel_ids(src.channel_names, src.wavelengths, src.num_channels, where=label)
           for (_, _, src, _, _), label in zip(opened, labels)]
    union, per_source = union_of(ids, labels=labels, prefer=prefer)
    weights = spec.weights or proportional_weights([train for *_, train, _ in opened])
    sources = [BlendSource(name, path, src, chans, train, valid, w)
               for (name, path, src, train, valid), chans, w in zip(opened, per_source, weights)]
    return union, sources


def union_identity(union, sources) -> tuple[list[str], list]:
    """The union's channel names and wavelengths (nm or None), as ``args.channel_names`` /
    ``args.wavelengths`` record them: a channel's real name, else the name its first source gives it
    (a generated one: it identifies nothing, the wavelength does)."""
    names: list[str | None] = [c.name for c in union]
    for s in sources:
        for position, u in enumerate(s.channels):
            if names[u] is None:
                names[u] = str(s.source.channel_names[position])
    return [str(n) for n in names], [c.wavelength for c in union]
