"""Latitude-weighted RMSE and ACC, checked against direct numpy formulas and known cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dchag.tasks.weather_metrics import metric_sums, metrics_from_sums


def _case(seed=0, B=3, V=2, H=4, W=6):
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(B, V, H, W, generator=g)
    pred = target + 0.3 * torch.randn(B, V, H, W, generator=g)
    clim = 0.5 * torch.randn(1, V, H, W, generator=g).expand(B, V, H, W)
    lat = torch.cos(torch.linspace(-1.2, 1.2, H))[None].expand(B, H)
    valid = torch.rand(B, V, H, W, generator=g) > 0.1
    return pred, target, valid, lat, clim


def test_rmse_and_acc_match_direct_formulas():
    pred, target, valid, lat, clim = _case()
    std = [2.0, 0.5]
    m = metrics_from_sums(metric_sums(pred, target, valid, lat, clim), ["a", "b"], std)
    p, t, c, v = (x.double().numpy() for x in (pred, target, clim, valid))
    w = v * lat.double().numpy()[:, None, :, None]
    for k, name in enumerate("ab"):
        wk = w[:, k]
        rmse = std[k] * np.sqrt((wk * (p[:, k] - t[:, k]) ** 2).sum() / wk.sum())
        a, b = p[:, k] - c[:, k], t[:, k] - c[:, k]
        acc = (wk * a * b).sum() / np.sqrt((wk * a * a).sum() * (wk * b * b).sum())
        assert m[f"rmse/{name}"] == pytest.approx(rmse, rel=1e-12)
        assert m[f"acc/{name}"] == pytest.approx(acc, rel=1e-12)
        assert 0.5 < m[f"acc/{name}"] < 1.0


def test_known_cases_perfect_opposite_and_offset():
    _, target, valid, lat, clim = _case(seed=1)
    perfect = metrics_from_sums(metric_sums(target, target, valid, lat, clim), ["x", "y"])
    assert perfect["rmse/x"] == 0.0 and perfect["acc/y"] == pytest.approx(1.0)
    opposite = metrics_from_sums(metric_sums(2 * clim - target, target, valid, lat, clim), ["x", "y"])
    assert opposite["acc/x"] == pytest.approx(-1.0)
    offset = metrics_from_sums(metric_sums(target + 0.25, target, torch.ones_like(valid), lat, clim), ["x", "y"],
                               std=[4.0, 1.0])
    assert offset["rmse/x"] == pytest.approx(1.0) and offset["rmse/y"] == pytest.approx(0.25)


def test_sums_pool_over_micro_batches():
    """Sums of two halves equal the sums of the whole: what evaluation relies on when it adds
    micro-batches and data-parallel ranks."""
    pred, target, valid, lat, clim = _case(seed=2, B=4)
    whole = metric_sums(pred, target, valid, lat, clim)
    halves = sum(metric_sums(pred[s], target[s], valid[s], lat[s], clim[s]) for s in (slice(0, 2), slice(2, 4)))
    torch.testing.assert_close(halves, whole, rtol=1e-12, atol=1e-12)


def test_invalid_targets_are_left_out():
    pred, target, valid, lat, clim = _case(seed=3)
    garbage = torch.where(valid, target, torch.full_like(target, 1e6))
    torch.testing.assert_close(metric_sums(pred, garbage, valid, lat, clim), metric_sums(pred, target, valid, lat, clim))


# ---- pooled over tiles = the whole globe (WeatherBench 2's definitions, written out in numpy) ----

def _globe(tmp_path, H=12, W=8, lat=None):
    """A 10-step, 2-variable series on an H x W global grid (default cell-centred latitudes, north
    to south) whose persistence error grows towards the poles; NaN targets at the last step (a
    target only, never an input or in the climatology)."""
    rng = np.random.default_rng(7)
    lat = 90.0 - (np.arange(H) + 0.5) * 180.0 / H if lat is None else lat
    x = rng.normal(0.0, 1.0, (10, 2, H, W))
    x += np.cumsum(rng.normal(0.0, 1.0, (10, 2, H, W)) * (1.0 + np.abs(lat) / 30.0)[:, None], axis=0)
    x[9, 1, 0, :3] = np.nan
    from dchag.data.writers import write_netcdf
    path = write_netcdf(tmp_path / f"globe{H}.nc", {"a": x[:, 0], "b": x[:, 1]}, lat, np.arange(W) * 360.0 / W)
    return path, x, lat


def _wb2_lat_weights(lat, weighting="area"):
    """WeatherBench 2's row weights (metrics.get_lat_weights): the cell area between bounds
    [-90, midpoints, +90] of the increasing latitudes, sin(upper) - sin(lower), over its mean; or
    cos(lat) over its mean (ClimaX)."""
    if weighting == "cos":
        w = np.cos(np.deg2rad(lat))
        return w / w.mean()
    order = np.argsort(lat)
    up = np.deg2rad(lat[order])
    bounds = np.concatenate([[-np.pi / 2], (up[:-1] + up[1:]) / 2, [np.pi / 2]])
    area = np.empty_like(up)
    area[order] = np.sin(bounds[1:]) - np.sin(bounds[:-1])
    return area / area.mean()


def _numpy_globe_figures(x, lat, weighting="cos"):
    """Persistence forecasts from the held-out inputs 6, 7, 8 (10 steps, 4 held out), climatology =
    the mean of the training period (steps 0-5), WB2's weights over every row and column of the
    grid, per time then averaged (WB2)."""
    w_lat = _wb2_lat_weights(lat, weighting)[:, None]
    clim = x[:6].mean(axis=0)
    rmse, acc = [], []
    for v in range(2):
        mse_t, acc_t = [], []
        for t in (6, 7, 8):
            pred, obs = x[t, v], x[t + 1, v]
            w = np.where(np.isfinite(obs), w_lat, 0.0)
            obs = np.nan_to_num(obs)
            mse_t.append((w * (pred - obs) ** 2).sum() / w.sum())
            a, b = pred - clim[v], obs - clim[v]
            acc_t.append((w * a * b).sum() / np.sqrt((w * a * a).sum() * (w * b * b).sum()))
        rmse.append(np.sqrt(np.mean(mse_t)))
        acc.append(np.mean(acc_t))
    return rmse, acc


def _pooled_persistence(path, tile_h, tile_w, weighting="area", batch_size=5):
    from torch.utils.data import DataLoader

    from dchag.data import build_datasets
    _, valid = build_datasets(path, task="forecast", img_h=tile_h, img_w=tile_w, lead_time=1, valid_fraction=0.4,
                              lat_weighting=weighting)
    sums = 0
    for batch in DataLoader(valid, batch_size=batch_size):
        sums = sums + metric_sums(batch["images"], batch["target"], batch["target_valid"], batch["lat_weights"],
                                  batch["climatology"], batch["time_slot"], int(batch["time_slots"][0]))
    return metrics_from_sums(sums, ["a", "b"], valid.target_stats.safe_std)


@pytest.mark.parametrize("tile_h", [1, 2, 3, 4, 6, 12])
def test_rmse_and_acc_pooled_over_tiles_equal_the_whole_globe(tmp_path, tile_h):
    """Any tile height, tiles scattered over micro-batches of 5: the figures are the whole globe's."""
    path, x, lat = _globe(tmp_path)
    got = _pooled_persistence(path, tile_h, 4, "cos")
    rmse, acc = _numpy_globe_figures(x, lat)
    for v, name in enumerate("ab"):
        assert got[f"rmse/{name}"] == pytest.approx(rmse[v], rel=1e-5)
        assert got[f"acc/{name}"] == pytest.approx(acc[v], rel=1e-5)


GRIDS = {  # rows: (tile height, latitudes); none of the tile heights divides its grid
    13: (4, None),  # cell-centred, no pole rows
    36: (8, None),  # cell-centred 5 degrees (the grid)
    121: (16, np.linspace(90.0, -90.0, 121)),  # ERA5 at 1.5 degrees: pole rows
    721: (128, np.linspace(90.0, -90.0, 721)),  # ERA5 at 0.25 degrees: pole rows
}


@pytest.mark.parametrize("H", sorted(GRIDS))
def test_every_row_and_column_counts_when_tiles_do_not_divide_the_grid(tmp_path, H):
    """Grids of 13, 36, 121 and 721 rows and 7 columns cut into tiles that divide neither: the
    pooled RMSE and ACC are WeatherBench 2's whole-globe figures over every row and column
    (numpy, WB2's cell-area weights by default, cos(lat) with --lat-weighting cos). On the grids
    with pole rows the two weightings differ, on cell-centred grids they agree."""
    tile_h, lat = GRIDS[H]
    path, x, lat = _globe(tmp_path, H=H, W=7, lat=lat)
    figures = {}
    for weighting in ("area", "cos"):
        got = figures[weighting] = _pooled_persistence(path, tile_h, 4, weighting)
        rmse, acc = _numpy_globe_figures(x, lat, weighting)
        for v, name in enumerate("ab"):
            assert got[f"rmse/{name}"] == pytest.approx(rmse[v], rel=1e-5), (weighting, name)
            assert got[f"acc/{name}"] == pytest.approx(acc[v], rel=1e-5), (weighting, name)
    gap = abs(figures["area"]["rmse/a"] / figures["cos"]["rmse/a"] - 1)
    assert (gap > 1e-6) if H in (121, 721) else (gap < 1e-6), gap
    if H == 36:  # the rows a tile grid of 32 rows leaves out change the figure: all 36 are in it
        rmse32, _ = _numpy_globe_figures(x[:, :, :32], lat[:32])
        assert abs(figures["cos"]["rmse/a"] / rmse32[0] - 1) > 0.01


def test_area_weights_are_wb2s():
    """WB2's cell-area weights, either latitude order; cos(lat) where the grid has no pole rows."""
    from dchag.data.dataset import latitude_axis_weights
    for lat in (np.linspace(-90.0, 90.0, 121), np.linspace(90.0, -90.0, 721), 90.0 - (np.arange(32) + 0.5) * 5.625):
        np.testing.assert_allclose(latitude_axis_weights(lat, "area"), _wb2_lat_weights(lat), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(latitude_axis_weights(lat, "cos"), _wb2_lat_weights(lat, "cos"), atol=1e-12)
    poles = latitude_axis_weights(np.linspace(90.0, -90.0, 121), "area")
    assert poles[0] > 0 and poles[0] == pytest.approx(poles[-1]) and poles[0] < poles[1] / 4


def test_latitude_weights_are_normalized_over_the_whole_axis():
    from dchag.data import latitude_weights
    lat = 90.0 - (np.arange(12) + 0.5) * 15.0
    cos = np.cos(np.deg2rad(lat))
    polar, equatorial = latitude_weights(lat, slice(0, 3), 3), latitude_weights(lat, slice(5, 8), 3)
    np.testing.assert_allclose(polar, cos[0:3] / cos.mean(), rtol=1e-6)
    np.testing.assert_allclose(equatorial, cos[5:8] / cos.mean(), rtol=1e-6)
    assert polar.mean() < 0.6 < 1.0 < equatorial.mean()  # per-tile normalization made both 1


@pytest.mark.parametrize("tile_h", [2, 3])
def test_forecast_loss_pooled_over_micro_batches_is_the_whole_globe_mse(tmp_path, tile_h):
    """Evaluation's pooled sums, and training's per-micro-batch losses over the global batch's mean
    micro-batch weight averaged as DeepSpeed averages them, both give the whole globe's
    cos(lat)-weighted MSE, whichever micro-batch holds the polar tiles."""
    from torch.utils.data import DataLoader

    from dchag.data import build_datasets
    from dchag.tasks.forecast import error_sums, forecast_loss, loss_weight
    path, x, lat = _globe(tmp_path)
    _, valid = build_datasets(path, task="forecast", img_h=tile_h, img_w=8, lead_time=1, valid_fraction=0.4)
    std = valid.target_stats.safe_std
    batches = list(DataLoader(valid, batch_size=5))  # persistence; rows of tiles split over micro-batches
    pooled = sum(error_sums(b["images"].double(), b["target"], b["target_valid"], b["lat_weights"]) for b in batches)
    normalizer = sum(loss_weight(b) for b in batches) / len(batches)
    per_micro = [forecast_loss(b["images"].double(), b["target"], b["target_valid"], b["lat_weights"], normalizer)
                 for b in batches]
    w_lat = np.cos(np.deg2rad(lat))[:, None]
    err = w = 0.0
    for t in (6, 7, 8):
        for v in range(2):
            ok = np.isfinite(x[t + 1, v])
            wt = np.where(ok, w_lat, 0.0)
            err += (wt * ((x[t, v] - np.nan_to_num(x[t + 1, v])) / std[v]) ** 2).sum()
            w += wt.sum()
    assert float(pooled[0] / pooled[1]) == pytest.approx(err / w, rel=1e-6)
    assert float(sum(per_micro) / len(per_micro)) == pytest.approx(err / w, rel=1e-6)
    # the issue's failure: the mean of per-micro-batch ratios differs when tiles' latitudes differ
    ratios = np.mean([float(forecast_loss(b["images"].double(), b["target"], b["target_valid"], b["lat_weights"]))
                      for b in batches])
    assert abs(ratios - err / w) > 1e-3 * err / w
