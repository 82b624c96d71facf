"""One call from the training loop: open the data, resolve statistics, build both splits."""

from __future__ import annotations

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
        if num_channels is None:
            raise DataError("synthetic data needs --num-channels.")
        opts.setdefault("height", img_h)
        opts.setdefault("width", img_w)
        opts.setdefault("seed", seed)
        if task == "forecast":
            opts.setdefault("global_grid", True)
    return open_source(data_path, data_format, num_channels=num_channels, **opts)


def build_datasets(data_path, data_format: str = "auto", *, task: str, img_h: int, img_w: int,
                   channels: range | None = None, num_channels: int | None = None, lead_time: int = 1,
                   valid_fraction: float = 0.1, stats_path: str | None = None, normalize: bool = True,
                   strict: bool = False, seed: int = 0, source_opts: dict | None = None,
                   target_path: str | None = None, num_classes: int | None = None, ignore_index: int | None = 255,
                   lat_weighting: str = "area", channels_last: bool = False, saved_normalization: dict | None = None,
                   saved_from: str = "the checkpoint") -> tuple[TileDataset, TileDataset]:  # noqa: F821 - imported inside (torch)
    """(train, valid) datasets of this rank's ``channels`` over one shared source.

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
    from .dataset import TileDataset  # torch: the pre-flight opens the data with open_data_source alone
    from .stats import TrainingSamples, resolve_stats, stats_from_normalization
    from .targets import KINDS as TARGET_KINDS, attach_targets
    source = open_data_source(data_path, data_format, task=task, img_h=img_h, img_w=img_w, num_channels=num_channels,
                              seed=seed, source_opts=source_opts, channels_last=channels_last)
    C = source.num_channels
    channels = range(C) if channels is None else channels
    stats = None
    if normalize:
        need = range(C) if task == "forecast" else channels
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
