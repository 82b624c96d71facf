"""Prediction as users meet it (tools/predict.py, ``dchag.load_pretrained``'s methods).

One tiny exported regression model (13 Sentinel-2-named bands with wavelengths, normalization
statistics, target statistics) is built once, in this process, and shared by the tests:

* channels by identity: a file whose bands are reversed or shuffled, its sidecar naming them,
  predicts what the original does; without the sidecar it is taken by position (and differs);
  a missing band is refused by name, and zero-filled as invalid input with
  --allow-missing-channels; an extra band is dropped; in Python, ``channels=`` (names or
  wavelengths) does the same.
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
