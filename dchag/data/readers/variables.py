"""Gridded data sets whose *variables* are the channels (NetCDF, Zarr groups), read via xarray.

Layout understood (dimension names, case-insensitive):
- two spatial dims: latitude-like {lat, latitude, y, rows, ...} = H, longitude-like
  {lon, longitude, x, cols, ...} = W, in stored order (no regridding, no flipping);
- an optional level-like dim {level, plev, pressure_level, lev, band, channel, wavelength, ...}:
  a variable with it becomes one channel per level, named ``{var}_{level}`` (e.g. ``z_500``);
- one more dim is time = N (e.g. time, time_index, valid_time). Variables without it are
  static fields (land-sea mask, orography) repeated at every time step; they are used only
  when selected by name.

Channels are, by default, every data variable with a time dim and both spatial dims, in the
order the file stores them (NetCDF) or sorted by name (Zarr: a store has no defined member
order, and a directory listing differs between file systems); ``variables=[...]`` (or ``path::t2m,u10,z_500``) picks and orders
them -- names of variables (all their levels) or of single ``{var}_{level}`` channels.
A read of channel c at time n is one hyperslab ``var[n, (level,) rows, cols]``: only the
rank's variables are touched. xarray decodes CF ``_FillValue``/``missing_value`` to NaN and
applies ``scale_factor``/``add_offset``.
"""

from __future__ import annotations

import os
import warnings

import numpy as np

from ..errors import DataError
from .base import Source

LAT_NAMES = {"lat", "latitude", "lats", "y", "row", "rows", "height", "south_north", "rlat"}
LON_NAMES = {"lon", "longitude", "lons", "x", "col", "cols", "column", "columns", "width", "west_east", "rlon"}
LEVEL_NAMES = {"level", "levels", "plev", "pressure_level", "pressure", "lev", "isobaricinhpa", "height_level",
               "band", "bands", "channel", "channels", "wavelength", "wavelengths"}
_LATLON_COORDS = ({"lat", "latitude"}, {"lon", "longitude"})


def _fmt_level(v) -> str:
    v = v.item() if hasattr(v, "item") else v
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    return str(v)


class VariableSource(Source):
    _HANDLE_ATTRS = ("_ds",)

    def __init__(self, path: str, *, engine: str, format_name: str, variables=None, nodata=None,
                 open_kwargs: dict | None = None, sort_variables: bool = False):
        super().__init__(path)
        self.format = format_name
        self._engine = engine
        self._open_kwargs = dict(open_kwargs or {})
        self._sort = sort_variables
        ds = self._open()
        self._classify(ds, variables)
        if nodata is not None:  # a user override, compared after xarray's own decoding
            self.nodata = self._mask_value = float(nodata)

    # ---- opening --------------------------------------------------------------------------
    def _open(self):
        if self._fresh() or getattr(self, "_ds", None) is None:
            import xarray as xr

            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # e.g. zarr: non-zarr files inside a store
                    self._ds = xr.open_dataset(self.path, engine=self._engine, chunks=None,
                                               decode_times=False, **self._open_kwargs)
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise DataError(
                    f"{self.path} cannot be opened as {self.format} ({type(e).__name__}: {e}); the file is "
                    "truncated, damaged or of another format. Re-copy or regenerate it, or pass the right "
                    "--data-format.") from e
        return self._ds

    # ---- layout ---------------------------------------------------------------------------
    def _classify(self, ds, selection):
        entries = []  # (channel name, var, level index or None) for every candidate channel
        var_info = {}
        items = sorted(ds.data_vars.items()) if self._sort else ds.data_vars.items()
        for name, da in items:
            info = self._dims_of(name, da)
            if info is None:
                continue
            var_info[name] = info
            if info["level"] is None:
                entries.append((name, name, None))
            else:
                levels = ds[info["level"]].values if info["level"] in ds.coords else range(da.sizes[info["level"]])
                entries.extend((f"{name}_{_fmt_level(v)}", name, i) for i, v in enumerate(levels))
        if not entries:
            raise DataError(
                f"{self.path} has no variable with latitude/longitude (or y/x) dimensions; variables: "
                f"{ {k: v.dims for k, v in ds.data_vars.items()} }. Name the dims lat/lon (or y/x) or "
                "convert the data to [N, C, H, W] .npy/.h5.")

        if isinstance(selection, str):
            selection = [s.strip() for s in selection.split(",") if s.strip()]
        if selection:
            chosen = []
            by_channel = {e[0]: e for e in entries}
            for item in selection:
                if item in var_info:
                    chosen.extend(e for e in entries if e[1] == item)
                elif item in by_channel:
                    chosen.append(by_channel[item])
                else:
                    raise DataError(
                        f"{self.path} has no variable or channel {item!r}; available variables: "
                        f"{', '.join(var_info)}; channels: {', '.join(e[0] for e in entries[:40])}"
                        f"{' ...' if len(entries) > 40 else ''}. Fix the variable list.")
        else:
            has_time = [e for e in entries if var_info[e[1]]["time"] is not None]
            chosen = has_time or entries  # static-only data (one hyperspectral cube): N = 1

        times = {var_info[v]["time"] for _, v, _ in chosen} - {None}
        if len(times) > 1:
            raise DataError(f"{self.path}: the selected variables use different time dims {sorted(times)}; "
                            "select variables that share one time axis.")
        self.time_dim = times.pop() if times else None
        spatial = {(var_info[v]["lat"], var_info[v]["lon"]) for _, v, _ in chosen}
        if len(spatial) > 1:
            raise DataError(f"{self.path}: the selected variables lie on different grids {sorted(spatial)}; "
                            "select variables on one grid (or regrid them first).")
        lat_dim, lon_dim = spatial.pop()
        H, W = ds.sizes[lat_dim], ds.sizes[lon_dim]
        N = ds.sizes[self.time_dim] if self.time_dim else 1

        self._channels = [(v, li) for _, v, li in chosen]
        self._var_info = var_info
        self.channel_names = [n for n, _, _ in chosen]
        self._shape = (N, len(chosen), H, W)
        self._raw_itemsize = max(ds[v].dtype.itemsize for _, v, _ in chosen)
        self.lat_dim, self.lon_dim = lat_dim, lon_dim
        if lat_dim.lower() in _LATLON_COORDS[0] and lat_dim in ds.coords:
            self.latitudes = np.asarray(ds[lat_dim].values, np.float64)
        if lon_dim.lower() in _LATLON_COORDS[1] and lon_dim in ds.coords:
            self.longitudes = np.asarray(ds[lon_dim].values, np.float64)
        self.times = np.asarray(ds[self.time_dim].values) if self.time_dim and self.time_dim in ds.coords else None
        self.time_units = ds[self.time_dim].attrs.get("units") if self.times is not None else None
        levels = {var_info[v]["level"] for _, v, _ in chosen} - {None}
        if len(levels) == 1 and next(iter(levels)).lower().startswith("wavelength") and len(var_info) == 1:
            lev = next(iter(levels))
            if lev in ds.coords:
                self.wavelengths = np.asarray(ds[lev].values, np.float64)[[li for _, li in self._channels]]
        fills = [ds[v].encoding.get("_FillValue", ds[v].attrs.get("missing_value")) for _, v, _ in chosen]
        fills = [f for f in fills if f is not None]
        self.nodata = float(np.asarray(fills[0]).reshape(-1)[0]) if fills else None

    def _dims_of(self, name, da):
        dims = list(da.dims)
        lat = next((d for d in dims if d.lower() in LAT_NAMES), None)
        lon = next((d for d in dims if d.lower() in LON_NAMES), None)
        if lat is None or lon is None:
            return None
        level = next((d for d in dims if d.lower() in LEVEL_NAMES), None)
        rest = [d for d in dims if d not in (lat, lon, level)]
        time = None
        if rest:
            time = rest[0]
            extra = [d for d in rest[1:] if da.sizes[d] != 1]
            if extra:
                raise DataError(f"{self.path}: variable {name!r} has dims {tuple(dims)}; only one time dim, one "
                                f"level dim and lat/lon are understood, {extra} is extra. Select other "
                                "variables or reduce that dim first.")
        return {"time": time, "level": level, "lat": lat, "lon": lon, "dims": tuple(dims)}

    # ---- reading --------------------------------------------------------------------------
    def _read_block(self, index, c0, c1, r0, r1, k0, k1):
        ds = self._open()
        out = []
        for var, li in self._channels[c0:c1]:
            info = self._var_info[var]
            sel = {info["lat"]: slice(r0, r1), info["lon"]: slice(k0, k1)}
            if info["time"] is not None:
                sel[info["time"]] = index
            if li is not None:
                sel[info["level"]] = li
            for d in info["dims"]:
                if d not in sel:
                    sel[d] = 0  # a singleton dim
            da = ds[var].isel(sel).transpose(info["lat"], info["lon"])
            try:
                out.append(np.asarray(da.values))  # lazily indexed: reads just this hyperslab
            except (OSError, RuntimeError, ValueError) as e:
                raise DataError(f"reading {var!r} at {self.time_dim}={index} from {self.path} failed ({e}); "
                                "the file is truncated or damaged. Re-copy or regenerate it.") from e
        return np.stack(out) if out else np.zeros((0, r1 - r0, k1 - k0), np.float32)


def is_netcdf3(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(3) == b"CDF"


def open_netcdf(path: str, *, variables=None, nodata=None) -> VariableSource:
    """NetCDF-4 (HDF5-based) through xarray's h5netcdf engine (no C netCDF library needed)."""
    if not os.path.exists(path):
        raise DataError(f"data file {path!r} does not exist; check --data-path.")
    if os.path.isfile(path) and is_netcdf3(path):
        raise DataError(f"{path} is a NetCDF-3 (classic) file, which the h5netcdf engine cannot read; convert it "
                        "to NetCDF-4 (nccopy -k nc4 in.nc out.nc, or xarray: ds.to_netcdf(out, engine='h5netcdf')).")
    return VariableSource(path, engine="h5netcdf", format_name="netcdf", variables=variables, nodata=nodata)
