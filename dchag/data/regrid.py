"""First-order conservative regridding between regular latitude/longitude grids.

Each output cell gets the area-weighted mean of the input cells it overlaps, with weights equal
to the exact overlap area on the sphere: area = R^2 * d(sin lat) * d(lon). On a rectilinear
grid the overlap factorizes into a latitude part (overlap in sin(lat)) and a longitude part
(overlap in degrees, periodic), so the regrid is two small matrix products per field:

    out [h, w] = Wlat [h, H] @ x [H, W] @ Wlon[w, W]^T      (rows of Wlat, Wlon sum to 1)

Input cells are bounded half-way between neighbouring centres (clipped to +-90 at the poles).
NaN input cells are left out of the mean (their weight is dropped and the rest renormalized);
an output cell that sees only NaN stays NaN. The area-weighted global mean is preserved.
"""

from __future__ import annotations

import numpy as np


def cell_bounds(centers: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """[n, 2] (low, high) bounds half-way between centres (either order), clipped to [lo, hi]."""
    c = np.asarray(centers, np.float64)
    mid = (c[1:] + c[:-1]) / 2
    first = c[0] - (mid[0] - c[0]) if c.size > 1 else c[0] - 0.5
    last = c[-1] + (c[-1] - mid[-1]) if c.size > 1 else c[-1] + 0.5
    edges = np.concatenate([[first], mid, [last]])
    b = np.stack([np.minimum(edges[:-1], edges[1:]), np.maximum(edges[:-1], edges[1:])], axis=1)
    if lo is not None or hi is not None:
        b = np.clip(b, lo, hi)
    return b


def latitude_weights_matrix(src_lat: np.ndarray, dst_bounds: np.ndarray) -> np.ndarray:
    """[h, H] overlap in sin(latitude), rows normalized."""
    sb = np.sin(np.deg2rad(cell_bounds(src_lat, -90.0, 90.0)))  # [H, 2]
    db = np.sin(np.deg2rad(np.asarray(dst_bounds, np.float64)))  # [h, 2]
    ov = np.minimum(db[:, None, 1], sb[None, :, 1]) - np.maximum(db[:, None, 0], sb[None, :, 0])
    w = np.clip(ov, 0.0, None)
    return w / w.sum(axis=1, keepdims=True)


def longitude_weights_matrix(src_lon: np.ndarray, dst_bounds: np.ndarray, period: float = 360.0) -> np.ndarray:
    """[w, W] overlap in longitude on the circle, rows normalized."""
    sb = cell_bounds(src_lon)  # [W, 2]
    db = np.asarray(dst_bounds, np.float64)
    w = np.zeros((db.shape[0], sb.shape[0]))
    for shift in (-period, 0.0, period):
        ov = np.minimum(db[:, None, 1], sb[None, :, 1] + shift) - np.maximum(db[:, None, 0], sb[None, :, 0] + shift)
        w += np.clip(ov, 0.0, None)
    return w / w.sum(axis=1, keepdims=True)


def regular_grid(resolution_deg: float, north_to_south: bool = True):
    """Cell-centred global grid (WeatherBench style, e.g. 5.625 deg -> 32 x 64):
    (lat centres, lat bounds, lon centres from 0, lon bounds)."""
    n_lat = int(round(180.0 / resolution_deg))
    n_lon = int(round(360.0 / resolution_deg))
    lat_edges = -90.0 + resolution_deg * np.arange(n_lat + 1)
    lat_b = np.stack([lat_edges[:-1], lat_edges[1:]], axis=1)
    lat = lat_b.mean(axis=1)
    if north_to_south:
        lat, lat_b = lat[::-1].copy(), lat_b[::-1].copy()
    lon = resolution_deg * np.arange(n_lon)
    lon_b = np.stack([lon - resolution_deg / 2, lon + resolution_deg / 2], axis=1)
    return lat, lat_b, lon, lon_b


def conservative_regrid(x: np.ndarray, wlat: np.ndarray, wlon: np.ndarray) -> np.ndarray:
    """x [..., H, W] -> [..., h, w] (float64 arithmetic, NaN-aware)."""
    x = np.asarray(x, np.float64)
    ok = np.isfinite(x)
    num = wlat @ np.where(ok, x, 0.0) @ wlon.T
    den = wlat @ ok.astype(np.float64) @ wlon.T
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


def area_mean(x: np.ndarray, lat_bounds: np.ndarray, lon_width: np.ndarray) -> np.ndarray:
    """Area-weighted mean over the last two axes [.., H, W] given cell bounds/widths."""
    s = np.sin(np.deg2rad(np.asarray(lat_bounds)))
    a = np.abs(s[:, 1] - s[:, 0])[:, None] * np.asarray(lon_width)[None, :]
    return (x * a).sum(axis=(-2, -1)) / a.sum()
