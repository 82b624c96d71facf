"""A prediction written as it is made: rows of float32 [N, planes, H, W] to .npy or .zarr.

The writer never holds the scene: ``write(i, r0, r1, block)`` puts rows [r0, r1) of image ``i``
(every plane, every column) in place and forgets them. A ``.npy`` is written with positioned
writes into a file whose header is made first (no memory map: the pages of a written map stay in
the process's resident memory until the kernel needs them, so a large scene's output would count
against it); a ``.zarr`` array takes the rows chunk by chunk.

What the input says about where and what its values are travels with the output:

- ``.zarr``: the array's attributes;
- ``.npy``: ``OUT.meta.json`` beside it, and ``OUT.channels.json`` (the channel sidecar the .npy
  reader reads) when the output's planes are named channels (mae, forecast, regress targets).

Kept: the task, the source, the planes' names (and wavelengths), the latitudes/longitudes of rows
and columns (NetCDF/Zarr coordinates), the time steps, and an ENVI header's ``map info`` /
``coordinate system string`` (for ``embed``, one value per patch: the patch centre's coordinates,
the map pixel size times the patch size).
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np


def _sidecars(path: str) -> dict[str, str]:
    stem = path[:-4] if path.endswith(".npy") else path
    return {"meta": stem + ".meta.json", "channels": stem + ".channels.json"}


def check_new(path: str) -> None:
    """Refuse an output path that exists (nothing is overwritten) or has no .npy/.zarr ending."""
    if not (path.endswith(".npy") or path.endswith(".zarr")):
        raise ValueError(f"--output {path}: give a .npy or .zarr path.")
    taken = [p for p in [path] + (list(_sidecars(path).values()) if path.endswith(".npy") else []) if os.path.exists(p)]
    if taken:
        raise FileExistsError(f"--output {path}: {taken[0]} already exists; choose a new name (nothing was "
                              "overwritten).")


class NpyOutput:
    def __init__(self, path: str, shape: tuple, meta: dict):
        self.path, self.shape = path, tuple(int(s) for s in shape)
        header = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=self.shape)  # header + size
        del header  # nothing touched: the data is a sparse file until written
        self.offset = os.path.getsize(path) - 4 * int(np.prod(self.shape))
        self.fd = os.open(path, os.O_WRONLY)
        self._write_meta(meta)

    def _write_meta(self, meta: dict) -> None:
        names = _sidecars(self.path)
        with open(names["meta"], "w") as f:
            json.dump(meta, f, indent=1)
        channels = {k: meta[k] for k in ("channel_names", "wavelengths") if meta.get(k) is not None}
        if channels and len(channels.get("channel_names") or channels.get("wavelengths")) == self.shape[1]:
            with open(names["channels"], "w") as f:
                json.dump(channels, f)

    def write(self, i: int, r0: int, r1: int, block: np.ndarray) -> None:
        _, planes, H, W = self.shape
        block = np.ascontiguousarray(block, np.float32)
        for k in range(planes):  # each plane's rows [r0, r1) are one contiguous run of the file
            at = self.offset + 4 * (((i * planes + k) * H + r0) * W)
            os.pwrite(self.fd, block[k].tobytes(), at)

    def close(self):
        os.close(self.fd)
        return np.load(self.path, mmap_mode="r")

    def abort(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass
        for p in [self.path] + list(_sidecars(self.path).values()):
            if os.path.exists(p):
                os.remove(p)


class ZarrOutput:
    def __init__(self, path: str, shape: tuple, meta: dict):
        import zarr
        self.path = path
        chunks = (1, min(shape[1], 64), min(shape[2], 256), min(shape[3], 256))
        self.array = zarr.open_array(path, mode="w-", shape=shape, chunks=chunks, dtype="float32",
                                     fill_value=float("nan"))
        self.array.attrs.update(meta)

    def write(self, i: int, r0: int, r1: int, block: np.ndarray) -> None:
        self.array[i, :, r0:r1] = block

    def close(self):
        return self.array

    def abort(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def open_output(path: str, shape: tuple, meta: dict):
    """A new output of ``shape`` [N, planes, H, W] at ``path`` (.npy or .zarr), with ``meta``."""
    check_new(path)
    return ZarrOutput(path, shape, meta) if path.endswith(".zarr") else NpyOutput(path, shape, meta)


def _patch_centres(values: np.ndarray, p: int) -> list:
    n = len(values) // p
    return np.asarray(values[:n * p], np.float64).reshape(n, p).mean(axis=1).tolist()


def _coarser_map_info(info, p: int):
    """ENVI ``map info`` for pixels ``p`` times larger: the tie point's pixel position and the
    pixel sizes (entries 1, 2 and 5, 6: {projection, ref x, ref y, easting, northing, x size, y size, ...})."""
    items = list(info) if isinstance(info, (list, tuple)) else [s.strip() for s in str(info).strip("{}").split(",")]
    try:
        for k in (1, 2):
            items[k] = f"{(float(items[k]) - 1.0) / p + 1.0:g}"
        for k in (5, 6):
            items[k] = f"{float(items[k]) * p:g}"
    except (IndexError, ValueError):
        return None  # not the layout we know: better none than a wrong one
    return "{" + ", ".join(str(v) for v in items) + "}"


def output_metadata(model, task: str, src, data_path) -> dict:
    """What the output keeps of the model and the input (see the module docstring)."""
    cfg = model.cfg
    meta: dict = {"task": task, "source": str(data_path), "producer": "dchag tools/predict.py"}
    names, wavelengths = cfg.channel_names, cfg.wavelengths
    if task == "mae":
        meta["channel_names"] = list(names) if names else None
        meta["wavelengths"] = list(wavelengths) if wavelengths else None
    elif task == "forecast":
        pc = list(cfg.predicted_channels)
        meta["channel_names"] = [names[c] for c in pc] if names else None
        meta["wavelengths"] = [wavelengths[c] for c in pc] if wavelengths else None
    elif task == "regress":
        meta["channel_names"] = (model.config.get("targets") or {}).get("names")
    elif task == "segment":
        meta["planes"] = ["class index"]
    p = cfg.patch_dim if task == "embed" else 1
    for key, values in (("latitudes", src.latitudes), ("longitudes", src.longitudes)):
        if values is not None:
            meta[key] = _patch_centres(values, p) if p > 1 else np.asarray(values, np.float64).tolist()
    times = getattr(src, "times", None)
    if times is not None:
        meta["times"] = [str(t) for t in np.asarray(times)]
        if getattr(src, "time_units", None):
            meta["time_units"] = str(src.time_units)
    header = getattr(src, "header", None)
    if isinstance(header, dict):
        for key in ("map info", "coordinate system string", "projection info"):
            if key in header:
                value = header[key]
                if key == "map info" and p > 1:
                    value = _coarser_map_info(value, p)
                elif isinstance(value, (list, tuple)):
                    value = "{" + ", ".join(str(v) for v in value) + "}"
                if value is not None:
                    meta[key.replace(" ", "_")] = value
    return {k: v for k, v in meta.items() if v is not None}
