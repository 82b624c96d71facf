"""Data faults of issue 30, on a real 2-rank run (T = 2, P = 2) and its checkpoint:

* a [4, 16, 16, 16] .npy with --num-channels 16 (16 bands of 16 x 16, channels first) trains; the
  start-up summary says once how it was read;
* a band with no valid value (all NaN) is named at start-up and ignored;
* every checkpoint records the data's fingerprint; a resume after the file grew from 4 to 8 images
  is refused naming what changed; with --allow-data-change it goes on, normalized with the
  checkpoint's statistics, and the summary says so; a checkpoint without a fingerprint resumes with
  one line saying the data cannot be checked.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil

import numpy as np
import pytest

from tests.distributed import run_distributed
from tests.test_training import _ds, _refused

DEAD_BAND = 5


def _stack(path, images):
    """``images`` images of 16 bands of 16 x 16 (channels first), band DEAD_BAND all NaN."""
    x = np.random.default_rng(images).normal(size=(images, 16, 16, 16)).astype(np.float32) + 1.0
    x[:, DEAD_BAND] = np.nan
    np.save(path, x)


def _argv(data, save, iters, *extra):
    return _ds("zero1_fp32.json") + [
        "--task", "mae", "--data-path", data, "--num-channels", "16", "--img-h", "8", "--img-w", "8",
        "--patch-dim", "2", "--num-layers", "1", "--hidden-size", "32", "--num-attention-heads", "4",
        "--dchag-groups", "4", "--tensor-model-parallel-size", "2", "--channel-parallel-size", "2",
        "--micro-batch-size", "2", "--train-iters", str(iters), "--lr-decay-iters", "4", "--save-interval", "2",
        "--log-interval", "1",
        "--save", save, "--load", save, *extra]


def _train(argv):
    import pretrain_dchag
    from dchag.training import pretrain, release
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        history = pretrain(pretrain_dchag.model_provider, pretrain_dchag.forward_step,
                           pretrain_dchag.datasets_provider, argv)
    losses = history["losses"]
    release(history)
    return {"losses": losses, "out": out.getvalue()}


def _job(tmp):
    import torch.distributed as dist
    data, run = os.path.join(tmp, "square.npy"), os.path.join(tmp, "run")
    r = {"first": _train(_argv(data, run, 2))}
    if dist.get_rank() == 0:
        shutil.copytree(run, os.path.join(tmp, "before"))  # the checkpoint as saved, for the pre-flight tests
        _stack(data, 8)  # the data file grows from 4 to 8 images
    dist.barrier()
    kind, msg, unchanged = _refused(_argv(data, run, 4), run)
    r["refused"] = (kind, msg, unchanged)
    dist.barrier()
    r["allowed"] = _train(_argv(data, run, 4, "--allow-data-change"))
    return r


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("data_faults"))
    _stack(os.path.join(tmp, "square.npy"), 4)
    return tmp, run_distributed(_job, 2, tmp)


def test_a_square_stack_with_a_dead_band_trains_and_says_how(runs):
    tmp, ranks = runs
    first = ranks[0]["first"]
    assert sorted(first["losses"]) == [1, 2] and all(np.isfinite(v) for v in first["losses"].values()), first
    out = first["out"]
    assert f"> note: {tmp}/square.npy (shape [4, 16, 16, 16]) is read channels-first, the documented layout: 16 " \
           "channels of 16 x 16 pixels" in out, out[-3000:]
    assert out.count("is read channels-first") == 1, out[-3000:]
    assert (f"> note: channel {DEAD_BAND} (ch{DEAD_BAND:03d}) of the 16 has no valid value (every value is NaN, Inf "
            "or the no-data value). It is ignored") in out, out[-3000:]
    assert "keep the other 15 channels of the data and set --num-channels 15" in out


def test_every_checkpoint_records_the_data_fingerprint(runs):
    tmp, _ = runs
    with open(os.path.join(tmp, "before", "iter_0000002", "data_fingerprint.json")) as f:
        doc = json.load(f)
    data = doc["sources"]["data"]
    assert (data["images"], data["channels"], data["image_size"]) == (4, 16, [16, 16])
    assert data["samples"] == {"train": 14, "valid": 2} and data["channel_names"][DEAD_BAND] == f"ch{DEAD_BAND:03d}"
    assert "square" not in json.dumps(doc), "no path: a copy of the data elsewhere is the same data"
    with open(os.path.join(tmp, "before", "iter_0000002", "manifest.json")) as f:
        assert "data_fingerprint.json" in f.read()


def test_a_resume_on_grown_data_is_refused_naming_what_changed(runs):
    tmp, ranks = runs
    for r in ranks:
        kind, msg, unchanged = r["refused"]
        assert kind == "CheckpointError" and unchanged, (kind, msg)
        assert f"cannot resume from {tmp}/run/iter_0000002: the data differs from the data it was trained on: " \
               "images 4 -> 8; training samples 14 -> 29; held-out samples 2 -> 3; its values" in msg, msg
        assert "add --allow-data-change" in msg


def test_allow_data_change_goes_on_with_the_saved_statistics(runs):
    tmp, ranks = runs
    allowed = ranks[0]["allowed"]
    assert sorted(allowed["losses"]) == [3, 4], allowed["losses"]
    out = allowed["out"]
    assert f"> statistics: saved with checkpoint {tmp}/run/iter_0000002" in out, out[-3000:]
    assert f"> note: the data differs from the data {tmp}/run/iter_0000002 was trained on (images 4 -> 8;" in out
    assert "--allow-data-change: training goes on with this data, normalized with the checkpoint's statistics" in out
    with open(os.path.join(tmp, "run", "iter_0000004", "data_fingerprint.json")) as f:
        assert json.load(f)["sources"]["data"]["images"] == 8  # the new data, recorded from now on


def test_a_checkpoint_without_a_fingerprint_resumes_with_one_line(runs):
    """The pre-flight alone (a pure file-system check): a checkpoint saved before fingerprints were
    recorded (the file removed, the manifest rewritten to match) resumes, saying it cannot check."""
    from dchag.arguments import parse_args
    from dchag.checkpointing import manifest
    from dchag.training import preflight
    tmp, _ = runs
    old = os.path.join(tmp, "old")
    shutil.copytree(os.path.join(tmp, "before"), old)
    os.remove(os.path.join(old, "iter_0000002", "data_fingerprint.json"))
    manifest.write_manifest(os.path.join(old, "iter_0000002"))
    found = preflight.run(parse_args(_argv(os.path.join(tmp, "square.npy"), old, 4)), world=2, late_checks=[])
    assert found.load_tag == "iter_0000002"
    assert f"{old}/iter_0000002 records no data fingerprint (it was saved before dchag recorded one), so whether the " \
           "data changed since cannot be checked." in found.notes, found.notes
