"""The one entry point: ``open_source(path, data_format="auto", **opts) -> Source``."""

from __future__ import annotations

import os

from ..errors import DataError
from .base import Source
from .channel_axis import ChannelsFirstArray
from .concat import ConcatSource
from .detect import FORMATS, detect_format, is_zarr_store, list_folder, split_selector


def open_source(path, data_format: str = "auto", *, num_channels: int | None = None, **opts) -> Source:
    """Open ``path`` (file, Zarr store, folder of files, or 'synthetic[:k=v,...]') as a Source.

    ``opts`` go to the reader: ``nodata`` (override the file's no-data value), ``wavelengths``,
    ``channel_names`` (npy/hdf5/zarr arrays), ``variables`` (netcdf/zarr weather: list or
    comma string), ``dataset``/``array`` (hdf5/zarr), ``channels_last`` (plain arrays stored
    [H, W, C] / [N, H, W, C]: --channels-last), synthetic's ``num_channels, height, width,
    num_images, seed, ...``. ``num_channels`` (from --num-channels) is checked against the data;
    ``src.channel_axis_note`` is the start-up note of a plain array whose shape fits either layout
    (``channel_axis``), or None.
    """
    channels_last = bool(opts.pop("channels_last", False))
    if data_format not in FORMATS:
        raise DataError(f"--data-format {data_format!r} is not one of {', '.join(FORMATS)}.")
    path = str(path) if path is not None else "synthetic"
    if data_format == "synthetic" or (data_format == "auto" and (path == "synthetic" or path.startswith("synthetic:"))):
        from .synthetic import SyntheticSource, parse_spec, spec_channel_count

        kw = dict(opts)
        if num_channels is not None:
            kw.setdefault("num_channels", num_channels)
        kw.update(parse_spec(path))
        if "num_channels" not in kw and spec_channel_count(kw) is not None:  # bands=s2: its 13 bands
            kw["num_channels"] = spec_channel_count(kw)
        missing = [k for k in ("num_channels", "height", "width") if k not in kw]
        if missing:
            raise DataError(f"synthetic data needs {', '.join(missing)} (from --num-channels/--img-h/--img-w or "
                            "--data-path synthetic:num_channels=..,height=..,width=..).")
        src = SyntheticSource(path, **kw)
    else:
        base, selector = split_selector(path)
        fmt = detect_format(base) if data_format == "auto" else data_format
        if not os.path.exists(base):
            raise DataError(f"data path {base!r} does not exist; check --data-path (working directory {os.getcwd()!r}).")
        if os.path.isdir(base) and not is_zarr_store(base) and not (fmt == "zarr" and base.endswith(".zarr")):
            files = list_folder(base, fmt)
            parts = [_open_one(f, fmt, selector, opts, channels_last) for f in files]
            src = parts[0] if len(parts) == 1 else ConcatSource(base, parts)
        else:
            src = _open_one(base, fmt, selector, opts, channels_last)
    if channels_last and not all(isinstance(part, ChannelsFirstArray) for part in getattr(src, "parts", [src])):
        raise DataError(f"--channels-last is for plain arrays (.npy, HDF5 and Zarr arrays), but {src.describe()} "
                        "names its axes itself (ENVI interleave, NetCDF/Zarr dimension names, synthetic data): drop "
                        "--channels-last.")
    src.channel_axis_note = _opening_notes(src)
    if num_channels is not None:
        src.channel_axis_note = check_channel_axis(src, num_channels)
        if src.num_channels != num_channels:
            raise DataError(
                f"{src.describe()} has {src.num_channels} channels but --num-channels is {num_channels}; set "
                f"--num-channels {src.num_channels} (or select {num_channels} variables/bands of the data).")
    return src


def check_channel_axis(src: Source, num_channels: int | None, counted_by: str | None = None) -> str | None:
    """Plain arrays (.npy, HDF5/Zarr arrays; every file of a folder): refuse unless the channel
    count (``num_channels``; None: the arrays' own metadata) fits their declared layout (channels
    first, or ``--channels-last``). No guess from the shape (``channel_axis``); other formats name
    their channels axis themselves. Returns the start-up note when a shape fits either layout."""
    notes = [part.check_channel_axis(num_channels, counted_by) for part in getattr(src, "parts", [src])
             if isinstance(part, ChannelsFirstArray)]
    return _one_note([n for n in notes if n])


def _opening_notes(src: Source) -> str | None:
    """The notes the parts of ``src`` made when they opened (their metadata's count)."""
    return _one_note([n for part in getattr(src, "parts", [src]) if (n := getattr(part, "channel_axis_note", None))])


def _one_note(notes: list[str]) -> str | None:
    """One line for a folder: the first file's note, and how many more files it holds for."""
    if not notes:
        return None
    return notes[0] + (f" (The same holds for {len(notes) - 1} more file(s) of the folder.)" if len(notes) > 1 else "")


def _open_one(path: str, fmt: str, selector: str | None, opts: dict, channels_last: bool = False) -> Source:
    opts = dict(opts)
    if fmt in ("npy", "hdf5", "zarr") and channels_last:  # the plain-array readers (zarr: an array, not a group)
        opts["channels_last"] = True
    if fmt == "npy":
        from .npy import NpySource

        return NpySource(path, **opts)
    if fmt == "envi":
        from .envi import EnviSource

        return EnviSource(path, **opts)
    if fmt == "hdf5":
        from .hdf5 import Hdf5Source

        if selector:
            opts["dataset"] = selector
        return Hdf5Source(path, **opts)
    if fmt == "zarr":
        from .zarr_store import open_zarr

        return open_zarr(path, selector=selector, **opts)
    if fmt == "netcdf":
        from .variables import open_netcdf

        if selector:
            opts["variables"] = selector
        return open_netcdf(path, **opts)
    raise DataError(f"format {fmt!r} cannot be opened from a path; choose one of {', '.join(FORMATS[1:])}.")
