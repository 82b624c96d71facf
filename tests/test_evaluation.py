"""Evaluation as the field reports it: every held-out sample by default, baselines beside the model.

* Each task's baselines (MAE channel mean and visible-pixel mean, forecast persistence and
  climatology, regress the training mean, segment the training class prior / majority class)
  against numpy written from their definitions, on exactly the held-out pixels (tiles that do not
  divide the image: their padding scores nothing, every pixel inside once).
* One 2-rank job (T = P = 2, channel-sharded input): short MAE runs with the default --eval-iters
  and with --eval-iters 1000 end on the same validation loss (every held-out sample, once); the
  validation line says how many samples it scored of how many and names the baselines; TensorBoard
  has finite ``baseline/<name>`` scalars; the loop's baselines (each rank its own channels, summed
  over the channel group) equal tools/parity.py's (one process, every channel), for MAE and for a
  forecast whose persistence needs every rank's channels.
"""

from __future__ import annotations

import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tests.distributed import run_distributed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _npy(tmp_path, name, array):
    path = str(tmp_path / name)
    np.save(path, np.asarray(array))
    return path


def _tiles(samples, H, W, h, w):
    """(image, rows inside, cols inside) of global tile ids: ceil(H / h) x ceil(W / w) per image."""
    gy, gx = -(-H // h), -(-W // w)
    out = []
    for s in samples:
        image, j = divmod(s, gy * gx)
        ty, tx = divmod(j, gx)
        out.append((image, slice(ty * h, min(ty * h + h, H)), slice(tx * w, min(tx * w + w, W))))
    return out


def _baselines(valid, task, args, cfg, micro_batch=2):
    from dchag.data import build_eval_loader
    from dchag.tasks import get_task
    return get_task(task).baselines(build_eval_loader(valid, micro_batch), cfg, args)


# ---- each task's baselines against numpy, on the held-out pixels ---------------------------------

def test_mae_baselines_match_numpy(tmp_path):
    from dchag.data import build_datasets
    from dchag.tasks.mae import patch_mask
    rng = np.random.default_rng(5)
    x = rng.normal(3.0, 2.0, (3, 5, 10, 12)).astype(np.float32)
    x[2, 1, 9, :4] = np.nan  # invalid values in a held-out tile
    data = _npy(tmp_path, "x.npy", x)
    train, valid = build_datasets(data, task="mae", img_h=4, img_w=4, valid_fraction=0.3)  # 27 tiles, 8 held out
    args = SimpleNamespace(mask_ratio=0.5, seed=7)
    cfg = SimpleNamespace(num_patches=4, grid=(2, 2), patch_dim=2)
    got = _baselines(valid, "mae", args, cfg, micro_batch=3)
    mean, std = valid.stats.safe_mean, valid.stats.safe_std
    samples = list(valid.samples)
    hidden_patches = patch_mask(torch.tensor(samples), 4, 0.5, 7, 0).numpy()
    err = {"channel mean": 0.0, "visible-pixel mean": 0.0}
    n = 0
    for (image, rows, cols), hid in zip(_tiles(samples, 10, 12, 4, 4), hidden_patches):
        z = (x[image][:, rows, cols].astype(np.float64) - mean[:, None, None]) / std[:, None, None]  # [C, h', w']
        r, c = np.meshgrid(np.arange(z.shape[1]), np.arange(z.shape[2]), indexing="ij")
        hidden = hid[(r // 2) * 2 + c // 2]  # [h', w'] pixels of hidden patches
        ok = np.isfinite(z)
        visible_mean = np.array([z[k][ok[k] & ~hidden].mean() if (ok[k] & ~hidden).any() else 0.0 for k in range(5)])
        scored = ok & hidden[None]
        err["channel mean"] += (z[scored] ** 2).sum()
        err["visible-pixel mean"] += ((z - visible_mean[:, None, None])[scored] ** 2).sum()
        n += scored.sum()
    assert n > 0 and list(got) == ["channel mean", "visible-pixel mean"]
    for name, e in err.items():
        assert got[name]["val_loss"] == pytest.approx(e / n, rel=1e-6), name


def test_forecast_baselines_match_numpy(tmp_path):
    """Persistence and climatology on a 36-row grid in 8 x 4 tiles (padded rows and columns)."""
    from dchag.data import build_datasets
    from dchag.data.writers import write_netcdf
    rng = np.random.default_rng(8)
    H, W = 36, 6
    lat = 90.0 - (np.arange(H) + 0.5) * 5.0
    x = np.cumsum(rng.normal(0.0, 1.0, (10, 2, H, W)), axis=0) + rng.normal(5.0, 1.0, (1, 2, 1, 1))
    x[8, 0, 3, :2] = np.nan  # an invalid target (of input 7) and input (zero-filled: the channel mean)
    path = write_netcdf(tmp_path / "g.nc", {"a": x[:, 0], "b": x[:, 1]}, lat, np.arange(W) * 60.0)
    _, valid = build_datasets(path, task="forecast", img_h=8, img_w=4, lead_time=1, valid_fraction=0.4)
    got = _baselines(valid, "forecast", SimpleNamespace(), None, micro_batch=4)
    mean, std = valid.target_stats.safe_mean, valid.target_stats.safe_std
    z = (x - mean[None, :, None, None]) / std[None, :, None, None]
    clim = z[:6].mean(axis=0)  # the training period: inputs 0-4, targets 1-5
    w_row = np.cos(np.deg2rad(lat))[:, None]
    sums = {"persistence": [0.0, 0.0], "climatology": [0.0, 0.0]}
    for t in (6, 7, 8):  # held-out inputs (targets 7, 8, 9)
        obs = z[t + 1]
        w = np.where(np.isfinite(obs), w_row, 0.0)
        for name, pred in (("persistence", np.nan_to_num(z[t])), ("climatology", clim)):  # invalid input: 0
            sums[name][0] += (w * (pred - np.nan_to_num(obs)) ** 2).sum()
            sums[name][1] += w.sum()
    assert list(got) == ["persistence", "climatology"]
    for name, (e, wsum) in sums.items():
        assert got[name]["val_loss"] == pytest.approx(e / wsum, rel=1e-5), name
    assert got["persistence"]["metrics"]["rmse/a"] > 0 and math.isnan(got["climatology"]["metrics"]["acc/a"])


def test_dense_baselines_match_numpy(tmp_path):
    """Regress: the training tiles' mean (MSE in normalized units, RMSE in target units); segment:
    the training class prior (cross-entropy) and its majority class (accuracy); held-out pixels of
    10 x 12 images in 4 x 6 tiles (the last tile row padded)."""
    from dchag.data import build_datasets
    rng = np.random.default_rng(9)
    x = rng.normal(size=(2, 3, 10, 12)).astype(np.float32)
    y = rng.normal(5.0, 2.0, size=(2, 2, 10, 12)).astype(np.float32)
    y[1, 0, 9, 3:7] = np.nan
    cls = rng.choice(3, p=[0.5, 0.3, 0.2], size=(2, 10, 12)).astype(np.float32)
    cls[1, 8, :2] = 255  # ignored
    data = _npy(tmp_path, "x.npy", x)
    kw = dict(img_h=4, img_w=6, valid_fraction=0.25)  # 12 tiles: 9 training, 3 held out
    train_pix, held_pix = np.zeros((2, 10, 12), bool), np.zeros((2, 10, 12), bool)
    for image, rows, cols in _tiles(range(9), 10, 12, 4, 6):
        train_pix[image, rows, cols] = True
    for image, rows, cols in _tiles(range(9, 12), 10, 12, 4, 6):
        held_pix[image, rows, cols] = True
    assert not (train_pix & held_pix).any() and (train_pix | held_pix).all()

    _, valid = build_datasets(data, task="regress", target_path=_npy(tmp_path, "y.npy", y), **kw)
    got = _baselines(valid, "regress", SimpleNamespace(), None)["training mean"]
    yy = np.moveaxis(y, 1, 0).astype(np.float64)  # [K, N, H, W]
    mean = np.array([np.nanmean(yy[k][train_pix]) for k in range(2)])
    std = np.array([np.nanstd(yy[k][train_pix]) for k in range(2)])
    held = [yy[k][held_pix] for k in range(2)]
    held = [v[np.isfinite(v)] for v in held]
    assert got["val_loss"] == pytest.approx(sum((((v - m) / s) ** 2).sum() for v, m, s in zip(held, mean, std))
                                            / sum(v.size for v in held), rel=1e-5)
    for k, name in enumerate(valid.targets.names):
        assert got["metrics"][f"rmse/{name}"] == pytest.approx(np.sqrt(((held[k] - mean[k]) ** 2).mean()), rel=1e-5)

    _, valid = build_datasets(data, task="segment", target_path=_npy(tmp_path, "c.npy", cls), num_classes=3, **kw)
    (name, got), = _baselines(valid, "segment", SimpleNamespace(), None).items()
    labels = cls[train_pix]
    prior = np.bincount(labels[labels != 255].astype(int), minlength=3) / (labels != 255).sum()
    held = cls[held_pix]
    held = held[held != 255].astype(int)
    assert "majority" in name
    assert got["val_loss"] == pytest.approx(-np.log(prior[held]).mean(), rel=1e-5)
    assert got["metrics"]["accuracy"] == pytest.approx((held == prior.argmax()).mean(), rel=1e-9)


# ---- the training loop: every held-out sample by default, baselines at every evaluation ----------

C, ITERS = 8, 2
DS = ["--deepspeed", "--deepspeed_config", os.path.join(REPO, "ds_configs", "zero1_fp32.json")]
LAYOUT = ["--tensor-model-parallel-size", "2", "--channel-parallel-size", "2", "--num-layers", "1",
          "--hidden-size", "32", "--num-attention-heads", "2", "--dchag-groups", "4", "--micro-batch-size", "4",
          "--global-batch-size", "4", "--train-iters", str(ITERS), "--eval-interval", str(ITERS),
          "--log-interval", "100", "--seed", "11"]
# 10 images of 20 x 16 in 8 x 8 tiles: 6 tiles each (the last row padded), the last 6 of 60 held out
MAE = DS + LAYOUT + ["--task", "mae", "--data-path", "synthetic:num_images=10,height=20,width=16",
                     "--num-channels", str(C), "--img-h", "8", "--img-w", "8", "--patch-dim", "2", "--mask-ratio", "0.5"]
# a global grid of 36 rows in 16 x 16 tiles (the last row padded); 40 steps, the last 4 held out
FORECAST = DS + LAYOUT + ["--task", "forecast", "--data-path", "synthetic:num_images=40,height=36,width=16",
                          "--num-channels", str(C), "--img-h", "16", "--img-w", "16", "--patch-dim", "4"]


def _job(tmp):
    import pretrain_dchag
    from dchag.training import pretrain, release
    out = {}
    for name, argv in {"default": MAE + ["--tensorboard-dir", os.path.join(tmp, "tb")],
                       "explicit": MAE + ["--eval-iters", "1000"], "one": MAE + ["--eval-iters", "1"],
                       "forecast": FORECAST}.items():
        history = pretrain(pretrain_dchag.model_provider, pretrain_dchag.forward_step,
                           pretrain_dchag.datasets_provider, argv + ["--log-file", os.path.join(tmp, f"{name}.log")],
                           eval_metrics_func=pretrain_dchag.task_metrics, loss_weight_func=pretrain_dchag.loss_weight)
        out[name] = {"val": history["val_losses"][ITERS], "baselines": history["val_baselines"][ITERS]}
        release(history)
    return out


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("evaluation"))
    return tmp, run_distributed(_job, 2, tmp)[0]


def _parity_baselines(argv):
    """tools/parity.py's baselines: one process, every channel, the whole held-out split."""
    from dchag.arguments import model_config, parse_args
    from dchag.data import build_datasets
    args = parse_args(argv)
    cfg = model_config(args, C)
    _, valid = build_datasets(args.data_path, task=args.task, img_h=args.img_h, img_w=args.img_w, num_channels=C,
                              seed=args.seed, lead_time=args.lead_time)
    return {name: b["val_loss"] for name, b in _baselines(valid, args.task, args, cfg, micro_batch=4).items()}


def test_default_evaluation_scores_every_held_out_sample_once(evaluated):
    tmp, r = evaluated
    assert r["default"]["val"] == r["explicit"]["val"]  # the steering check: default = --eval-iters 1000
    assert r["one"]["val"] != r["default"]["val"]
    line = lambda name: [s for s in open(os.path.join(tmp, f"{name}.log")) if s.startswith("validation loss")][-1]  # noqa: E731
    assert "| scored: 6 of 6 held-out samples |" in line("default")
    assert "| scored: 4 of 6 held-out samples |" in line("one")  # --eval-iters 1: one global batch of 4


def test_baselines_at_every_evaluation_equal_the_parity_tools(evaluated):
    tmp, r = evaluated
    for name, argv in (("default", MAE), ("forecast", FORECAST)):
        loop, parity = r[name]["baselines"], _parity_baselines(argv)
        assert list(loop) == list(parity) and len(loop) == 2, (loop, parity)
        for b in loop:
            assert loop[b] == pytest.approx(parity[b], rel=1e-6), (name, b)
    line = [s for s in open(os.path.join(tmp, "default.log")) if s.startswith("validation loss")][-1]
    assert " baseline channel mean: " in line and " baseline visible-pixel mean: " in line
    best = min(r["default"]["baselines"].values())
    assert ("NOT BELOW baseline" in line) == (r["default"]["val"] >= best), line  # 2 iterations: not below


def test_tensorboard_has_the_baselines(evaluated):
    tmp, r = evaluated
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(os.path.join(tmp, "tb"))
    acc.Reload()
    for name, value in r["default"]["baselines"].items():
        (event,) = acc.Scalars(f"baseline/{name}")
        assert event.step == ITERS and math.isfinite(event.value)
        assert event.value == pytest.approx(value, rel=1e-6)
