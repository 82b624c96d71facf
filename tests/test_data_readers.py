"""Readers: every format on tiny generated files and on the bundled samples; sharded reads."""

from __future__ import annotations

import os

import numpy as np
import pytest

from dchag.data import DataError, open_source
from dchag.data.readers import ConcatSource, detect_format
from dchag.data.writers import (write_envi, write_hdf5, write_netcdf, write_npy, write_weather_zarr, write_zarr)
from dchag.parallel.partition import ChannelPartition

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FENIX = os.path.join(ROOT, "data", "samples", "fenix_450band", "image.hdr")
ERA5 = os.path.join(ROOT, "data", "samples", "era5_5.625deg.nc")

N, C, H, W = 3, 13, 6, 7
LAT = np.linspace(75.0, -75.0, H)
LON = np.arange(W) * 360.0 / W


def stack(seed=0, dtype=np.float32):
    x = np.random.default_rng(seed).uniform(1, 100, (N, C, H, W))
    return x.astype(dtype)


def make(fmt: str, tmp_path, x=None):
    """A tiny file of format ``fmt`` holding ``x`` [N, C, H, W]; returns (path, expected float32 array)."""
    x = stack() if x is None else x
    if fmt == "npy":
        return write_npy(tmp_path / "x.npy", x), x
    if fmt == "hdf5":
        return write_hdf5(tmp_path / "x.h5", x, wavelengths=np.linspace(400, 900, C)), x
    if fmt == "zarr":
        return write_zarr(tmp_path / "x.zarr", x), x
    if fmt in ("envi", "envi-bil", "envi-bip"):
        inter = {"envi": "bsq", "envi-bil": "bil", "envi-bip": "bip"}[fmt]
        cube = x[0].astype(np.int16)
        return write_envi(tmp_path / "x.hdr", cube, interleave=inter, byte_order=1, header_offset=32), \
            cube[None].astype(np.float32)
    if fmt in ("netcdf", "zarr-weather"):
        fields = {f"v{c:02d}": x[:, c] for c in range(C)}  # names sort in stored order
        w = write_netcdf if fmt == "netcdf" else write_weather_zarr
        ext = ".nc" if fmt == "netcdf" else ".zarr"
        return w(tmp_path / f"w{ext}", fields, LAT, LON), x
    raise AssertionError(fmt)


FORMATS = ["npy", "hdf5", "zarr", "envi", "envi-bil", "envi-bip", "netcdf", "zarr-weather"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_reader_roundtrip_and_window(fmt, tmp_path):
    path, x = make(fmt, tmp_path)
    src = open_source(path)
    assert src.shape == x.shape
    assert len(src.channel_names) == x.shape[1]
    for i in range(x.shape[0]):
        np.testing.assert_array_equal(src.read(i), x[i])
    got = src.read(x.shape[0] - 1, range(2, 9), slice(1, 5), slice(2, 7))
    assert got.dtype == np.float32 and got.shape == (7, 4, 5)
    np.testing.assert_array_equal(got, x[-1, 2:9, 1:5, 2:7])
    # a non-contiguous channel list (e.g. the three RGB bands of a picture)
    np.testing.assert_array_equal(src.read(0, [11, 3, 4]), x[0, [11, 3, 4]])


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("P", [1, 2, 4])
def test_sharded_reads_equal_full_and_touch_only_own_channels(fmt, P, tmp_path):
    path, x = make(fmt, tmp_path)
    part = ChannelPartition(num_channels=C, num_groups=4, channel_parallel_size=P)  # uneven: 4,3,3,3
    pieces = []
    for r in range(P):
        src = open_source(path)  # one source per rank, as in training
        ch = part.rank_channels(r)
        got = src.read(0, ch, slice(0, 4), slice(0, 4))
        pieces.append(got)
        assert src.channels_read == set(ch), "a rank read channels it does not own"
        assert src.elements_read == len(ch) * 16
    np.testing.assert_array_equal(np.concatenate(pieces), x[0, :, 0:4, 0:4])


def test_bundled_fenix_cube():
    src = open_source(FENIX)
    assert src.format == "envi" and src.shape == (1, 450, 38, 23)
    assert src.wavelengths[0] == pytest.approx(378.19, abs=1e-3) and src.wavelengths[-1] == pytest.approx(2503.73, abs=1e-2)
    assert src.nodata == 0.0
    raw = np.fromfile(FENIX[:-4] + ".dat", "<u2").reshape(450, 38, 23)
    got = src.read(0, range(0, 6))
    # reflectance scale factor 65535 applied; 'data ignore value = 0' read as NaN
    np.testing.assert_array_equal(np.isnan(got), raw[:6] == 0)
    ok = raw[:6] != 0
    np.testing.assert_allclose(got[ok], raw[:6][ok] / 65535.0, rtol=1e-6)
    assert np.isnan(got).sum() == 12
    assert src.bytes_read == 6 * 38 * 23 * 2


def test_bundled_era5_sample():
    src = open_source(ERA5)
    assert src.format == "netcdf" and src.shape == (24, 5, 32, 64)
    assert src.channel_names == ["t2m", "u10", "v10", "msl", "tp"]
    assert src.latitudes.shape == (32,) and src.latitudes[0] == pytest.approx(87.1875)
    assert src.longitudes[1] == pytest.approx(5.625)
    t2m = src.read(5, range(0, 1))
    assert 200 < np.nanmin(t2m) and np.nanmax(t2m) < 330 and np.isfinite(t2m).all()
    # variable selection through the path selector, in the order given
    sel = open_source(ERA5 + "::msl,t2m")
    assert sel.channel_names == ["msl", "t2m"]
    np.testing.assert_array_equal(sel.read(5, [1]), t2m)


def test_weather_levels_become_channels(tmp_path):
    x = stack()
    fields = {"t2m": x[:, 0], "z": x[:, 1:4]}
    path = write_netcdf(tmp_path / "l.nc", fields, LAT, LON, levels=np.array([500, 700, 850]))
    src = open_source(path)
    assert src.channel_names == ["t2m", "z_500", "z_700", "z_850"]
    np.testing.assert_array_equal(src.read(1, range(1, 4)), x[1, 1:4])
    assert open_source(path + "::z_700,t2m").channel_names == ["z_700", "t2m"]
    with pytest.raises(DataError, match="no variable or channel 'q'"):
        open_source(path + "::q")


def test_folder_concatenates_along_n(tmp_path):
    x = stack()
    d = tmp_path / "folder"
    d.mkdir()
    write_npy(d / "a.npy", x[:2])
    write_npy(d / "b.npy", x[2])  # a single [C, H, W] image
    (d / "stats.json").write_text("{}")  # not data: ignored
    src = open_source(str(d))
    assert isinstance(src, ConcatSource) and src.shape == (3, C, H, W)
    for i in range(3):
        np.testing.assert_array_equal(src.read(i, range(5, 9)), x[i, 5:9])
    assert src.channels_read == set(range(5, 9))


def test_folder_channel_mismatch_is_clear(tmp_path):
    d = tmp_path / "folder"
    d.mkdir()
    write_npy(d / "a.npy", stack()[0])
    write_npy(d / "b.npy", stack()[0, :5])
    with pytest.raises(DataError, match=r"b.npy has 5 channels but .*a.npy has 13.*same channels"):
        open_source(str(d))


def test_channel_count_mismatch_vs_flag(tmp_path):
    path, _ = make("npy", tmp_path)
    with pytest.raises(DataError, match=r"has 13 channels but --num-channels is 12; set --num-channels 13"):
        open_source(path, num_channels=12)


def test_missing_file_is_clear(tmp_path):
    with pytest.raises(DataError, match=r"does not exist; check --data-path"):
        open_source(str(tmp_path / "nope.npy"))
    with pytest.raises(DataError, match=r"does not exist"):
        open_source(str(tmp_path / "nope.h5"), "hdf5")


def test_truncated_envi_is_clear(tmp_path):
    path, _ = make("envi", tmp_path)
    dat = str(tmp_path / "x.dat")
    with open(dat, "r+b") as f:
        f.truncate(os.path.getsize(dat) - 10)
    with pytest.raises(DataError, match=r"truncated.*13 bands x 6 lines x 7 samples.*Re-copy"):
        open_source(path)


def test_envi_without_data_file_is_clear(tmp_path):
    path, _ = make("envi", tmp_path)
    os.remove(tmp_path / "x.dat")
    with pytest.raises(DataError, match="no data file beside it"):
        open_source(path)


def test_truncated_npy_and_hdf5_are_clear(tmp_path):
    p = write_npy(tmp_path / "t.npy", stack())
    with open(p, "r+b") as f:
        f.truncate(500)
    with pytest.raises(DataError, match="truncated"):
        open_source(p)
    h = write_hdf5(tmp_path / "t.h5", stack())
    with open(h, "r+b") as f:
        f.truncate(1000)
    with pytest.raises(DataError, match="truncated"):
        open_source(h).read(2)


def test_unknown_extension_and_format(tmp_path):
    p = tmp_path / "x.tiff"
    p.write_bytes(b"II*\0")
    with pytest.raises(DataError, match="--data-format"):
        open_source(str(p))
    with pytest.raises(DataError, match="not one of"):
        open_source(str(p), "tiff")


def test_bad_window_is_clear(tmp_path):
    src = open_source(make("npy", tmp_path)[0])
    with pytest.raises(DataError, match="outside"):
        src.read(0, range(0, 2), slice(0, H + 1))
    with pytest.raises(DataError, match="image index 9"):
        src.read(9)


def test_detect_format(tmp_path):
    assert detect_format(FENIX) == "envi"
    assert detect_format(ERA5) == "netcdf"
    assert detect_format("synthetic:seed=2") == "synthetic"
    assert detect_format(make("zarr", tmp_path)[0]) == "zarr"


def test_nodata_override_and_hdf5_attrs(tmp_path):
    x = stack()
    x[0, 2, 1, 1] = -9999
    p = write_hdf5(tmp_path / "n.h5", x, _FillValue=-9999.0, scale_factor=2.0,
                   channel_names=[f"b{c}" for c in range(C)])
    src = open_source(p)
    assert src.nodata == -9999.0 and src.channel_names[3] == "b3"
    got = src.read(0, [2])
    assert np.isnan(got[0, 1, 1]) and np.isfinite(got).sum() == H * W - 1
    np.testing.assert_allclose(got[0, 0], 2 * x[0, 2, 0])


def test_sources_pickle_for_workers(tmp_path):
    import pickle

    for fmt in ("npy", "hdf5", "envi", "netcdf"):
        path, x = make(fmt, tmp_path / fmt if (tmp_path / fmt).mkdir() is None else None)
        src = open_source(path)
        src.read(0, [0])
        clone = pickle.loads(pickle.dumps(src))
        np.testing.assert_array_equal(clone.read(0, [1]), x[0, [1]])


# ---- the channel axis of a plain array is never guessed -------------------------------------

def _plain(tmp_path, fmt, data, **attrs):
    tmp_path.mkdir(exist_ok=True)
    if fmt == "npy":
        return write_npy(tmp_path / "cube.npy", data)
    if fmt == "hdf5":
        return write_hdf5(tmp_path / "cube.h5", data, **attrs)
    return write_zarr(tmp_path / "cube.zarr", data, **attrs)


@pytest.mark.parametrize("fmt", ["npy", "hdf5", "zarr"])
def test_plain_array_without_a_channel_count_is_refused_naming_both_readings(tmp_path, fmt):
    """The issue's cube: 500 bands of 30 x 28 stored channels-last used to train as 30 channels."""
    from dchag.data.readers.open import check_channel_axis
    src = open_source(_plain(tmp_path, fmt, np.zeros((30, 28, 500), np.float32)))
    with pytest.raises(DataError, match=r"\[30, 28, 500\].*30 channels of 28 x 500 pixels.*500 channels of 30 x 28 "
                                        r"pixels.*--num-channels 30 if the channels come first.*--num-channels 500"):
        check_channel_axis(src, None)
    check_channel_axis(src, 30)  # --num-channels 30 confirms channels-first
    with pytest.raises(DataError, match=r"last axis has 500 entries.*--num-channels 500.*channels-last.*"
                                        r"np.moveaxis\(a, -1, -3\) \(that is a.transpose\(2, 0, 1\)\)"):
        open_source(src.path, num_channels=500)


@pytest.mark.parametrize("fmt", ["npy", "hdf5", "zarr"])
def test_num_channels_on_the_last_axis_is_refused_naming_the_flag_and_the_transpose(tmp_path, fmt):
    path = _plain(tmp_path, fmt, np.zeros((2, 9, 7, 5), np.float32))  # [N, H, W, C] with C = 5
    with pytest.raises(DataError, match=r"channels-last.*Add --channels-last.*a.transpose\(0, 3, 1, 2\)"):
        open_source(path, num_channels=5)
    with pytest.raises(DataError, match=r"has 9 channels but --num-channels is 4"):
        open_source(path, num_channels=4)  # on neither axis: the count does not fit


@pytest.mark.parametrize("fmt", ["npy", "hdf5", "zarr"])
def test_a_square_stack_is_read_channels_first_unless_declared_channels_last(tmp_path, fmt):
    """Issue 30: [4, 16, 16, 16] with --num-channels 16 (16 bands of 16 x 16, the documented layout)
    was refused because its last axis has 16 entries too. The count on the first axis is enough (a
    note says how it was read); --channels-last reads the same file as [N, H, W, C]."""
    data = np.arange(4 * 16 * 16 * 16, dtype=np.float32).reshape(4, 16, 16, 16)
    path = _plain(tmp_path, fmt, data)
    src = open_source(path, num_channels=16)
    assert src.shape == (4, 16, 16, 16)
    assert "read channels-first, the documented layout: 16 channels of 16 x 16" in src.channel_axis_note
    assert "add --channels-last" in src.channel_axis_note
    np.testing.assert_array_equal(src.read(1, range(2, 5), slice(3, 11), slice(4, 12)), data[1, 2:5, 3:11, 4:12])
    last = open_source(path, num_channels=16, channels_last=True)
    assert last.channel_axis_note is None
    np.testing.assert_array_equal(last.read(1, range(2, 5), slice(3, 11), slice(4, 12)),
                                  np.moveaxis(data, -1, 1)[1, 2:5, 3:11, 4:12])
    hwc = _plain(tmp_path / "hwc", fmt, data[:2, :9, :7, :5])  # [N, H, W, C] with C = 5: declared, read so
    src = open_source(hwc, num_channels=5, channels_last=True)
    assert src.shape == (2, 5, 9, 7)
    np.testing.assert_array_equal(src.read(1, [4, 0]), np.moveaxis(data[1, :9, :7, :5], -1, 0)[[4, 0]])
    with pytest.raises(DataError, match=r"--channels-last reads its last axis as the channels, but that axis has 5 "
                                        r"entries, not the channel count \(--num-channels 9\); its first axis has 9: "
                                        r"drop --channels-last"):
        open_source(hwc, num_channels=9, channels_last=True)
    with pytest.raises(DataError, match=r"--channels-last is for plain arrays.*drop --channels-last"):
        open_source("synthetic", num_channels=3, height=8, width=8, channels_last=True)


@pytest.mark.parametrize("fmt", ["npy", "hdf5", "zarr"])
def test_the_arrays_own_channel_list_decides_the_axis(tmp_path, fmt):
    import json
    from dchag.data.readers.open import check_channel_axis
    names = [f"b{i}" for i in range(500)]
    data = np.zeros((30, 28, 500), np.float32)
    if fmt == "npy":
        path = write_npy(tmp_path / "cube.npy", data)
        with open(tmp_path / "cube.channels.json", "w") as f:
            json.dump({"channel_names": names}, f)
    else:
        path = _plain(tmp_path, fmt, data, channel_names=names)
    with pytest.raises(DataError, match=r"500 channels listed in .*channels-last.*np.moveaxis"):
        open_source(path)
    first = _plain(tmp_path / "first", fmt, np.zeros((4, 28, 30), np.float32), wavelengths=[400.0, 500.0, 600.0, 700.0]) \
        if fmt != "npy" else None
    if first is not None:  # four wavelengths on the first axis: channels-first, no flag needed
        check_channel_axis(open_source(first), None)


def test_training_refuses_an_unlabelled_array_without_num_channels(tmp_path):
    from types import SimpleNamespace

    from dchag.training.preflight import read_channel_identity
    path = write_npy(tmp_path / "cube.npy", np.zeros((30, 28, 500), np.float32))
    with pytest.raises(DataError, match=r"500 channels of 30 x 28.*--num-channels 30"):
        read_channel_identity(SimpleNamespace(num_channels=None, data_path=path, data_format="auto", task="mae",
                                              img_h=8, img_w=8, seed=0))
