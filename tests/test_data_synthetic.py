"""Synthetic source: deterministic, generated per channel/window, smooth and correlated."""

from __future__ import annotations

import numpy as np
import pytest

from dchag.data import DataError, open_source
from dchag.data.readers.synthetic import SyntheticSource
from dchag.parallel.partition import ChannelPartition


def test_deterministic_and_seeded():
    a = SyntheticSource(num_channels=20, height=16, width=16, num_images=3, seed=7)
    b = SyntheticSource(num_channels=20, height=16, width=16, num_images=3, seed=7)
    c = SyntheticSource(num_channels=20, height=16, width=16, num_images=3, seed=8)
    np.testing.assert_array_equal(a.read(1), b.read(1))
    assert not np.allclose(a.read(1), c.read(1))
    assert a.read(0).dtype == np.float32


@pytest.mark.parametrize("P", [1, 2, 4])
def test_per_channel_and_window_generation_matches_full(P):
    C = 13
    full = SyntheticSource(num_channels=C, height=12, width=10, num_images=2, seed=1).read(1)
    part = ChannelPartition(C, 4, P)
    for r in range(P):
        src = SyntheticSource(num_channels=C, height=12, width=10, num_images=2, seed=1)
        ch = part.rank_channels(r)
        np.testing.assert_array_equal(src.read(1, ch), full[ch.start:ch.stop])
        np.testing.assert_array_equal(src.read(1, ch, slice(3, 9), slice(2, 6)), full[ch.start:ch.stop, 3:9, 2:6])
        assert src.channels_read == set(ch)
        assert src.elements_read == len(ch) * (12 * 10 + 6 * 4)  # generated only what was asked


def test_rank_generation_cost_does_not_grow_with_c():
    """A rank generating 4 channels of a 100,000-channel image never builds C-sized arrays."""
    src = SyntheticSource(num_channels=100_000, height=8, width=8, num_images=1)
    x = src.read(0, range(50_000, 50_004))
    assert x.shape == (4, 8, 8) and np.isfinite(x).all()


def test_smooth_and_spectrally_correlated():
    src = SyntheticSource(num_channels=64, height=32, width=32, num_images=1, seed=3, noise=0.0)
    x = src.read(0).astype(np.float64)
    # spatial smoothness: neighbouring pixels differ much less than random pixels
    d_near = np.abs(np.diff(x, axis=2)).mean()
    d_far = np.abs(x - x[:, ::-1, ::-1]).mean()
    assert d_near < 0.5 * d_far
    # spectral correlation: adjacent bands are highly correlated across pixels
    flat = x.reshape(64, -1)
    r = np.corrcoef(flat[10], flat[11])[0, 1]
    assert r > 0.95


def test_open_source_spec_and_missing_sizes():
    src = open_source("synthetic:n=5,seed=3", num_channels=6, height=8, width=9)
    assert src.shape == (5, 6, 8, 9) and src.seed == 3
    with pytest.raises(DataError, match="needs height, width"):
        open_source("synthetic", num_channels=4)
    with pytest.raises(DataError, match="unknown synthetic option"):
        open_source("synthetic:colour=3", num_channels=4, height=4, width=4)
