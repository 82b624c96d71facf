"""A blended pretraining end to end (the issue's steering check), through the real ``pretrain()``
path on 2 gloo ranks, tiny models.

Three sources blended ``0.4 A 0.3 B 0.3 C``, MAE, D-CHAG-L (G = 4): the bundled ENVI cube (450
bands), a 13-band npy with names and wavelengths in its sidecar, a 500-band npy with wavelengths
only (its first 20 are the cube's: shared channels, borrowed across ranks at P = 2). One job runs:

* T = P = 2: uninterrupted, saving at iteration 3 and 6, with TensorBoard and a log file;
* the same at T = P = 1 (DP 2): the same losses (1e-5), so the blend's order and the model's sources
  do not depend on the layout;
* a stop at iteration 3 (``--exit-interval``) and the auto-resume command (``--load`` = ``--save``):
  the losses after the stop equal the uninterrupted run's exactly;
* a second blend holding a 1-band source and a 3-band source (C < G: repeated slots) beside a
  13-band one, at T = P = 2 and T = P = 1: equal losses;
* a fine-tune of the blended checkpoint onto a new 8-band sensor, matched against the union.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from tests.distributed import run_distributed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FENIX = os.path.join(REPO, "data", "samples", "fenix_450band", "image.hdr")
ITERS, SAVE_AT = 6, 3
MODEL = ["--task", "mae", "--img-h", "8", "--img-w", "8", "--patch-dim", "2", "--mask-ratio", "0.5",
         "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--ffn-hidden-size", "64",
         "--dchag-aggregation", "linear", "--dchag-groups", "4", "--valid-fraction", "0.25",
         "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "1e-3", "--min-lr", "1e-4",
         "--lr-warmup-iters", "2", "--clip-grad", "1.0", "--seed", "1234", "--log-interval", "1",
         "--deepspeed", "--deepspeed_config", os.path.join(REPO, "ds_configs", "zero1_fp32.json")]
TP2 = ["--tensor-model-parallel-size", "2", "--channel-parallel-size", "2"]
TP1 = ["--tensor-model-parallel-size", "1", "--channel-parallel-size", "1"]
S2 = (("B01", 443.0), ("B02", 490.0), ("B03", 560.0), ("B04", 665.0), ("B05", 705.0), ("B06", 740.0),
      ("B07", 783.0), ("B08", 842.0), ("B8A", 865.0), ("B09", 945.0), ("B10", 1375.0), ("B11", 1610.0),
      ("B12", 2190.0))


def _npy(path, array, names=None, wavelengths=None):
    np.save(path, np.asarray(array, np.float32))
    side = {k: v for k, v in (("channel_names", names), ("wavelengths", wavelengths)) if v is not None}
    if side:
        with open(str(path)[:-4] + ".channels.json", "w") as f:
            json.dump(side, f)
    return str(path)


def _smooth(rng, n, c, h, w):
    """Smooth images (a few low-frequency fields mixed over the channels): something MAE can learn."""
    y, x = np.mgrid[0:h, 0:w] / 8.0
    fields = np.stack([np.cos(a * y + b * x + p) for a, b, p in rng.uniform(0, 2, (4, 3))])  # [4, h, w]
    mix = rng.uniform(0, 1, (n, c, 4))
    return np.einsum("nck,khw->nchw", mix, fields) + 0.05 * rng.standard_normal((n, c, h, w))


def _data(tmp):
    from dchag.data.readers.open import open_source
    rng = np.random.default_rng(0)
    fenix_wl = [float(w) for w in open_source(FENIX).wavelengths]
    paths = {
        "s2": _npy(os.path.join(tmp, "s2.npy"), _smooth(rng, 2, 13, 16, 16), [n for n, _ in S2], [w for _, w in S2]),
        "wide": _npy(os.path.join(tmp, "wide.npy"), _smooth(rng, 2, 500, 16, 16), None,
                     fenix_wl[:20] + list(np.linspace(2510, 3000, 480))),
        "three": _npy(os.path.join(tmp, "three.npy"), _smooth(rng, 2, 3, 16, 16), ["red", "green", "blue"]),
        "one": _npy(os.path.join(tmp, "one.npy"), _smooth(rng, 2, 1, 16, 16), ["pan"]),
        # a new sensor for the fine-tune: 8 bands inside the cube's range, by wavelength only
        "new": _npy(os.path.join(tmp, "new.npy"), _smooth(rng, 2, 8, 16, 16), None,
                    list(np.linspace(450, 2300, 8))),
    }
    return paths


def _train(argv):
    import pretrain_dchag
    from dchag.training import pretrain, release
    history = pretrain(pretrain_dchag.model_provider, pretrain_dchag.forward_step, pretrain_dchag.datasets_provider,
                       argv, eval_metrics_func=pretrain_dchag.task_metrics)
    out = {k: history.get(k) for k in ("losses", "val_losses", "source_losses", "val_source_losses", "summary",
                                       "exit_reason")}
    release(history)
    return out


def _job(tmp, paths):
    blend = ["--data-path", "0.4", FENIX, "0.3", paths["s2"], "0.3", paths["wide"]]
    full, stop = os.path.join(tmp, "full"), os.path.join(tmp, "stop")
    r = {"tp2": _train(MODEL + TP2 + blend + [
        "--train-iters", str(ITERS), "--save", full, "--save-interval", str(SAVE_AT), "--eval-interval", "3",
        "--tensorboard-dir", os.path.join(tmp, "tb"), "--log-file", os.path.join(tmp, "full.log")])}
    r["tp1"] = _train(MODEL + TP1 + blend + ["--train-iters", str(ITERS), "--eval-interval", "3"])
    resume = MODEL + TP2 + blend + ["--train-iters", str(ITERS), "--load", stop, "--save", stop, "--eval-interval", "3"]
    r["stopped"] = _train(resume + ["--exit-interval", str(SAVE_AT)])
    r["resumed"] = _train(resume)
    small = ["--data-path", "0.5", paths["s2"], "0.25", paths["three"], "0.25", paths["one"], "--train-iters", "4"]
    r["small_tp2"] = _train(MODEL + TP2 + small)
    r["small_tp1"] = _train(MODEL + TP1 + small)
    r["finetune"] = _train(MODEL + TP2 + ["--data-path", paths["new"], "--train-iters", "2", "--finetune",
                                          "--pretrained-checkpoint", full, "--log-file",
                                          os.path.join(tmp, "finetune.log")])
    return r


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("blend"))
    paths = _data(tmp)
    return tmp, run_distributed(_job, 2, tmp, paths)


def _close(a: dict, b: dict, rel=1e-5):
    assert sorted(a) == sorted(b)
    for it in a:
        assert math.isfinite(a[it]) and abs(a[it] - b[it]) <= rel * max(1.0, abs(a[it])), (it, a[it], b[it])


def test_a_blend_trains_the_same_at_t_p_2_and_at_t_p_1(job):
    _, ranks = job
    r = ranks[0]
    assert sorted(r["tp2"]["losses"]) == list(range(1, ITERS + 1))
    _close(r["tp2"]["losses"], r["tp1"]["losses"])
    _close(r["tp2"]["val_losses"], r["tp1"]["val_losses"])
    assert ranks[1]["tp2"]["losses"] == r["tp2"]["losses"]
    # each step one source, 0.4 / 0.3 / 0.3 over 6 steps: A B C A B C; the per-source losses are its steps'
    per = r["tp2"]["source_losses"]
    order = ["image", "s2", "wide"] * 2
    for it in range(1, ITERS + 1):
        name = order[it - 1]
        assert [k for k in per[it] if k.startswith("loss/")] == [f"loss/{name}"]  # the step's source only
        assert per[it][f"loss/{name}"] == r["tp2"]["losses"][it]
    assert per[ITERS]["share/image"] == pytest.approx(2 / 6) and per[5]["share/image"] == pytest.approx(2 / 5)


def test_the_held_out_loss_is_pooled_over_every_source(job):
    _, ranks = job
    r = ranks[0]["tp2"]
    for it in (3, 6):
        per = r["val_source_losses"][it]
        assert set(per) == {"val loss/image", "val loss/s2", "val loss/wide"}
        lo, hi = min(per.values()), max(per.values())
        assert lo <= r["val_losses"][it] <= hi  # a weighted mean of the sources' pooled losses
    _close({k: v for k, v in ranks[0]["tp1"]["val_source_losses"][6].items()},
           {k: v for k, v in r["val_source_losses"][6].items()})


def test_a_stop_and_the_auto_resume_command_end_on_the_uninterrupted_losses(job):
    _, ranks = job
    r = ranks[0]
    assert sorted(r["stopped"]["losses"]) == [1, 2, 3] and "exit-interval" in r["stopped"]["exit_reason"]
    assert sorted(r["resumed"]["losses"]) == [4, 5, 6]
    for it in range(1, ITERS + 1):  # bit for bit
        got = (r["stopped"] if it <= SAVE_AT else r["resumed"])["losses"][it]
        assert got == r["tp2"]["losses"][it], it
    assert r["resumed"]["val_losses"][6] == r["tp2"]["val_losses"][6]


def test_the_summary_log_tensorboard_and_checkpoint_name_every_source(job):
    tmp, ranks = job
    summary = "\n".join(ranks[0]["tp2"]["summary"])
    assert "a blend of 3 sources" in summary and "943 channels in their union" in summary
    assert "source 0 image:" in summary and "378" in summary and "weight 0.400" in summary
    assert "source 2 wide:" in summary and "378.19-3000 nm" in summary
    log = open(os.path.join(tmp, "full.log")).read()
    assert "loss/s2: " in log and "share wide: " in log and "val loss/image: " in log
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(os.path.join(tmp, "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for name in ("image", "s2", "wide"):
        assert {f"loss/{name}", f"val loss/{name}", f"blend-share/{name}"} <= tags
    args = json.load(open(os.path.join(tmp, "full", "iter_0000006", "dchag_args.json")))
    assert [s["name"] for s in args["data_sources"]] == ["image", "s2", "wide"]
    assert args["num_channels"] == 943 and len(args["channel_names"]) == 943
    assert args["data_sources"][2]["channels"][:20] == list(range(20))  # the cube's first 20 bands, shared
    norm = json.load(open(os.path.join(tmp, "full", "iter_0000006", "normalization.json")))
    assert [s["name"] for s in norm["sources"]] == ["image", "s2", "wide"] and len(norm["mean"]) == 943
    assert norm["sources"][1]["num_channels"] == 13 and len(norm["sources"][1]["mean"]) == 13


def test_a_source_of_one_band_and_a_source_with_fewer_channels_than_groups_train(job):
    _, ranks = job
    r = ranks[0]
    _close(r["small_tp2"]["losses"], r["small_tp1"]["losses"])
    trained = {k for per in r["small_tp2"]["source_losses"].values() for k, v in per.items()
               if k.startswith("loss/") and math.isfinite(v)}
    assert trained == {"loss/s2", "loss/three", "loss/one"}


def test_a_new_sensor_finetunes_from_the_blend_matched_against_the_union(job):
    tmp, ranks = job
    assert all(math.isfinite(v) for v in ranks[0]["finetune"]["losses"].values())
    log = open(os.path.join(tmp, "finetune.log")).read()
    assert "channels: 943 pretrained -> 8 here" in log
