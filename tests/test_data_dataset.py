"""Tiles, splits, normalization, invalid-value masking, forecast items, statistics files."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from dchag.data import (DataError, TileDataset, build_datasets, compute_stats, load_stats, open_source, save_stats,
                        stats_path_for)
from dchag.data.stats import TrainingSamples
from dchag.data.writers import write_envi, write_netcdf, write_npy
from dchag.parallel.partition import ChannelPartition

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FENIX = os.path.join(ROOT, "data", "samples", "fenix_450band", "image.hdr")
ERA5 = os.path.join(ROOT, "data", "samples", "era5_5.625deg.nc")


def npy_stack(tmp_path, n=2, c=13, h=10, w=12, seed=0):
    x = np.random.default_rng(seed).normal(5.0, 2.0, (n, c, h, w)).astype(np.float32)
    return write_npy(tmp_path / "x.npy", x), x


def test_tiles_non_overlapping_and_cover_the_image(tmp_path):
    path, x = npy_stack(tmp_path, n=2, h=10, w=12)
    src = open_source(path)
    ds = TileDataset(src, img_h=4, img_w=6, split="all")
    assert len(ds) == 2 * 3 * 2  # 2 images x ceil(10 / 4) x 12 / 6 tiles: the last tile row padded
    item = ds[3]  # image 0, tile row 1, col 1
    np.testing.assert_array_equal(item["images"].numpy(), x[0, :, 4:8, 6:12])
    assert item["valid"].all() and item["in_image"].all() and item["index"].item() == 3
    np.testing.assert_array_equal(ds[6]["images"].numpy(), x[1, :, 0:4, 0:6])
    # the last tile row: rows 8-9 read, rows 10-11 padding (invalid, zero-filled, not counted as bad data)
    src.reset_counters()
    edge = ds[5]  # image 0, tile row 2, col 1
    assert src.elements_read == 13 * 2 * 6  # only the part inside the image is asked for
    np.testing.assert_array_equal(edge["images"][:, :2].numpy(), x[0, :, 8:10, 6:12])
    assert edge["valid"][:, :2].all() and not edge["valid"][:, 2:].any() and (edge["images"][:, 2:] == 0).all()
    assert edge["in_image"][:2].all() and not edge["in_image"][2:].any() and ds.invalid_count == 0
    # every pixel of every image lies in exactly one tile
    seen = np.zeros((2, 12, 12), int)
    for i in range(len(ds)):
        t = ds.index.tile(i)
        seen[t.image, t.rows, t.cols] += ds[i]["in_image"].numpy()
    assert (seen[:, :10] == 1).all() and (seen[:, 10:] == 0).all()


def test_image_smaller_than_tile_is_clear(tmp_path):
    path, _ = npy_stack(tmp_path, h=10, w=12)
    with pytest.raises(DataError, match=r"10 x 12 .*smaller than one 16 x 16 tile.*--img-h <= 10.*--img-w <= 12"):
        TileDataset(open_source(path), img_h=16, img_w=16)


@pytest.mark.parametrize("P", [1, 2, 4])
def test_rank_datasets_hold_only_their_channels(P, tmp_path):
    path, x = npy_stack(tmp_path)
    full = TileDataset(open_source(path), img_h=5, img_w=6, split="all")
    part = ChannelPartition(13, 4, P)
    pieces = []
    for r in range(P):
        src = open_source(path)
        ds = TileDataset(src, img_h=5, img_w=6, split="all", channels=part.rank_channels(r))
        pieces.append(ds[5]["images"])
        assert src.channels_read == set(part.rank_channels(r))
    torch.testing.assert_close(torch.cat(pieces), full[5]["images"], rtol=0, atol=0)


def test_split_is_deterministic_and_disjoint(tmp_path):
    path, _ = npy_stack(tmp_path, n=5, h=10, w=12)  # 5 x 4 = 20 tiles
    src = open_source(path)
    tr = TileDataset(src, img_h=5, img_w=6, split="train", valid_fraction=0.2)
    va = TileDataset(src, img_h=5, img_w=6, split="valid", valid_fraction=0.2)
    assert list(tr.samples) == list(range(16)) and list(va.samples) == list(range(16, 20))
    assert va[0]["index"].item() == 16


def test_normalization_uses_stats_sliced_to_the_rank(tmp_path):
    path, x = npy_stack(tmp_path)
    src = open_source(path)
    stats = compute_stats(src)
    np.testing.assert_allclose(stats.mean, x.mean(axis=(0, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(stats.std, x.std(axis=(0, 2, 3)), rtol=1e-4)
    ds = TileDataset(src, img_h=10, img_w=12, split="all", channels=range(4, 7), stats=stats)
    got = ds[1]["images"].numpy()
    want = (x[1, 4:7] - stats.mean[4:7, None, None]) / stats.std[4:7, None, None]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_invalid_values_masked_counted_and_strict(tmp_path):
    x = np.ones((1, 4, 8, 8), np.float32)
    x[0, 1, 2, 3] = np.nan
    x[0, 2, 0, 0] = np.inf
    x[0, 3, 7, 7] = -9999  # no-data
    path = write_npy(tmp_path / "bad.npy", x)
    src = open_source(path, nodata=-9999)
    ds = TileDataset(src, img_h=8, img_w=8, split="all")
    item = ds[0]
    valid = item["valid"].numpy()
    assert valid.sum() == x.size - 3
    assert not valid[1, 2, 3] and not valid[2, 0, 0] and not valid[3, 7, 7]
    assert (item["images"].numpy()[~valid] == 0).all() and torch.isfinite(item["images"]).all()
    assert ds.invalid_count == 3 and ds.invalid_samples == 1
    strict = TileDataset(src, img_h=8, img_w=8, split="all", strict=True)
    with pytest.raises(DataError, match=r"3 invalid values .*no-data value -9999.*bad.npy.*strict"):
        strict[0]


def test_bundled_fenix_mae_items():
    ch = ChannelPartition(450, 8, 4).rank_channels(1)  # groups of 57, 57, 56, ...: channels 114..225
    train, valid = build_datasets(FENIX, task="mae", img_h=8, img_w=8, num_channels=450, channels=ch)
    assert len(train) + len(valid) == 5 * 3  # ceil(38 / 8) x ceil(23 / 8): the last row and column padded
    item = train[0]
    assert item["images"].shape == (len(ch), 8, 8) and item["images"].dtype == torch.float32
    assert item["valid"].dtype == torch.bool
    assert abs(float(item["images"].mean())) < 3  # normalized by the bundled statistics
    assert train.source.channels_read == set(ch)
    # the cube's 12 no-data zeros sit in bands 0-4; every one of them (the tiles cover the whole
    # cube, 8 x 8 tiles of 38 x 23, the last row and column padded) is masked and counted by rank 0;
    # the padding is masked too but not counted as bad data
    raw = np.fromfile(FENIX[:-4] + ".dat", "<u2").reshape(450, 38, 23)
    t0, _ = build_datasets(FENIX, task="mae", img_h=8, img_w=8, channels=range(0, 112), valid_fraction=0.0)
    items = [t0[i] for i in range(len(t0))]
    masked = sum(int((~it["valid"] & it["in_image"]).sum()) for it in items)
    padding = sum(int((~it["in_image"]).sum()) for it in items) * 112
    assert padding == (40 * 24 - 38 * 23) * 112
    assert masked == t0.invalid_count == int((raw[:112] == 0).sum()) == 12


def test_bundled_era5_forecast_items():
    part = ChannelPartition(5, 5, 1)
    train, valid = build_datasets(ERA5, task="forecast", img_h=32, img_w=64, num_channels=5, lead_time=2,
                                  channels=part.rank_channels(0), valid_fraction=0.25)
    # 24 steps, 6 held out: train inputs t in [0, 16), valid inputs t in [18, 22)
    assert len(train) == 16 and len(valid) == 4
    item = valid[0]
    assert item["images"].shape == (5, 32, 64) and item["target"].shape == (5, 32, 64)
    assert item["target_valid"].all() and item["lat_weights"].shape == (32,)
    assert float(item["lat_weights"].mean()) == pytest.approx(1.0, abs=1e-6)
    assert item["lat_weights"][16] > item["lat_weights"][0]  # equator weighs more than the pole row
    # the target is the state 2 steps later: the input of sample t+2
    full, _ = build_datasets(ERA5, task="forecast", img_h=32, img_w=64, lead_time=2, valid_fraction=0.0)
    torch.testing.assert_close(full[5]["target"], full[7]["images"])


def test_forecast_rank_input_all_channel_target(tmp_path):
    x = np.random.default_rng(1).normal(size=(6, 7, 4, 8)).astype(np.float32)
    fields = {f"v{c}": x[:, c] for c in range(7)}
    path = write_netcdf(tmp_path / "f.nc", fields, np.linspace(60, -60, 4), np.arange(8) * 45.0)
    src = open_source(path)
    ds = TileDataset(src, task="forecast", img_h=4, img_w=4, channels=range(2, 4), split="all", lead_time=1)
    assert len(ds) == 5 * 2  # 5 input times x 2 tiles
    item = ds[3]  # t = 1, tile 1
    np.testing.assert_array_equal(item["images"].numpy(), x[1, 2:4, :, 4:8])
    np.testing.assert_array_equal(item["target"].numpy(), x[2, :, :, 4:8])
    lat = np.deg2rad(np.linspace(60, -60, 4))
    np.testing.assert_allclose(item["lat_weights"].numpy(), np.cos(lat) / np.cos(lat).mean(), rtol=1e-6)


def test_forecast_valid_items_carry_the_training_period_climatology(tmp_path):
    x = np.random.default_rng(2).normal(3.0, 2.0, (6, 3, 4, 8)).astype(np.float32)
    x[1, 0, 0, 0] = np.nan  # left out of the mean, not counted as zero
    x[5] += 100.0  # held out: must not reach the climatology
    fields = {f"v{c}": x[:, c] for c in range(3)}
    path = write_netcdf(tmp_path / "f.nc", fields, np.linspace(60, -60, 4), np.arange(8) * 45.0)
    train, valid = build_datasets(path, task="forecast", img_h=4, img_w=4, lead_time=1, valid_fraction=0.4)
    stats = valid.target_stats
    norm = (x - stats.safe_mean[None, :, None, None]) / stats.safe_std[None, :, None, None]
    # 6 steps, 2 held out (steps 4 and 5): the training period is steps 0-3
    expected = np.nanmean(norm[:4], axis=0)  # [V, H, W]
    item = valid[1]  # tile 1 (columns 4..8)
    np.testing.assert_allclose(item["climatology"].numpy(), expected[:, :, 4:8], rtol=1e-5, atol=1e-6)
    assert "climatology" not in train[0]


def test_forecast_too_short_is_clear(tmp_path):
    x = np.zeros((2, 3, 4, 4), np.float32)
    path = write_npy(tmp_path / "s.npy", x)
    with pytest.raises(DataError, match=r"needs more than 2 time steps.*--lead-time"):
        TileDataset(open_source(path), task="forecast", img_h=4, img_w=4, lead_time=2)


def test_stats_file_roundtrip_lookup_and_mismatch(tmp_path):
    path, x = npy_stack(tmp_path)
    src = open_source(path)
    out = save_stats(compute_stats(src), stats_path_for(path))
    assert out == str(tmp_path / "x.stats.json")
    assert json.load(open(out))["source"] == "x.npy"
    stats = load_stats(out, src)
    assert stats.select(range(3, 5)).channel_names == ["ch003", "ch004"]
    # a file over every sample (held-out ones included) is not used: training computes its own
    train, _ = build_datasets(path, task="mae", img_h=5, img_w=6, channels=range(3, 5))
    assert "covers every sample (held-out ones included)" in train.stats.origin
    # a file of this split's training samples is found beside the data and sliced to the rank
    training = TrainingSamples.of(src, "mae", 5, 6, 0.1)
    stats = load_stats(save_stats(compute_stats(src, training=training), stats_path_for(path)), src)
    train, _ = build_datasets(path, task="mae", img_h=5, img_w=6, channels=range(3, 5))
    np.testing.assert_allclose(train.stats.mean, stats.mean[3:5])
    assert train.stats.origin == f"file {out}"
    # a stats file of other data is refused with the fix
    other = open_source(write_npy(tmp_path / "y.npy", x[:, :5]))
    with pytest.raises(DataError, match=r"statistics for 13 channels .* has 5.*compute_stats"):
        load_stats(out, other)
    # npz variant
    npz = save_stats(stats, str(tmp_path / "s.npz"))
    np.testing.assert_allclose(load_stats(npz, src).std, stats.std)


def test_stats_on_the_fly_reads_only_rank_channels(tmp_path):
    path, x = npy_stack(tmp_path)
    train, _ = build_datasets(path, task="mae", img_h=5, img_w=6, channels=range(9, 13))  # 8 tiles, the last held out
    assert train.source.channels_read == set(range(9, 13))
    training = np.concatenate([x[0, 9:13].reshape(4, -1), x[1, 9:13, :5].reshape(4, -1),
                               x[1, 9:13, 5:, :6].reshape(4, -1)], axis=1)
    np.testing.assert_allclose(train.stats.mean, training.mean(1), rtol=1e-5)
    np.testing.assert_allclose(train.stats.std, training.std(1), rtol=1e-5)


def test_missing_named_stats_file_is_clear(tmp_path):
    path, _ = npy_stack(tmp_path)
    with pytest.raises(DataError, match="does not exist; create it with .*compute_stats.py"):
        build_datasets(path, task="mae", img_h=5, img_w=6, stats_path=str(tmp_path / "none.json"))


def test_synthetic_build_and_forecast():
    train, valid = build_datasets("synthetic:num_images=10", "synthetic", task="forecast", img_h=8, img_w=16,
                                  num_channels=9, channels=range(3, 6), seed=4)
    item = train[0]
    assert item["images"].shape == (3, 8, 16) and item["target"].shape == (9, 8, 16)
    assert item["lat_weights"].std() > 0  # synthetic forecast data lies on a global grid
    assert len(valid) >= 1


def test_envi_folder_of_one_file_uses_its_stats(tmp_path):
    cube = (np.random.default_rng(0).random((6, 8, 8)) * 1000 + 1).astype(np.uint16)
    hdr = write_envi(tmp_path / "img.hdr", cube, scale_factor=1000, ignore_value=0)
    src = open_source(hdr)
    save_stats(compute_stats(src, training=TrainingSamples.of(src, "mae", 4, 4, 0.1)), stats_path_for(hdr))
    train, _ = build_datasets(str(tmp_path), task="mae", img_h=4, img_w=4, channels=range(0, 3))
    assert train.stats.meta["source"] == "img.hdr"


def test_folder_of_unequal_images_tiles_each(tmp_path):
    d = tmp_path / "scenes"
    d.mkdir()
    a = np.random.default_rng(0).random((4, 8, 8)).astype(np.float32)
    b = np.random.default_rng(1).random((4, 12, 4)).astype(np.float32)
    write_npy(d / "a.npy", a)
    write_npy(d / "b.npy", b)
    src = open_source(str(d))
    assert src.shape == (2, 4, None, None) and src.image_hw(1) == (12, 4)
    ds = TileDataset(src, img_h=4, img_w=4, split="all")
    assert len(ds) == 4 + 3
    np.testing.assert_array_equal(ds[6]["images"].numpy(), b[:, 8:12, 0:4])
    with pytest.raises(DataError, match=r"image 1 is 12 x 4.*smaller than one 8 x 8 tile"):
        TileDataset(src, img_h=8, img_w=8)


# ---- statistics from the training samples only ---------------------------------------------------

def test_training_windows_hold_exactly_the_training_tiles():
    from dchag.data.tiles import TileIndex, mae_split, training_windows
    rng = np.random.default_rng(3)
    for _ in range(20):
        sizes = [tuple(int(v) for v in rng.integers(5, 23, 2)) for _ in range(int(rng.integers(1, 4)))]
        h, w, f = int(rng.integers(2, 6)), int(rng.integers(2, 6)), float(rng.choice([0.1, 0.3, 0.5]))
        index = TileIndex(sizes, h, w)
        want = [np.zeros(hw, int) for hw in sizes]
        for s in mae_split(index.num_samples, "train", f):
            t = index.tile(s)
            want[t.image][t.read_rows, t.read_cols] += 1
        got = [np.zeros(hw, int) for hw in sizes]
        for image, rows, cols in training_windows(sizes, "mae", h, w, f):
            got[image][rows, cols] += 1
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("task", ["mae", "forecast"])
def test_statistics_are_unchanged_by_held_out_samples(tmp_path, task):
    """The issue's check: held-out images (mae: the last 2 of 10; forecast: the held-out period)
    offset by +100 leave the statistics, and the saved normalization, at the training images'."""
    from dchag.checkpointing.normalization import describe_dataset
    x = np.random.default_rng(6).normal(0.0, 1.0, (10, 3, 8, 8)).astype(np.float32)
    shifted = x.copy()
    shifted[8:] += 100.0  # mae: images 8-9 held out (tiles 8 x 8); forecast: steps 8-9 (valid 0.2, lead 1)
    got = {}
    for name, data in (("plain", x), ("shifted", shifted)):
        path = write_npy(tmp_path / f"{name}.npy", data)
        train, _ = build_datasets(path, task=task, img_h=8, img_w=8, valid_fraction=0.2, lead_time=1)
        got[name] = describe_dataset(train)["parts"][0]
    np.testing.assert_allclose(got["shifted"]["mean"], x[:8].mean(axis=(0, 2, 3)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["shifted"]["mean"], got["plain"]["mean"], rtol=1e-6)
    np.testing.assert_allclose(got["shifted"]["std"], x[:8].std(axis=(0, 2, 3)), rtol=1e-5)


def test_resumed_and_fine_tuned_runs_reuse_the_saved_statistics(tmp_path):
    """A saved normalization (a checkpoint's, an export's) is applied to every channel it names; a
    fine-tune's other channels get statistics of its own training samples."""
    from dchag.checkpointing.normalization import describe_dataset, merge
    path, x = npy_stack(tmp_path, n=2, c=4, h=10, w=12)
    train, _ = build_datasets(path, task="mae", img_h=5, img_w=6)
    doc = merge([describe_dataset(train)])
    doc["mean"], doc["std"] = [1.0, 2.0, 3.0, 4.0], [0.5, 0.5, 2.0, 2.0]
    resumed, _ = build_datasets(path, task="mae", img_h=5, img_w=6, channels=range(1, 3), saved_normalization=doc,
                                saved_from="checkpoint runs/a/iter_0000010")
    np.testing.assert_array_equal(resumed.stats.mean, [2.0, 3.0])
    assert resumed.stats.origin == "saved with checkpoint runs/a/iter_0000010"
    np.testing.assert_allclose(resumed[0]["images"][0].numpy(), (x[0, 1, :5, :6] - 2.0) / 0.5, rtol=1e-5)
    doc["channel_names"] = ["ch000", "other", "ch002", "another"]  # a fine-tune: two channels named alike
    tuned, _ = build_datasets(path, task="mae", img_h=5, img_w=6, saved_normalization=doc, saved_from="the export")
    np.testing.assert_array_equal(tuned.stats.mean[[0, 2]], [1.0, 3.0])
    np.testing.assert_allclose(tuned.stats.mean[[1, 3]], train.stats.mean[[1, 3]])
    assert "for 2 of 4 channels (by name)" in tuned.stats.origin


def test_compute_stats_tool_writes_the_training_samples_statistics(tmp_path):
    """tools/compute_stats.py with the run's split flags: the file training finds and uses; without
    them a whole-data file, which training leaves aside."""
    import sys
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import compute_stats as tool
    path, x = npy_stack(tmp_path, n=6, c=4, h=10, w=12)
    assert tool.main(["--data-path", path]) == 0
    train, _ = build_datasets(path, task="forecast", img_h=10, img_w=12, valid_fraction=0.34, lead_time=1)
    assert "covers every sample" in train.stats.origin
    assert tool.main(["--data-path", path, "--task", "forecast", "--valid-fraction", "0.34", "--force"]) == 0
    train, _ = build_datasets(path, task="forecast", img_h=10, img_w=12, valid_fraction=0.34, lead_time=1)
    assert train.stats.origin.startswith("file ")  # steps 4-5 held out: the training period is steps 0-3
    np.testing.assert_allclose(train.stats.mean, x[:4].mean(axis=(0, 2, 3)), rtol=1e-5)
    assert tool.main(["--data-path", path, "--task", "mae", "--force"]) == 2  # tiles need --img-h/--img-w
