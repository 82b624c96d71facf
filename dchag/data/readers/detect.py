"""``--data-format auto``: decide the format from a file's extension or a folder's content."""

from __future__ import annotations

import os

from ..errors import DataError

FORMATS = ("auto", "npy", "envi", "hdf5", "zarr", "netcdf", "synthetic")

_EXT = {".npy": "npy", ".hdr": "envi", ".h5": "hdf5", ".hdf5": "hdf5", ".hdf": "hdf5", ".he5": "hdf5",
        ".nc": "netcdf", ".nc4": "netcdf", ".netcdf": "netcdf", ".cdf": "netcdf", ".zarr": "zarr"}
# Files in a data folder that are not data: stats, notes, ENVI data files (their .hdr is the key).
_SKIP_SUFFIXES = (".json", ".md", ".txt", ".npz", ".png", ".csv", ".yaml", ".yml", ".log", ".aux.xml")


def split_selector(path: str) -> tuple[str, str | None]:
    """'file.h5::group/data' -> ('file.h5', 'group/data'); no selector -> (path, None)."""
    if "::" in str(path):
        base, sel = str(path).split("::", 1)
        return base, sel or None
    return str(path), None


def is_zarr_store(path: str) -> bool:
    return os.path.isdir(path) and any(os.path.exists(os.path.join(path, f)) for f in ("zarr.json", ".zgroup", ".zarray"))


def detect_format(path: str) -> str:
    """Format name of a file, store or folder (``synthetic`` for a 'synthetic[:spec]' path)."""
    path = str(path)
    if path == "synthetic" or path.startswith("synthetic:"):
        return "synthetic"
    if not os.path.exists(path):
        raise DataError(f"data path {path!r} does not exist; check --data-path (working directory {os.getcwd()!r}).")
    if is_zarr_store(path):
        return "zarr"
    if os.path.isdir(path):
        formats = {detect_format(f) for f in list_folder(path)}
        if len(formats) != 1:
            raise DataError(f"folder {path} holds files of several formats ({', '.join(sorted(formats))}); a data "
                            "folder must hold one format. Split it, or pass one file as --data-path.")
        return formats.pop()
    ext = os.path.splitext(path)[1].lower()
    if ext in _EXT:
        return _EXT[ext]
    stem = os.path.splitext(path)[0]
    if os.path.exists(path + ".hdr") or os.path.exists(stem + ".hdr"):
        return "envi"
    raise DataError(f"cannot tell the format of {path} from its extension {ext or '(none)'}; known: "
                    f"{', '.join(sorted(_EXT))} (ENVI: the .hdr). Pass --data-format "
                    f"{{{','.join(FORMATS[1:])}}}.")


def list_folder(folder: str, data_format: str | None = None) -> list[str]:
    """Data files (or Zarr stores) of a folder, sorted by name; the unit of concatenation."""
    entries = []
    names = sorted(os.listdir(folder))
    lower = {n.lower() for n in names}
    for name in names:
        full = os.path.join(folder, name)
        low = name.lower()
        if name.startswith(".") or low.endswith(_SKIP_SUFFIXES):
            continue
        if os.path.isdir(full) and not is_zarr_store(full):
            continue  # sub-folders are not searched: one folder = one data set
        stem, ext = os.path.splitext(low)
        if ext != ".hdr" and (stem + ".hdr" in lower or low + ".hdr" in lower):
            continue  # an ENVI data file: represented by its header
        if data_format and data_format != "auto":
            fmt = _EXT.get(ext) if ext in _EXT else ("zarr" if is_zarr_store(full) else None)
            if fmt is not None and fmt != data_format:
                continue
        entries.append(full)
    if not entries:
        raise DataError(f"folder {folder} holds no data files{f' of format {data_format}' if data_format else ''}; "
                        "check --data-path.")
    return entries
