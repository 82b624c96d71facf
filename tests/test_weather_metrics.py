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
