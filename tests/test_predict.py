"""Prediction as users meet it (tools/predict.py, ``dchag.load_pretrained``'s methods).

One tiny exported regression model (13 Sentinel-2-named bands with wavelengths, normalization
statistics, target statistics) is built once, in this process, and shared by the tests:

* channels by identity: a file whose bands are reversed or shuffled, its sidecar naming them,
  predicts what the original does; without the sidecar it is taken by position (and differs);
  a missing band is refused by name, and zero-filled as invalid input with
  --allow-missing-channels; an extra band is dropped; in Python, ``channels=`` (names or
  wavelengths) does the same;
* whole images in Python equal tools/predict.py on the same pixels ([1, 13, 100, 90] -> [1, 1, 100,
  90]), with and without overlap, numpy or torch;
* overlap: the stitched result equals an independent numpy blend of the tiles' own outputs; a model
  whose output does not depend on the position gives the same result with and without overlap;
* ENVI and NetCDF scenes predict what the .npy does, and the output keeps map info and lat/lon;
* a model pretrained on a blend runs an input as the source that covers it best.
(Distributed prediction and --describe: tests/test_checkpoint_convert.py, on its trained checkpoints.)
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))

from dchag.data.readers.synthetic import S2_BANDS  # noqa: E402

NAMES = [b[0] for b in S2_BANDS]
WAVELENGTHS = [b[1] for b in S2_BANDS]
C, TILE, PATCH = 13, 16, 4


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A consolidated export of an untrained 13-band regress model (random but fixed weights)."""
    from dchag.checkpointing import consolidated
    from dchag.inference.runtime import build_serial_model
    from dchag.model.config import DChagConfig
    cfg = DChagConfig(num_channels=C, img_h=TILE, img_w=TILE, patch_dim=PATCH, hidden_size=16, num_layers=1,
                      num_attention_heads=2, aggregation="linear", groups=4, task="regress", num_outputs=1,
                      channel_names=tuple(NAMES), wavelengths=tuple(WAVELENGTHS))
    rng = np.random.default_rng(0)
    mean, std = rng.uniform(0.05, 0.4, C), rng.uniform(0.02, 0.1, C)
    norm = {"format": "dchag-normalization", "version": 1, "normalized": True, "num_channels": C,
            "channel_names": NAMES, "wavelengths": WAVELENGTHS, "mean": mean.tolist(), "std": std.tolist()}
    path = str(tmp_path_factory.mktemp("predict") / "export")
    consolidated.write(path, dict(build_serial_model(cfg).named_parameters()),
                       {"model": consolidated.config_to_dict(cfg), "task": "regress", "channel_names": NAMES,
                        "wavelengths": WAVELENGTHS, "normalization": norm,
                        "targets": {"names": ["t0"], "mean": [0.5], "std": [0.25]}})
    return path


@pytest.fixture(scope="module")
def model(export):
    import dchag
    return dchag.load_pretrained(export, device="cpu")


def _scene(shape=(1, C, 20, 27), seed=1):
    """Reflectance-like values near the model's statistics, one invalid pixel."""
    x = np.random.default_rng(seed).uniform(0.0, 0.5, shape).astype(np.float32)
    x[0, 3, 2, 5] = np.nan
    return x


def _save(folder, name, x, names=None, wavelengths=None):
    path = os.path.join(folder, name + ".npy")
    np.save(path, x)
    meta = {k: v for k, v in (("channel_names", names), ("wavelengths", wavelengths)) if v is not None}
    if meta:
        with open(os.path.join(folder, name + ".channels.json"), "w") as f:
            json.dump(meta, f)
    return path


def _predict(export, data, out, *extra):
    import predict
    return predict.main(["--load", export, "--data-path", data, "--task", "regress", "--output", out,
                         "--no-progress", *extra])


def test_bands_in_another_order_with_their_identity_predict_the_same(export, tmp_path, capsys):
    x = _scene()
    d = str(tmp_path)
    assert _predict(export, _save(d, "orig", x, NAMES, WAVELENGTHS), f"{d}/orig_out.npy") == 0
    want = np.load(f"{d}/orig_out.npy")
    rev = list(range(C))[::-1]
    shuf = list(np.random.default_rng(3).permutation(C))
    for tag, order, meta in (("reversed", rev, {"names": [NAMES[c] for c in rev]}),
                             ("shuffled", shuf, {"wavelengths": [WAVELENGTHS[c] for c in shuf]})):
        data = _save(d, tag, x[:, order], meta.get("names"), meta.get("wavelengths"))
        capsys.readouterr()
        assert _predict(export, data, f"{d}/{tag}_out.npy") == 0
        err = capsys.readouterr().err
        assert "read in the model's order" in err, err
        np.testing.assert_allclose(np.load(f"{d}/{tag}_out.npy"), want, rtol=0, atol=1e-6)
    # The same shuffled bands without their identity are taken by position: another (wrong) answer, said once.
    data = _save(d, "bare", x[:, shuf])
    assert _predict(export, data, f"{d}/bare_out.npy") == 0
    assert "carries no channel names or wavelengths" in capsys.readouterr().err
    assert np.nanmax(np.abs(np.load(f"{d}/bare_out.npy") - want)) > 1e-3


def test_a_missing_band_is_refused_by_name_and_zero_filled_when_allowed(export, model, tmp_path, capsys):
    x = _scene((1, C, TILE, TILE))
    d = str(tmp_path)
    keep = [c for c in range(C) if NAMES[c] != "B05"]
    extra = np.full((1, 1) + x.shape[2:], 0.3, np.float32)  # a band the model does not know: dropped
    data = _save(d, "lacks_b05", np.concatenate([x[:, keep], extra], axis=1), [NAMES[c] for c in keep] + ["B99"])
    assert _predict(export, data, f"{d}/refused.npy") == 1
    err = capsys.readouterr().err
    assert "'B05' at 705 nm" in err and "--allow-missing-channels" in err, err
    assert not os.path.exists(f"{d}/refused.npy")
    assert _predict(export, data, f"{d}/filled.npy", "--allow-missing-channels") == 0
    err = capsys.readouterr().err
    assert "zero-filled as invalid input" in err and "'B05'" in err and "dropped: 'B99'" in err, err
    filled = x.copy()
    filled[:, NAMES.index("B05")] = np.nan  # what zero-filling means: the band read as invalid values
    np.testing.assert_allclose(np.load(f"{d}/filled.npy"), model.regress(filled, channels=NAMES), rtol=0, atol=1e-6)
    assert np.nanmax(np.abs(model.regress(filled, channels=NAMES) - model.regress(x, channels=NAMES))) > 1e-4


def test_python_methods_match_channels_by_name_or_wavelength(model, capsys):
    x = _scene((2, C, TILE, TILE))
    want = model.regress(x, channels=NAMES)
    shuf = list(np.random.default_rng(5).permutation(C))
    by_name = model.regress(x[:, shuf], channels=[NAMES[c] for c in shuf])
    by_wavelength = model.regress(x[:, shuf], channels={"wavelengths": [WAVELENGTHS[c] for c in shuf]})
    np.testing.assert_allclose(by_name, want, rtol=0, atol=1e-6)
    np.testing.assert_allclose(by_wavelength, want, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"lacks 1 of the model's 13 channels: 'B11' at 1610 nm.*allow_missing"):
        model.regress(x[:, [c for c in range(C) if NAMES[c] != "B11"]], channels=[n for n in NAMES if n != "B11"])
    capsys.readouterr()
    model.regress(x)
    model.regress(x)
    err = capsys.readouterr().err
    assert err.count("carries no channel names or wavelengths") == 1, err  # said once


# ---- whole images of any size, seamless tiles --------------------------------------------------

def _starts(size, tile, overlap):
    s = list(range(0, size - tile + 1, tile - overlap))
    return s + [size - tile] if s[-1] + tile < size else s


def _numpy_blend(tiles_out, size_h, size_w, tile, overlap):
    """An independent blend: every tile's output times its trapezoid window (a linear ramp over
    ``overlap`` pixels towards each edge), summed, divided by the summed windows."""
    t = np.arange(tile) + 0.5
    ramp = np.minimum(1.0, np.minimum(t, tile - t) / overlap)
    window = ramp[:, None] * ramp[None, :]
    planes = next(iter(tiles_out.values())).shape[0]
    num, den = np.zeros((planes, size_h, size_w)), np.zeros((size_h, size_w))
    for r in _starts(size_h, tile, overlap):
        for c in _starts(size_w, tile, overlap):
            num[:, r:r + tile, c:c + tile] += window * tiles_out[r, c]
            den[r:r + tile, c:c + tile] += window
    return num / den


def test_whole_image_in_python_equals_tools_predict(export, model, tmp_path):
    """model.regress on a [1, 13, 100, 90] array returns [1, 1, 100, 90], equal to tools/predict.py
    on the same pixels (a file, channels named by its sidecar), with and without overlap; the
    same holds for torch in (torch out)."""
    import torch
    x = _scene((1, C, 100, 90), seed=7)
    d = str(tmp_path)
    data = _save(d, "scene", x, NAMES)
    for overlap in (0, 6):
        y = model.regress(x, channels=NAMES, overlap=overlap, batch_size=5)
        assert y.shape == (1, 1, 100, 90) and isinstance(y, np.ndarray)
        assert _predict(export, data, f"{d}/o{overlap}.npy", "--overlap", str(overlap), "--batch-size", "7") == 0
        np.testing.assert_allclose(np.load(f"{d}/o{overlap}.npy"), y, rtol=0, atol=1e-6)
    yt = model.regress(torch.from_numpy(x), channels=NAMES, overlap=6)
    assert torch.is_tensor(yt) and np.allclose(yt.numpy(), y, atol=1e-6, equal_nan=True)
    assert np.isnan(y[0, 0, 2, 5]) == np.isnan(x[0, :, 2, 5]).all()


def test_overlap_blends_like_an_independent_numpy_blend(model):
    """The stitched prediction with --overlap 6 equals a numpy blend of the tiles' own outputs
    (regress_tiles on each 16 x 16 window); without overlap each pixel comes from the last tile
    covering it; the blend differs from that (the tiles disagree where they overlap)."""
    x = _scene((1, C, 40, 37), seed=9)
    x[0, :, 2, 5] = np.nan  # a pixel with no valid channel: NaN in every tile that covers it
    for overlap in (6, 11):
        tiles = {(r, c): model.regress_tiles(x[:, :, r:r + TILE, c:c + TILE])[0].astype(np.float64)
                 for r in _starts(40, TILE, overlap) for c in _starts(37, TILE, overlap)}
        got = model.regress(x, overlap=overlap, batch_size=4)[0]
        np.testing.assert_allclose(got, _numpy_blend(tiles, 40, 37, TILE, overlap), rtol=0, atol=1e-5)
    plain = model.regress(x)[0]
    assert np.nanmax(np.abs(plain - got)) > 1e-4


class PerPixel(__import__("torch").nn.Module):
    """A model whose output at a pixel depends only on that pixel's input (no position)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg

    def forward(self, images, **_):
        return (images ** 2).sum(dim=1, keepdim=True) * 0.1 + images[:, :1]


def test_a_position_independent_model_stitches_the_same_with_and_without_overlap():
    import torch
    from dchag.inference.pretrained import PretrainedDChag
    from dchag.model.config import DChagConfig
    cfg = DChagConfig(num_channels=3, img_h=8, img_w=8, patch_dim=2, groups=1, task="regress", num_outputs=1)
    m = PretrainedDChag(PerPixel(cfg), {}, torch.device("cpu"))
    x = np.random.default_rng(2).normal(size=(2, 3, 29, 21)).astype(np.float32)
    want = m.regress(x)
    for overlap in (1, 3, 7):
        np.testing.assert_allclose(m.regress(x, overlap=overlap, batch_size=3), want, rtol=0, atol=1e-6)
    np.testing.assert_allclose(want, (x ** 2).sum(1, keepdims=True) * 0.1 + x[:, :1], rtol=1e-6, atol=1e-6)


def test_stitcher_against_a_numpy_blend_of_random_tiles():
    """The stitcher alone, tiles of random values (disagreeing everywhere), several images,
    a scene smaller than a tile in one axis."""
    from dchag.inference.tiling import Axis, Stitcher
    rng = np.random.default_rng(4)
    for (H, W, tile, overlap) in ((23, 30, 8, 3), (8, 19, 8, 5), (17, 17, 8, 1)):
        rows, cols = Axis.plan(H, tile, overlap), Axis.plan(W, tile, overlap)
        got = np.zeros((2, 2, H, W))
        s = Stitcher(2, rows, cols, lambda i, r0, r1, b: got.__setitem__((i, slice(None), slice(r0, r1)), b))
        outs = [{(r, c): rng.normal(size=(2, tile, tile)) for r in rows.starts for c in cols.starts} for _ in range(2)]
        for i in range(2):
            for j, r in enumerate(rows.starts):
                for k, c in enumerate(cols.starts):
                    s.add(i, j, k, outs[i][r, c])
        s.close()
        for i in range(2):
            np.testing.assert_allclose(got[i], _numpy_blend(outs[i], H, W, tile, overlap), rtol=0, atol=1e-5)


def test_any_format_keeps_the_inputs_coordinates(export, tmp_path):
    """An ENVI scene (bands reversed, named by its header, with map info) and a NetCDF scene (one
    variable per band, lat/lon coordinates) predict what the .npy original does; the outputs keep
    the map info (.npy: OUT.meta.json) and the coordinates (.zarr: its attributes)."""
    import xarray as xr
    import zarr
    x = _scene((1, C, 20, 27), seed=11)
    d = str(tmp_path)
    assert _predict(export, _save(d, "orig", x, NAMES), f"{d}/orig_out.npy") == 0
    want = np.load(f"{d}/orig_out.npy")
    rev = x[0, ::-1]
    rev.astype("<f4").tofile(f"{d}/scene.img")
    with open(f"{d}/scene.hdr", "w") as f:
        f.write(f"ENVI\nsamples = 27\nlines = 20\nbands = {C}\nheader offset = 0\ndata type = 4\ninterleave = bsq\n"
                "byte order = 0\nmap info = {UTM, 1.0, 1.0, 500000.0, 4000000.0, 10.0, 10.0, 33, North, WGS-84}\n"
                "band names = {" + ", ".join(NAMES[::-1]) + "}\n")
    assert _predict(export, f"{d}/scene.hdr", f"{d}/envi.npy") == 0
    np.testing.assert_allclose(np.load(f"{d}/envi.npy"), want, rtol=0, atol=1e-6)
    with open(f"{d}/envi.meta.json") as f:
        assert json.load(f)["map_info"].startswith("{UTM, 1.0, 1.0, 500000.0")
    lat, lon = np.linspace(10, 9, 20), np.linspace(30, 32, 27)
    xr.Dataset({n: (("lat", "lon"), x[0, c]) for c, n in enumerate(NAMES)},
               coords={"lat": lat, "lon": lon}).to_netcdf(f"{d}/scene.nc", engine="h5netcdf")
    assert _predict(export, f"{d}/scene.nc", f"{d}/nc.zarr") == 0
    z = zarr.open_array(f"{d}/nc.zarr", mode="r")
    np.testing.assert_allclose(np.asarray(z), want, rtol=0, atol=1e-6)
    np.testing.assert_allclose(z.attrs["latitudes"], lat)
    np.testing.assert_allclose(z.attrs["longitudes"], lon)


def test_a_blend_model_runs_as_the_source_that_covers_the_input_best():
    """A model pretrained on a blend (config ``sources``: per source its union channel ids): the input's
    identities are mapped onto the source whose channel set they cover best, in that source's order."""
    from dchag.data.identity import channel_ids
    from dchag.inference.channels import map_channels
    from dchag.model.config import DChagConfig
    cfg = DChagConfig(num_channels=5, img_h=8, img_w=8, patch_dim=2, groups=2, channel_names=tuple("abcde"),
                      sources=((0, 1, 2), (2, 3, 4)), source_names=("s1", "s2"))
    m = map_channels(cfg, channel_ids(["e", "c", "d", "x"], None), 4)
    assert (m.source, m.take, m.extra) == (1, (1, 2, 0), (3,))
    assert "as source 's2'" in m.lines[0] and "dropped: 'x'" in m.lines[1]
    one = DChagConfig(num_channels=5, img_h=8, img_w=8, patch_dim=2, groups=1, channel_names=tuple("abcde"))
    assert map_channels(one, channel_ids(list("abcde"), None), 5).source == 0
