"""A data set's fingerprint: what a checkpoint records of the data it was trained on, so that a
resume on other data is noticed (dchag/checkpointing/fingerprint.py compares them).

One record per data source, keyed by the source's name (one source today, ``"data"``; a blend of
several ``--data-path`` sources records one each under its own name):

    {"format": "dchag-data-fingerprint", "version": 1,
     "sources": {"data": {"reader": "npy", "images": N, "channels": C, "image_size": [H, W] | null,
                          "image_sizes": "<sha256 of every image's H x W>",
                          "channel_names": [...C], "wavelengths": [...C] | null,
                          "samples": {"train": S_t, "valid": S_v},
                          "content": "<sha256 of fixed small windows>", "windows": "<what was read>"}}}

No path and no modification time: a copy of the data to another cluster (another folder, new
dates) is the same data. The content digest is cheap at any size: up to ``IMAGES`` images spread
over the set, ``CHANNELS`` channels spread over the bands, three ``WINDOW`` x ``WINDOW`` windows
per image (top left, centre, bottom right), read in physical units (a change of dtype that keeps the
values keeps the digest; NaN counts as NaN whatever its bits). A change confined to pixels outside
the windows is not seen; the sizes, channels and sample counts are compared whole.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

from .readers.base import Source

FORMAT = "dchag-data-fingerprint"
IMAGES, CHANNELS, WINDOW = 8, 8, 8


def _spread(total: int, count: int) -> list[int]:
    """``count`` indices spread evenly over [0, total), first and last included."""
    return sorted({int(round(v)) for v in np.linspace(0, total - 1, min(total, count))}) if total else []


def _windows(H: int, W: int) -> list[tuple[slice, slice]]:
    h, w = min(WINDOW, H), min(WINDOW, W)
    corners = {(0, 0), ((H - h) // 2, (W - w) // 2), (H - h, W - w)}
    return [(slice(r, r + h), slice(c, c + w)) for r, c in sorted(corners)]


def content_digest(source: Source) -> tuple[str, str]:
    """(sha256 hex of the fixed windows, a phrase saying what was read)."""
    N, C = source.num_images, source.num_channels
    images, channels = _spread(N, IMAGES), _spread(C, CHANNELS)
    digest = hashlib.sha256()
    windows = 0
    for i in images:
        for rows, cols in _windows(*source.image_hw(i)):
            block = np.ascontiguousarray(source.read(i, channels, rows, cols), dtype=np.float32)
            block[np.isnan(block)] = np.nan  # one NaN, whatever bits the file stored
            digest.update(f"{i}:{rows.start}:{cols.start}:{block.shape}".encode())
            digest.update(block.tobytes())
            windows += 1
    return digest.hexdigest(), (f"{windows} windows of up to {WINDOW} x {WINDOW} pixels in {len(images)} image(s), "
                                f"{len(channels)} channel(s)")


def source_record(source: Source, samples: dict | None = None) -> dict:
    """The fingerprint of one source (``samples``: its {"train": n, "valid": n} sample counts)."""
    N, C, H, W = source.shape
    sizes = hashlib.sha256(json.dumps([list(source.image_hw(i)) for i in range(N)]).encode()).hexdigest()
    wavelengths = None if source.wavelengths is None else [
        float(w) if np.isfinite(w) else None for w in np.asarray(source.wavelengths, np.float64)]
    content, windows = content_digest(source)
    return {"reader": source.format, "images": int(N), "channels": int(C),
            "image_size": None if H is None else [int(H), int(W)], "image_sizes": sizes,
            "channel_names": [str(n) for n in source.channel_names], "wavelengths": wavelengths,
            "samples": dict(samples) if samples else None, "content": content, "windows": windows}


def fingerprint(sources: dict[str, dict]) -> dict:
    """The document of ``{name: source_record(...)}``."""
    return {"format": FORMAT, "version": 1, "sources": dict(sources)}


def _span(values) -> str:
    values = list(values)
    return ", ".join(map(str, values)) if len(values) <= 4 else f"{values[0]}, {values[1]} ... {values[-1]}"


def differences(saved: dict, current: dict) -> list[str]:
    """What changed from ``saved`` to ``current`` (two fingerprints), one phrase each; [] if nothing."""
    out = []
    before, after = saved.get("sources") or {}, current.get("sources") or {}
    for name in sorted(set(before) | set(after)):
        if name not in after:
            out.append(f"source {name!r} is gone")
            continue
        if name not in before:
            out.append(f"source {name!r} is new")
            continue
        a, b = before[name], after[name]
        where = f"{name}: " if len(after) > 1 or name != "data" else ""
        for key, what in (("reader", "format"), ("images", "images"), ("channels", "channels"),
                          ("image_size", "image size")):
            if a.get(key) != b.get(key):
                out.append(f"{where}{what} {a.get(key)} -> {b.get(key)}")
        if a.get("image_size") == b.get("image_size") and a.get("images") == b.get("images") and \
                a.get("image_sizes") != b.get("image_sizes"):
            out.append(f"{where}the sizes of its images")
        if a.get("channel_names") != b.get("channel_names"):
            out.append(f"{where}channel names {_span(a.get('channel_names') or [])} -> "
                       f"{_span(b.get('channel_names') or [])}")
        if a.get("wavelengths") != b.get("wavelengths"):
            out.append(f"{where}wavelengths")
        sa, sb = a.get("samples") or {}, b.get("samples") or {}
        for split, what in (("train", "training samples"), ("valid", "held-out samples")):
            if sa.get(split) is not None and sb.get(split) is not None and sa[split] != sb[split]:
                out.append(f"{where}{what} {sa[split]} -> {sb[split]}")
        if a.get("content") != b.get("content") and not out:
            out.append(f"{where}its values (a digest of {b.get('windows', 'fixed windows')} differs)")
        elif a.get("content") != b.get("content"):
            out.append(f"{where}its values")
    return out
