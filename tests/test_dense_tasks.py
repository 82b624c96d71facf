"""The dense downstream tasks (regress, segment): targets, losses, metrics, training, prediction.

* Losses and metrics against independent numpy computations (R^2, RMSE, CE with ignored pixels,
  accuracy, mean IoU), pooled over micro-batches.
* Target files: the shapes each task accepts, pixel alignment, invalid and ignored pixels, the
  training-tile statistics, and the refusals (names the value and the flag).
* One 2-rank job (T = P = 2: channel-sharded input, replicated dense head): a short regress and
  a short segment training on synthetic data (the generator's abundances / their argmax), whose
  held-out loss and metrics beat the task's baseline on the same held-out tiles; then in one
  plain process the export and tools/predict.py on a file of the held-out images, whose R^2,
  accuracy and mIoU recomputed with numpy equal the training log's last evaluation.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tests.distributed import run_distributed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
C, IMAGES, ITERS = 16, 64, 60
HELD_OUT = range(48, 64)  # --valid-fraction 0.25 of 64 one-tile images
DATA = f"synthetic:num_images={IMAGES}"
COMMON = ["--deepspeed", "--deepspeed_config", os.path.join(REPO, "ds_configs", "zero1_fp32.json"),
          "--data-path", DATA, "--num-channels", str(C), "--target-path", "synthetic", "--img-h", "8", "--img-w", "8",
          "--patch-dim", "2", "--num-layers", "1", "--hidden-size", "32", "--num-attention-heads", "4",
          "--dchag-groups", "4", "--tensor-model-parallel-size", "2", "--channel-parallel-size", "2",
          "--micro-batch-size", "8", "--global-batch-size", "8", "--train-iters", str(ITERS), "--lr", "3e-3",
          "--lr-warmup-iters", "5", "--valid-fraction", "0.25", "--eval-interval", str(ITERS), "--eval-iters", "2",
          "--log-interval", "1000", "--seed", "1234"]
RUNS = {"regress": ["--task", "regress"], "segment": ["--task", "segment", "--num-classes", "4"]}


def _env():
    return {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}


# ---- losses and metrics against numpy ------------------------------------------------------------


def _forward(task, pred, target, valid, normalizer=None):
    """The task's forward step on a stand-in model that outputs ``pred``: (loss, stats) at
    evaluation, the training loss (over ``normalizer``, as the loop pools it) otherwise."""
    batch = {"images": torch.zeros(pred.shape[0], 1, *pred.shape[2:]), "valid": torch.ones(pred.shape[0], 1,
                                                                                         *pred.shape[2:], dtype=bool),
             "target": torch.tensor(target), "target_valid": torch.tensor(valid)}
    model = lambda images: torch.tensor(pred)  # noqa: E731
    if normalizer is not None:
        return task.forward_step(model, {**batch, "loss_normalizer": normalizer}, None, None, 3)
    return task.forward_step(model, batch, None, None, -1)


def test_regress_loss_and_metrics_match_numpy():
    from dchag.tasks import get_task
    from dchag.tasks.regress import regress_metrics, regress_sums
    rng = np.random.default_rng(0)
    K, std = 3, np.array([2.0, 0.5, 10.0])
    parts = []
    for _ in range(2):  # two micro-batches, pooled
        t = rng.normal(size=(2, K, 4, 5))
        p = t + rng.normal(scale=0.5, size=t.shape)
        v = rng.random(t.shape) > 0.2
        t[~v] = np.nan  # invalid targets arrive zero-filled, marked invalid
        parts.append((p, np.nan_to_num(t), v))
    p, t, v = parts[0]
    loss, stats = _forward(get_task("regress"), p, t, v)
    assert float(loss) == pytest.approx(((p - t) ** 2)[v].mean(), rel=1e-12)
    assert stats["loss_sums"].tolist() == pytest.approx([((p - t) ** 2)[v].sum(), v.sum()], rel=1e-12)
    sums = sum(regress_sums(*(torch.tensor(a) for a in part)) for part in parts)
    metrics = regress_metrics(sums, ["a", "b", "c"], std)
    for k, name in enumerate("abc"):
        y = np.concatenate([pt[2][:, k][pt[2][:, k]] * 0 + pt[1][:, k][pt[2][:, k]] for pt in parts])
        yhat = np.concatenate([pt[0][:, k][pt[2][:, k]] for pt in parts])
        r2 = 1 - ((y - yhat) ** 2).sum() / ((y - y.mean()) ** 2).sum()
        assert metrics[f"r2/{name}"] == pytest.approx(r2, rel=1e-9)
        assert metrics[f"rmse/{name}"] == pytest.approx(std[k] * np.sqrt(((y - yhat) ** 2).mean()), rel=1e-9)
    # A perfect prediction: R^2 1, RMSE 0; the held-out mean: R^2 0.
    y = torch.tensor(rng.normal(size=(1, 1, 3, 3)))
    ones = torch.ones_like(y, dtype=torch.bool)
    assert regress_metrics(regress_sums(y, y, ones), ["x"]) == {"r2/x": 1.0, "rmse/x": 0.0}
    assert regress_metrics(regress_sums(y * 0 + y.mean(), y, ones), ["x"])["r2/x"] == pytest.approx(0.0, abs=1e-12)


def _log_softmax(z, axis):
    z = z - z.max(axis=axis, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=axis, keepdims=True))


def test_segment_loss_and_metrics_match_numpy():
    from dchag.tasks import get_task
    from dchag.tasks.segment import confusion_matrix, segment_metrics
    rng = np.random.default_rng(1)
    K = 5
    parts = []
    for _ in range(2):
        logits = rng.normal(size=(2, K, 4, 6))
        target = rng.integers(0, K - 1, size=(2, 4, 6))  # class 4 never occurs in the targets ...
        logits[:, 3] -= 100.0  # ... and class 3 is never predicted: IoU_3 = 0; class 4 may be predicted
        valid = rng.random(target.shape) > 0.25
        parts.append((logits, np.where(valid, target, 0), valid))
    logits, target, valid = parts[0]
    lp = _log_softmax(logits, 1)
    ce = -np.take_along_axis(lp, target[:, None], 1)[:, 0][valid]
    loss, stats = _forward(get_task("segment"), logits, target, valid)
    assert float(loss) == pytest.approx(ce.mean(), rel=1e-9)
    assert stats["loss_sums"].tolist() == pytest.approx([ce.sum(), valid.sum()], rel=1e-9)
    # In training, pooled over the global batch: the summed CE over the loop's normalizer
    normalized = _forward(get_task("segment"), logits, target, valid, normalizer=torch.tensor(7.0, dtype=torch.float64))
    assert float(normalized) == pytest.approx(ce.sum() / 7.0, rel=1e-9)
    conf = sum(confusion_matrix(*(torch.tensor(a) for a in part)) for part in parts)
    metrics = segment_metrics(conf)
    y = np.concatenate([pt[1][pt[2]] for pt in parts])
    yhat = np.concatenate([pt[0].argmax(1)[pt[2]] for pt in parts])
    ious = []
    for k in range(K):
        inter, union = np.sum((y == k) & (yhat == k)), np.sum((y == k) | (yhat == k))
        if union:
            ious.append(inter / union)
    assert metrics["accuracy"] == pytest.approx(np.mean(y == yhat), rel=1e-12)
    assert metrics["miou"] == pytest.approx(np.mean(ious), rel=1e-12)
    assert 0 in ious  # class 3: in the targets, never predicted


# ---- targets ------------------------------------------------------------------------------------


def _npy(tmp_path, name, array):
    path = str(tmp_path / name)
    np.save(path, np.asarray(array))
    return path


def test_regress_targets_shapes_statistics_and_invalid_values(tmp_path):
    from dchag.data import DataError, build_datasets
    rng = np.random.default_rng(2)
    x = rng.normal(size=(4, 3, 8, 8)).astype(np.float32)
    y = rng.normal(5.0, 2.0, size=(4, 2, 8, 8)).astype(np.float32)
    y[0, 1, 0, :3] = np.nan
    data, target = _npy(tmp_path, "x.npy", x), _npy(tmp_path, "y.npy", y)
    kw = dict(task="regress", img_h=4, img_w=4, valid_fraction=0.25, target_path=target)
    train, valid = build_datasets(data, **kw)  # 16 tiles: the last 4 (image 3) held out
    train_y = y[:3]
    np.testing.assert_allclose(train.targets.stats.mean, np.nanmean(train_y, axis=(0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(train.targets.stats.std, np.nanstd(train_y, axis=(0, 2, 3)), rtol=1e-5)
    item = train[1]  # image 0, rows 0:4, cols 4:8
    want = (y[0, :, 0:4, 4:8] - train.targets.stats.mean[:, None, None]) / train.targets.stats.std[:, None, None]
    np.testing.assert_allclose(item["target"].numpy(), want, rtol=1e-5, atol=1e-6)
    first = train[0]  # the NaN row: marked invalid, zero-filled
    assert not first["target_valid"][1, 0, :3].any() and first["target_valid"].sum() == 2 * 16 - 3
    assert (first["target"][1, 0, :3] == 0).all()
    assert train.targets.invalid == {"train": (3, 3 * 2 * 64), "valid": (0, 2 * 64)}  # counted for the summary
    assert "invalid target value(s) (NaN, Inf, no-data) ignored: 3 of 384 (0.8%) in the training tiles, 0 of 128 " \
        "(0.0%) in the held-out tiles" in train.targets.summary()
    # [K, H, W] for a one-image input; a wrong image count or size is refused, naming both
    one = _npy(tmp_path, "x1.npy", x[0])
    tr, _ = build_datasets(one, **{**kw, "target_path": _npy(tmp_path, "y1.npy", y[0])})
    assert tr[0]["target"].shape == (2, 4, 4)
    with pytest.raises(DataError, match="holds 1 image.*has 4 image"):
        build_datasets(data, **{**kw, "target_path": _npy(tmp_path, "y1b.npy", y[0])})
    with pytest.raises(DataError, match="image 0 of the targets is 8 x 6 but the input image is 8 x 8"):
        build_datasets(data, **{**kw, "target_path": _npy(tmp_path, "y2.npy", y[..., :6])})
    with pytest.raises(DataError, match=r"It looks channels-last \(\[H, W, K\]\)"):
        build_datasets(data, **{**kw, "target_path": _npy(tmp_path, "y3.npy", np.moveaxis(y, 1, -1))})
    with pytest.raises(DataError, match="needs --target-path"):
        build_datasets(data, **{**kw, "target_path": None})


def test_dense_targets_of_tiles_past_the_edge(tmp_path):
    """10 x 12 images in 4 x 6 tiles: the last tile row is padded; its padding is no target
    (target_valid False), every pixel's target is in exactly one tile of one split, and the
    training statistics / class counts are those of exactly the training tiles' pixels."""
    from dchag.data import build_datasets
    rng = np.random.default_rng(4)
    x = rng.normal(size=(2, 3, 10, 12)).astype(np.float32)
    y = rng.normal(5.0, 2.0, size=(2, 2, 10, 12)).astype(np.float32)
    cls = rng.integers(0, 3, size=(2, 10, 12)).astype(np.float32)
    data = _npy(tmp_path, "x.npy", x)
    kw = dict(img_h=4, img_w=6, valid_fraction=0.25)  # 2 x 3 x 2 = 12 tiles, the last 3 held out
    train, valid = build_datasets(data, task="regress", target_path=_npy(tmp_path, "y.npy", y), **kw)
    assert (len(train), len(valid)) == (9, 3)
    in_train = np.zeros((2, 10, 12), bool)
    seen = np.zeros((2, 10, 12), int)
    for ds in (train, valid):
        for i in range(len(ds)):
            t, item = ds.index.tile(ds.samples[i]), ds[i]
            h = t.read_rows.stop - t.read_rows.start
            assert item["target_valid"][:, :h].all() and not item["target_valid"][:, h:].any()
            seen[t.image, t.read_rows, t.read_cols] += 1
            in_train[t.image, t.read_rows, t.read_cols] |= ds is train
    assert (seen == 1).all()
    train_y = np.moveaxis(y, 1, 0)[:, in_train]  # [K, training pixels]
    np.testing.assert_allclose(train.targets.stats.mean, train_y.mean(1), rtol=1e-6)
    np.testing.assert_allclose(train.targets.stats.std, train_y.std(1), rtol=1e-5)
    train, _ = build_datasets(data, task="segment", target_path=_npy(tmp_path, "c.npy", cls), num_classes=3, **kw)
    np.testing.assert_array_equal(train.targets.class_counts, np.bincount(cls[in_train].astype(int), minlength=3))


@pytest.mark.parametrize("layout", ["HW", "NHW", "N1HW"])
def test_class_maps_in_every_layout_with_ignored_pixels(tmp_path, layout):
    from dchag.data import build_datasets
    rng = np.random.default_rng(3)
    n = 1 if layout == "HW" else 3
    x = rng.normal(size=(n, 2, 4, 4)).astype(np.float32)
    cls = rng.integers(0, 3, size=(n, 4, 4)).astype(np.float32)
    cls[0, 0, 0], cls[0, 1, 1] = 255, np.nan
    arr = {"HW": cls[0], "NHW": cls, "N1HW": cls[:, None]}[layout]
    data = _npy(tmp_path, "x.npy", x if n > 1 else x[0])
    train, valid = build_datasets(data, task="segment", img_h=4, img_w=4, valid_fraction=0.0 if n == 1 else 0.34,
                                  target_path=_npy(tmp_path, "c.npy", arr), num_classes=3, ignore_index=255)
    for i in range(len(train)):
        item = train[i]
        want_valid = np.isfinite(cls[i]) & (cls[i] != 255)
        np.testing.assert_array_equal(item["target_valid"].numpy(), want_valid)
        np.testing.assert_array_equal(item["target"].numpy()[want_valid], cls[i][want_valid])
        assert item["target"].dtype == torch.int64
    counts = np.bincount(np.concatenate([cls[i][np.isfinite(cls[i]) & (cls[i] != 255)] for i in range(len(train))])
                         .astype(int), minlength=3)
    np.testing.assert_array_equal(train.targets.class_counts, counts)
    assert train.targets.invalid["train"][0] == 2  # the 255 and the NaN, counted for the summary


def test_class_values_outside_the_classes_are_refused_by_value_and_flag(tmp_path):
    from dchag.data import DataError, build_datasets
    x = np.zeros((2, 2, 4, 4), np.float32)
    cls = np.zeros((2, 4, 4), np.float32)
    cls[1, 2, 3] = 7  # in the held-out image: every tile is checked
    kw = dict(task="segment", img_h=4, img_w=4, valid_fraction=0.5, num_classes=4)
    with pytest.raises(DataError, match=r"image 1, row 2, column 3 holds 7, which is not a class of --num-classes 4"):
        build_datasets(_npy(tmp_path, "x.npy", x), target_path=_npy(tmp_path, "c.npy", cls), **kw)
    cls[1, 2, 3] = 1.5
    with pytest.raises(DataError, match="holds 1.5"):
        build_datasets(_npy(tmp_path, "x.npy", x), target_path=_npy(tmp_path, "c.npy", cls), **kw)


def test_the_class_count_is_checked_before_the_start_naming_the_count_needed(tmp_path):
    """--num-classes 2 with labels 0 .. 2: the task's pre-flight check reads the whole map and names 3."""
    from dchag.arguments import parse_args
    from dchag.data import DataError
    from dchag.tasks import get_task
    cls = np.zeros((2, 4, 4), np.float32)
    cls[1, 3, 3], cls[0, 0, 0] = 2, 255  # 255: --ignore-index, not a class
    argv = ["--task", "segment", "--data-path", _npy(tmp_path, "x.npy", np.zeros((2, 2, 4, 4), np.float32)),
            "--target-path", _npy(tmp_path, "c.npy", cls), "--img-h", "4", "--img-w", "4", "--patch-dim", "2",
            "--train-iters", "1"]
    with pytest.raises(DataError, match=r"holds class values 0 \.\. 2 and not --ignore-index 255, so it needs "
                                        r"--num-classes 3, not 2"):
        get_task("segment").prepare_args(parse_args(argv + ["--num-classes", "2"]))
    args = parse_args(argv + ["--num-classes", "3"])
    get_task("segment").prepare_args(args)
    assert args.num_outputs == 3


def test_flags_are_checked_by_the_task():
    from dchag.arguments import parse_args
    from dchag.tasks import get_task
    from dchag.data import DataError
    base = ["--img-h", "8", "--img-w", "8", "--patch-dim", "2", "--train-iters", "1", "--num-channels", "6"]
    with pytest.raises(DataError, match="--target-path is read by --task regress and segment only"):
        get_task("mae").prepare_args(parse_args(base + ["--target-path", "y.npy"]))
    with pytest.raises(DataError, match="needs --num-classes"):
        get_task("segment").prepare_args(parse_args(base + ["--task", "segment", "--target-path", "synthetic"]))
    with pytest.raises(DataError, match="--ignore-index 2 is one of the --num-classes 4"):
        get_task("segment").prepare_args(parse_args(base + ["--task", "segment", "--target-path", "synthetic",
                                                            "--num-classes", "4", "--ignore-index", "2"]))
    args = parse_args(base + ["--task", "regress", "--target-path", "synthetic", "--data-path", "synthetic:k=3"])
    get_task("regress").prepare_args(args)
    assert args.num_outputs == 3  # the generator's endmembers
    from dchag.model.config import TASKS
    from dchag.tasks.registry import UnknownTaskError
    with pytest.raises(UnknownTaskError, match="the tasks are mae, forecast, regress, segment"):
        get_task("classify")
    assert all(get_task(name).name == name for name in TASKS)  # the model's task table and the registry agree


def test_synthetic_targets_are_the_generators_abundances():
    from dchag.data import open_source
    from dchag.data.readers.synthetic import SyntheticTargetSource
    src = open_source("synthetic:num_images=3,k=5", num_channels=7, height=6, width=10, seed=4)
    reg, seg = SyntheticTargetSource(src, "regress"), SyntheticTargetSource(src, "segment")
    assert reg.shape == (3, 5, 6, 10) and seg.shape == (3, 1, 6, 10)
    rows, cols = np.arange(2, 5), np.arange(1, 9)
    A = src.abundances(2, rows, cols)
    np.testing.assert_allclose(reg.read(2, range(5), slice(2, 5), slice(1, 9)), A, rtol=1e-6)
    np.testing.assert_allclose(A.sum(0), 1.0, rtol=1e-9)
    np.testing.assert_array_equal(seg.read(2, range(1), slice(2, 5), slice(1, 9))[0], A.argmax(0))
    # The input is the linear mix of these abundances (noise aside): x = S^T A
    x = src.read(2, range(7), slice(2, 5), slice(1, 9))
    mix = np.einsum("kc,khw->chw", src.spectra(np.arange(7)), A)
    assert np.abs(x - mix).max() < 6 * src.noise


# ---- training, export and prediction -------------------------------------------------------------


def _train_job(tmp):
    import pretrain_dchag
    from dchag.training import pretrain, release
    out = {}
    for task, flags in RUNS.items():
        argv = COMMON + flags + ["--save", os.path.join(tmp, task), "--log-file", os.path.join(tmp, f"{task}.log")]
        if task == "regress":
            argv += ["--tensorboard-dir", os.path.join(tmp, "tb")]
        history = pretrain(pretrain_dchag.model_provider, pretrain_dchag.forward_step,
                           pretrain_dchag.datasets_provider, argv, non_loss_data_func=pretrain_dchag.task_picture,
                           eval_metrics_func=pretrain_dchag.task_metrics, loss_weight_func=pretrain_dchag.loss_weight)
        out[task] = {"val_loss": history["val_losses"][ITERS], "metrics": history["val_metrics"][ITERS],
                     "first_loss": history["losses"][1], "baselines": history["val_baselines"][ITERS]}
        release(history)
    return out


EXPORT_AND_PREDICT = """
import sys
import numpy as np
from dchag.checkpointing.convert import export_consolidated
from dchag.data import open_source
sys.path.insert(0, "tools")
import predict
tmp = sys.argv[1]
src = open_source("{data}", num_channels={C}, height=8, width=8, seed=1234)
x = np.stack([src.read(i) for i in range({start}, {stop})])
x[0, :, 0, 0] = np.nan  # a pixel with no valid channel
np.save(f"{{tmp}}/heldout.npy", x)
for task in ("regress", "segment"):
    export_consolidated(f"{{tmp}}/{{task}}", f"{{tmp}}/{{task}}_export")
    assert predict.main(["--load", f"{{tmp}}/{{task}}_export", "--data-path", f"{{tmp}}/heldout.npy", "--task", task,
                         "--output", f"{{tmp}}/{{task}}_pred.npy", "--picture", f"{{tmp}}/{{task}}_pred.png",
                         "--no-progress"]) == 0
import dchag, torch
m = dchag.load_pretrained(f"{{tmp}}/regress_export", device="cpu")
images, _ = m.normalize(x[1:3])
np.save(f"{{tmp}}/regress_normalized.npy", m.forward_normalized(images).numpy())
p = dchag.load_pretrained(f"{{tmp}}/segment_export", device="cpu").segment(x[:2], return_probabilities=True)
np.save(f"{{tmp}}/segment_prob.npy", p)
""".format(data=DATA, C=C, start=HELD_OUT.start, stop=HELD_OUT.stop)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("dense"))
    ranks = run_distributed(_train_job, 2, tmp)
    proc = subprocess.run([sys.executable, "-c", EXPORT_AND_PREDICT, tmp], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp, ranks[0]


def _heldout_baselines(task):
    """The task's baselines on exactly the held-out tiles evaluation scores (P = 1 loader)."""
    from dchag.arguments import parse_args
    from dchag.data import build_datasets, build_eval_loader
    from dchag.tasks import get_task
    args = parse_args(COMMON + RUNS[task])
    _, valid = build_datasets(DATA, task=task, img_h=8, img_w=8, num_channels=C, valid_fraction=0.25, seed=1234,
                              target_path="synthetic", num_classes=args.num_classes)
    return get_task(task).baselines(build_eval_loader(valid, 8, num_micro_batches=2), None, args)


def test_regress_training_beats_the_training_mean_on_held_out_tiles(trained):
    _, r = trained
    got = r["regress"]
    baseline = _heldout_baselines("regress")["training mean"]
    names = [f"abundance{k}" for k in range(4)]
    print(f"regress held-out: val loss {got['val_loss']:.4f} (training mean {baseline['val_loss']:.4f}); "
          + ", ".join(f"R^2 {n} {got['metrics'][f'r2/{n}']:.3f} ({baseline['metrics'][f'r2/{n}']:.3f})" for n in names))
    assert got["val_loss"] < 0.6 * baseline["val_loss"]
    assert got["baselines"] == {"training mean": pytest.approx(baseline["val_loss"], rel=1e-6)}  # the loop's, P = 2
    for n in names:
        assert abs(baseline["metrics"][f"r2/{n}"]) < 0.05  # the mean of the training tiles: R^2 about 0
        assert got["metrics"][f"r2/{n}"] > 0.3
        assert got["metrics"][f"rmse/{n}"] < baseline["metrics"][f"rmse/{n}"]
    # Every target is valid and both micro-batches have 8 x 64 pixels: the loss (MSE in normalized
    # units) is the mean over targets of (RMSE_k / std_k)^2.
    std = json.load(open(os.path.join(trained[0], "regress", f"iter_{ITERS:07d}", "normalization.json")))["targets"]["std"]
    assert got["val_loss"] == pytest.approx(np.mean([(got["metrics"][f"rmse/{n}"] / s) ** 2 for n, s in zip(names, std)]),
                                            rel=1e-5)


def test_segment_training_beats_the_majority_class_on_held_out_tiles(trained):
    _, r = trained
    got = r["segment"]
    ((name, baseline),) = _heldout_baselines("segment").items()
    assert got["baselines"] == {name: pytest.approx(baseline["val_loss"], rel=1e-6)}  # the loop's, P = 2
    print(f"segment held-out: val loss {got['val_loss']:.4f} ({baseline['val_loss']:.4f}), accuracy "
          f"{got['metrics']['accuracy']:.3f} ({baseline['metrics']['accuracy']:.3f}), mIoU {got['metrics']['miou']:.3f} "
          f"({baseline['metrics']['miou']:.3f}) (baseline: training class prior / majority class)")
    assert got["val_loss"] < 0.8 * baseline["val_loss"]
    assert got["metrics"]["accuracy"] > baseline["metrics"]["accuracy"] + 0.2
    assert got["metrics"]["miou"] > baseline["metrics"]["miou"] + 0.2


def test_log_tensorboard_and_picture(trained):
    tmp, _ = trained
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(os.path.join(tmp, "tb"))
    acc.Reload()
    assert {f"val/r2/abundance{k}" for k in range(4)} | {f"val/rmse/abundance{k}" for k in range(4)} <= set(
        acc.Tags()["scalars"])
    log = open(os.path.join(tmp, "segment.log")).read()
    assert f"validation loss at iteration {ITERS} | val loss:" in log and "| accuracy: " in log and "| miou: " in log
    assert "| scored: 16 of 16 held-out samples | baseline training class prior (majority class): " in log
    for task in RUNS:
        assert os.path.getsize(os.path.join(tmp, task, f"{task}_iter_{ITERS:07d}.png")) > 1000


def _abundances():
    from dchag.data import open_source
    src = open_source(DATA, num_channels=C, height=8, width=8, seed=1234)
    return np.stack([src.abundances(i, np.arange(8), np.arange(8)) for i in HELD_OUT])  # [16, K, 8, 8]


def test_predict_regress_on_a_file_gives_the_logged_r2_in_target_units(trained):
    """tools/predict.py --task regress on the 16 held-out images: target units (the export's
    statistics undone), NaN where no input channel is valid, and the R^2 numpy computes from it
    against the generator's abundances equals the training log's (evaluated at T = P = 2)."""
    tmp, r = trained
    pred = np.load(os.path.join(tmp, "regress_pred.npy"))
    config = json.load(open(os.path.join(tmp, "regress_export", "config.json")))
    A = _abundances()
    assert pred.shape == A.shape
    assert np.isnan(pred[0, :, 0, 0]).all() and np.isnan(pred).sum() == 4
    mean, std = np.array(config["targets"]["mean"]), np.array(config["targets"]["std"])
    normalized = np.load(os.path.join(tmp, "regress_normalized.npy"))
    np.testing.assert_allclose(pred[1:3], normalized * std[:, None, None] + mean[:, None, None], rtol=1e-5, atol=1e-6)
    ok = ~np.isnan(pred[:, 0])
    for k in range(4):
        y, yhat = A[:, k][ok], pred[:, k][ok]
        r2 = 1 - ((y - yhat) ** 2).sum() / ((y - y.mean()) ** 2).sum()
        assert r2 == pytest.approx(r["regress"]["metrics"][f"r2/abundance{k}"], abs=0.01), k
    assert os.path.getsize(os.path.join(tmp, "regress_pred.png")) > 1000


def test_predict_segment_on_a_file_gives_the_logged_accuracy(trained):
    tmp, r = trained
    pred = np.load(os.path.join(tmp, "segment_pred.npy"))
    truth = _abundances().argmax(1)
    assert pred.shape == (16, 1, 8, 8) and np.isnan(pred[0, 0, 0, 0]) and np.isnan(pred).sum() == 1
    ok = ~np.isnan(pred[:, 0])
    assert set(np.unique(pred[:, 0][ok])) <= {0.0, 1.0, 2.0, 3.0}
    accuracy = np.mean(pred[:, 0][ok] == truth[ok])
    assert accuracy == pytest.approx(r["segment"]["metrics"]["accuracy"], abs=0.01)
    prob = np.load(os.path.join(tmp, "segment_prob.npy"))
    assert prob.shape == (2, 4, 8, 8) and np.isnan(prob[0, :, 0, 0]).all()
    ok = ~np.isnan(prob[:, 0])
    np.testing.assert_allclose(prob.sum(1)[ok], 1.0, rtol=1e-5)
    np.testing.assert_array_equal(prob.argmax(1)[ok], np.nan_to_num(pred[:2, 0])[ok])
    assert math.isfinite(r["segment"]["first_loss"])


def test_parity_report_of_a_dense_task(tmp_path):
    """tools/parity.py's report for --task regress: the metric table under the task's caption
    (the mean over seeds, the baseline beside it; more than 8 targets collapse to their mean),
    the verdict against the baseline, and the picture of target and predictions per method."""
    from dchag.parity.report import write_report
    rng = np.random.default_rng(5)
    names = [f"t{k}" for k in range(10)]
    tiles = [{"index": i, "input": rng.normal(size=(3, 4, 4)), "target": rng.random((10, 4, 4)),
              "prediction": rng.random((10, 4, 4))} for i in range(2)]
    metrics = lambda r2: {**{f"r2/{n}": r2 for n in names}, **{f"rmse/{n}": 1 - r2 for n in names}}  # noqa: E731
    method = lambda spec, label, vals, r2s: {"label": label, "spec": spec, "val_loss": vals, "train_loss": vals,  # noqa: E731
                                             "seconds": [1, 1], "metrics": [metrics(r) for r in r2s],
                                             "curves": {str(s): {"iterations": [5], "val_loss": [v]}
                                                        for s, v in zip((1, 2), vals)}}
    results = {"seeds": [1, 2], "methods": {"flat": method("flat", "flat (baseline)", [0.3, 0.5], [0.6, 0.8]),
                                            "linear": method("linear", "D-CHAG-L G=4", [0.4, 1.2], [0.5, 0.1])},
               "baselines": {"training mean": {"val_loss": 1.0, "metrics": metrics(0.0)}},
               "pictures": {"flat": {"tiles": tiles, "names": names, "rgb": [0, 1, 2]}},
               "setup": {"argv": ["--task", "regress"], "task": "regress", "data_path": "synthetic", "split": "s",
                         "held_out_samples": 2, "scored_per_evaluation": 2, "train_iters": 5, "num_channels": 8,
                         "tensor_model_parallel_size": 2, "channel_parallel_size": 2}}
    paths = write_report(results, str(tmp_path))
    md = (tmp_path / "parity.md").read_text()
    assert "Held-out R^2 and RMSE per target" in md
    assert "| method | r2 (mean of 10 variables) | rmse (mean of 10 variables) |" in md
    assert "| flat (baseline) | 0.7 | 0.3 |" in md and "| *training mean* | 0 | 1 |" in md
    assert "D-CHAG-L G=4 beats on average, but not in every seed, the baseline 'training mean'" in md
    assert str(tmp_path / "dense_maps.png") in paths and (tmp_path / "dense_maps.png").stat().st_size > 1000
