"""Write small images [N, C, H, W] in every supported format (tests, examples, conversions).

Each writer stores exactly the layout the matching reader expects, so
``open_source(write_X(path, data)).read(i)`` gives back ``data[i]`` (as float32).
"""

from __future__ import annotations

import os

import numpy as np

_ENVI_TYPES = {np.dtype("uint8"): 1, np.dtype("int16"): 2, np.dtype("int32"): 3, np.dtype("float32"): 4,
               np.dtype("float64"): 5, np.dtype("uint16"): 12, np.dtype("uint32"): 13, np.dtype("int64"): 14,
               np.dtype("uint64"): 15}


def write_npy(path, data: np.ndarray) -> str:
    np.save(path, np.asarray(data))
    return str(path)


def write_envi(path, cube: np.ndarray, *, interleave: str = "bsq", byte_order: int = 0, header_offset: int = 0,
               wavelengths=None, scale_factor: float | None = None, ignore_value=None, band_names=None,
               wavelength_units: str = "Nanometers") -> str:
    """``cube`` [C, H, W] (bands, lines, samples) -> ``path`` (.hdr) + data file ``<stem>.dat``."""
    cube = np.asarray(cube)
    C, H, W = cube.shape
    stem = os.path.splitext(str(path))[0]
    order = {"bsq": (0, 1, 2), "bil": (1, 0, 2), "bip": (1, 2, 0)}[interleave]
    raw = np.ascontiguousarray(cube.transpose(order)).astype(cube.dtype.newbyteorder(">" if byte_order else "<"))
    with open(stem + ".dat", "wb") as f:
        f.write(b"\0" * header_offset)
        f.write(raw.tobytes())
    lines = ["ENVI", f"samples = {W}", f"lines = {H}", f"bands = {C}", f"header offset = {header_offset}",
             "file type = ENVI Standard", f"data type = {_ENVI_TYPES[np.dtype(cube.dtype.name)]}",
             f"interleave = {interleave}", f"byte order = {byte_order}"]
    if wavelengths is not None:
        lines += [f"wavelength units = {wavelength_units}",
                  "wavelength = {" + ", ".join(f"{w:.6f}" for w in wavelengths) + "}"]
    if band_names is not None:
        lines.append("band names = {" + ", ".join(band_names) + "}")
    if scale_factor is not None:
        lines.append(f"reflectance scale factor = {scale_factor}")
    if ignore_value is not None:
        lines.append(f"data ignore value = {ignore_value}")
    hdr = stem + ".hdr"
    with open(hdr, "w") as f:
        f.write("\n".join(lines) + "\n")
    return hdr


def write_hdf5(path, data: np.ndarray, *, dataset: str = "data", chunk_channels: int | None = 1, **attrs) -> str:
    """[C, H, W] or [N, C, H, W]; chunked one channel (of one image) per chunk by default."""
    import h5py

    data = np.asarray(data)
    chunks = None
    if chunk_channels:
        chunks = (min(chunk_channels, data.shape[0]), *data.shape[1:]) if data.ndim == 3 else \
            (1, min(chunk_channels, data.shape[1]), *data.shape[2:])
    with h5py.File(path, "w") as f:
        d = f.create_dataset(dataset, data=data, chunks=chunks)
        for k, v in attrs.items():
            d.attrs[k] = v
    return str(path)


def write_zarr(path, data: np.ndarray, *, chunk_channels: int = 1, **attrs) -> str:
    """A plain Zarr array [C, H, W] or [N, C, H, W] (one channel per chunk by default)."""
    import zarr

    data = np.asarray(data)
    chunks = (chunk_channels, *data.shape[1:]) if data.ndim == 3 else (1, chunk_channels, *data.shape[2:])
    arr = zarr.create_array(str(path), shape=data.shape, dtype=data.dtype, chunks=chunks, overwrite=True)
    arr[...] = data
    arr.attrs.update({k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in attrs.items()})
    return str(path)


def weather_dataset(fields: dict[str, np.ndarray], latitudes: np.ndarray, longitudes: np.ndarray,
                    times: np.ndarray | None = None, levels: np.ndarray | None = None):
    """xarray Dataset: fields [T, H, W] (surface) or [T, L, H, W] (with ``levels``)."""
    import xarray as xr

    T = next(iter(fields.values())).shape[0]
    coords = {"time": ("time", np.arange(T) if times is None else times, {"units": "hours since 2000-01-01"}),
              "latitude": ("latitude", np.asarray(latitudes, np.float64)),
              "longitude": ("longitude", np.asarray(longitudes, np.float64))}
    if levels is not None:
        coords["level"] = ("level", np.asarray(levels))
    data_vars = {}
    for name, x in fields.items():
        dims = ("time", "latitude", "longitude") if x.ndim == 3 else ("time", "level", "latitude", "longitude")
        data_vars[name] = (dims, np.asarray(x))
    return xr.Dataset(data_vars, coords=coords)


def write_netcdf(path, fields, latitudes, longitudes, times=None, levels=None) -> str:
    weather_dataset(fields, latitudes, longitudes, times, levels).to_netcdf(path, engine="h5netcdf")
    return str(path)


def write_weather_zarr(path, fields, latitudes, longitudes, times=None, levels=None) -> str:
    weather_dataset(fields, latitudes, longitudes, times, levels).to_zarr(str(path), mode="w", consolidated=False)
    return str(path)
