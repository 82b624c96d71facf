"""Reconstruction pictures and the conservative regrid used for the bundled ERA5 sample."""

from __future__ import annotations

import numpy as np
import torch

from dchag.data.regrid import (area_mean, cell_bounds, conservative_regrid, latitude_weights_matrix,
                               longitude_weights_matrix, regular_grid)
from dchag.data.visualize import rgb_channels, save_reconstruction_png


def test_rgb_channel_choice():
    wl = np.linspace(400, 900, 100)
    r, g, b = rgb_channels(100, wl)
    assert abs(wl[r] - 640) < 5 and abs(wl[g] - 550) < 5 and abs(wl[b] - 460) < 5
    assert rgb_channels(8) == [6, 4, 2]
    assert rgb_channels(20, np.linspace(1000, 2500, 20)) == [15, 10, 5]  # SWIR only: spread channels


def test_png_written_for_every_mask_form(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.random((30, 16, 16)).astype(np.float32)
    rec = img + 0.05 * rng.standard_normal(img.shape).astype(np.float32)
    wl = np.linspace(400, 900, 30)
    patch_mask = rng.random((4, 4)) < 0.75
    for i, mask in enumerate([patch_mask, patch_mask.reshape(-1), np.kron(patch_mask, np.ones((4, 4))) > 0,
                              np.where(np.kron(patch_mask, np.ones((4, 4)))[None] > 0, np.nan, img)]):
        p = save_reconstruction_png(tmp_path / f"r{i}.png", torch.from_numpy(img), mask, rec, wavelengths=wl)
        data = open(p, "rb").read()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_conservative_regrid_preserves_area_mean_and_constants():
    lat = np.linspace(90, -90, 181)
    lon = np.arange(360.0)
    lat_c, lat_b, lon_c, lon_b = regular_grid(5.625)
    assert lat_c.shape == (32,) and lon_c.shape == (64,) and lat_c[0] > lat_c[-1]
    wl, wo = latitude_weights_matrix(lat, lat_b), longitude_weights_matrix(lon, lon_b)
    x = np.random.default_rng(0).random((2, 181, 360))
    y = conservative_regrid(x, wl, wo)
    assert y.shape == (2, 32, 64)
    before = area_mean(x, cell_bounds(lat, -90, 90), np.ones(360))
    after = area_mean(y, lat_b, np.full(64, 5.625))
    np.testing.assert_allclose(after, before, rtol=1e-10)
    np.testing.assert_allclose(conservative_regrid(np.full((181, 360), 3.0), wl, wo), 3.0)
    # NaN cells drop out of the mean; a cell that sees only NaN stays NaN
    x[0, :3, :5] = np.nan
    assert np.isfinite(conservative_regrid(x, wl, wo)).all()
    x[0, :10] = np.nan  # rows 90..81 N: the whole first 5.625 deg row band (90..84.375 N)
    y = conservative_regrid(x, wl, wo)
    assert np.isnan(y[0, 0]).all() and np.isfinite(y[0, 1:]).all()
