"""The normalization a model was trained with, saved beside every checkpoint.

``DIR/iter_NNNNNNN/normalization.json`` (also copied into a consolidated export's config.json)::

    {"format": "dchag-normalization", "version": 1, "normalized": true, "num_channels": C,
     "channel_names": [...C], "wavelengths": [...C] | null,
     "mean": [...C], "std": [...C],          # as applied: x_model = (x - mean) / std
     "count": [...C],                        # valid values behind the statistics
     "data_path": "...", "data_format": "...", "nodata": raw no-data value | null,
     "targets": regress/segment only: the per-pixel targets' description (dchag/data/targets.py
                ``describe``): names and the training tiles' per-target mean/std (regress), or
                the class count, --ignore-index and the training class counts (segment)}

Training on P channel ranks holds each rank's channels' statistics only (that is what it
normalizes); :func:`gather` assembles all C over the channel-parallel group, once per run.

A blend (``--data-path W1 P1 W2 P2 ...``) normalizes each source with its own statistics: the
document's channels are the union's (C = |U|), ``sources`` holds one document as above per source
(its own channels, plus ``name`` and ``union_ids``: where each of its channels sits in the union),
and the top-level ``mean``/``std``/``count`` give each union channel the statistics of the first
source that has it (what a tool that feeds union-ordered channels applies).
"""

from __future__ import annotations

import math
import os

import numpy as np

from dchag.checkpointing import durable

FILE = "normalization.json"
FORMAT = "dchag-normalization"


def _floats(values) -> list:
    return [float(v) if math.isfinite(float(v)) else None for v in values]


def describe_dataset(dataset) -> dict:
    """This rank's share: {"channels": [start, stop], "mean", "std", "count"} (what the dataset
    applies), plus the source's metadata (names and wavelengths of all channels)."""
    stats = getattr(dataset, "stats", None)
    src = dataset.source
    d = {"num_channels": int(src.num_channels), "channel_names": [str(n) for n in src.channel_names],
         "wavelengths": None if src.wavelengths is None else _floats(np.asarray(src.wavelengths)),
         "data_path": src.path, "data_format": src.format,
         "nodata": None if src.nodata is None else float(src.nodata), "normalized": stats is not None}
    if getattr(dataset, "targets", None) is not None:
        d["targets"] = dataset.targets.describe()
    for s in ([stats, getattr(dataset, "target_stats", None)] if stats is not None else []):
        if s is None:
            continue
        d.setdefault("parts", []).append({"channels": [s.channels.start, s.channels.stop],
                                          "mean": s.safe_mean.tolist(), "std": s.safe_std.tolist(),
                                          "count": s.count.tolist()})
    return d


def merge(shares: list[dict]) -> dict:
    """One document from every rank's :func:`describe_dataset` (their channel ranges cover C)."""
    first = shares[0]
    C = first["num_channels"]
    doc = {"format": FORMAT, "version": 1, **{k: v for k, v in first.items() if k != "parts"}}
    if not first["normalized"]:
        return doc
    mean, std, count = [None] * C, [None] * C, [0] * C
    for share in shares:
        for part in share.get("parts", []):
            a, b = part["channels"]
            mean[a:b], std[a:b], count[a:b] = part["mean"], part["std"], part["count"]
    missing = [c for c in range(C) if mean[c] is None]
    if missing:
        raise ValueError(f"normalization statistics of channels {missing[:5]} are on no rank")
    doc.update(mean=[float(v) for v in mean], std=[float(v) for v in std], count=[int(v) for v in count])
    return doc


def gather(dataset, cfg=None) -> dict | None:
    """Collective over the channel-parallel group: the whole normalization document (None for a
    dataset that is not a dchag TileDataset: nothing known to save). A blend's dataset
    (``datasets``, one per source) needs the model's ``cfg`` (the union and the sources' ids)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    if dataset is not None and hasattr(dataset, "datasets") and cfg is not None and cfg.sources is not None:
        return merge_blend([gather(ds) for ds in dataset.datasets], cfg)
    if dataset is None or not hasattr(dataset, "source"):
        return None
    mine = describe_dataset(dataset)
    group = ps.get_channel_parallel_group()
    shares = [None] * dist.get_world_size(group)
    dist.all_gather_object(shares, mine, group=group)
    return merge(shares)


def merge_blend(docs: list[dict], cfg) -> dict:
    """One document for a blend from its sources' (see the module)."""
    C = cfg.num_channels
    normalized = all(d.get("normalized") for d in docs)
    doc = {"format": FORMAT, "version": 1, "normalized": normalized, "num_channels": C,
           "channel_names": list(cfg.channel_names) if cfg.channel_names else None,
           "wavelengths": list(cfg.wavelengths) if cfg.wavelengths else None,
           "sources": [{"name": name, "union_ids": list(ids), **d}
                       for name, ids, d in zip(cfg.source_names, cfg.sources, docs)]}
    if normalized:
        mean, std, count = [None] * C, [None] * C, [0] * C
        for ids, d in zip(cfg.sources, docs):
            for position, u in enumerate(ids):
                if mean[u] is None:
                    mean[u], std[u], count[u] = d["mean"][position], d["std"][position], d["count"][position]
        doc.update(mean=mean, std=std, count=count)
    return doc


def write(folder: str, doc: dict) -> str:
    return durable.write_json(os.path.join(folder, FILE), doc)


def read(folder: str) -> dict | None:
    return durable.read_json(os.path.join(folder, FILE))


def saved(folder: str) -> dict | None:
    """The normalization saved with a checkpoint folder (``normalization.json``) or a consolidated
    export (its config.json's ``normalization``), or None."""
    from dchag.checkpointing import consolidated
    if consolidated.is_consolidated(folder):
        return consolidated.read_config(folder).get("normalization")
    return read(folder)


def arrays(doc: dict | None) -> tuple[np.ndarray, np.ndarray] | None:
    """(mean, std) float32 [C] to apply, or None when the model was trained on raw values."""
    if not doc or not doc.get("normalized") or doc.get("mean") is None:
        return None
    return np.asarray(doc["mean"], np.float32), np.asarray(doc["std"], np.float32)
