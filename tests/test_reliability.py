"""Checkpoints under the faults a cluster produces, each provoked for real (docs/RELIABILITY.md).

* A rank killed between its files and ``latest`` (after ``dchag_args.json``, before the
  manifest): the auto-resume command (``--load D --save D``) resumes from the last complete
  checkpoint, exactly, and sets the interrupted folder aside by name.
* Two jobs on one ``--save`` folder: the second is refused naming the first (host, PID); a lock
  left by a dead process is taken over with a message.
* A write over the file-size limit (``ulimit -f``): the error names the cause, the path and the
  last complete checkpoint; nothing that looks complete is left.
* A pickle payload planted in a checkpoint (manifest rewritten to match): refused, never run, by
  ``--load`` and by the converter; an export whose config claims hidden size 10^7: refused before
  anything is allocated.
* Damaged ``latest`` / ``dchag_args.json``, a missing ``--load`` folder, data with no valid
  value, batches with nothing to learn, a second SIGINT during the handled stop, ``--load FINISHED
  --save NEW`` writing its picture.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from tests.distributed import free_port, run_distributed
from tests.test_signals import _read, _wait_for
from tests.test_training import DROPOUT, MAE, REPO, _ds, _refused

ITERS = 4
BASE = _ds("zero1_fp32.json") + MAE + DROPOUT + ["--channel-parallel-size", "2", "--train-iters", str(ITERS),
                                                 "--save-interval", "2"]
MARKER = "payload_ran"


class _Payload:
    """What an attacker plants: unpickling it creates the file MARKER (any code could run)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def plant_payload(folder, marker):
    """Add the payload to the model states of rank 0 and rewrite the manifest to match (the
    manifest lives beside the files, so whoever can change one can change the other)."""
    from dchag.checkpointing import manifest
    path = os.path.join(folder, "mp_rank_00_model_states.pt")
    state = torch.load(path, map_location="cpu", weights_only=False)  # our own file, in the test
    state["extra"] = _Payload(marker)
    torch.save(state, path)
    manifest.write_manifest(folder)


# ----------------------------------------------------------------------------------------------
# worker side: 2 gloo ranks (tests/distributed.py)


def _train(argv, picture=False):
    import pretrain_dchag
    from dchag.training import pretrain, release
    history = pretrain(pretrain_dchag.model_provider, pretrain_dchag.forward_step, pretrain_dchag.datasets_provider,
                       argv, non_loss_data_func=pretrain_dchag.task_picture if picture else None)
    out = {"losses": history["losses"]}
    release(history)
    return out


def _error(argv):
    import torch.distributed as dist
    kind, msg, _ = _refused(argv)
    dist.barrier()
    return kind, msg


def _npy(path, valid_images):
    """6 images of 13 channels, 8 x 8, NaN everywhere but in ``valid_images``."""
    x = np.full((6, 13, 8, 8), np.nan, np.float32)
    for i in valid_images:
        x[i] = np.random.default_rng(i).normal(size=(13, 8, 8))
    np.save(path, x)


def _crash_after_args(folder):
    """Rank 1 dies after every rank's files and dchag_args.json of iteration 4 are written, before
    the manifest (and so before latest): the window the issue found."""
    import torch.distributed as dist
    from dchag.checkpointing import manifest
    original = manifest.write_manifest_distributed

    def write_manifest_distributed(path):
        if path.endswith("iter_0000004") and dist.get_rank() == 1:
            assert os.path.exists(os.path.join(path, "dchag_args.json"))
            os._exit(17)  # the process dies on the spot
        return original(path)

    manifest.write_manifest_distributed = write_manifest_distributed
    _train(BASE + ["--save", folder])


def _after_crash_job(tmp):
    """The auto-resume command on the crashed run, then the uninterrupted run it must equal, then
    the refusals and a finished run, in the same two processes."""
    import torch.distributed as dist
    p = lambda name: os.path.join(tmp, name)  # noqa: E731
    out = io.StringIO()
    with contextlib.redirect_stdout(out):  # what rank 0 says about the interrupted save
        r = {"resumed": _train(BASE + ["--load", p("run"), "--save", p("run")])["losses"]}
    r["resume_out"] = out.getvalue()
    r["full"] = _train(BASE + ["--save", p("ref")])["losses"]
    # A finished run loaded into a new --save folder: nothing to train, the picture goes there.
    r["finished"] = _train(BASE + ["--load", p("ref"), "--save", p("new")], picture=True)["losses"]
    # A pickle payload planted in a copy of the checkpoint: --load refuses it on every rank.
    if dist.get_rank() == 0:
        shutil.copytree(p("ref"), p("planted"))
        plant_payload(p(f"planted/iter_{ITERS:07d}"), p(MARKER))
    dist.barrier()
    r["err_planted"] = _error(BASE + ["--load", p("planted")])
    # Data with no valid value at all; data whose valid values sit in one image of six.
    if dist.get_rank() == 0:
        _npy(p("nan.npy"), [])
        _npy(p("sparse.npy"), [3])
    dist.barrier()
    data = lambda f: [a if a != MAE[MAE.index("--data-path") + 1] else p(f) for a in BASE] + [  # noqa: E731
        "--valid-fraction", "0", "--micro-batch-size", "1", "--train-iters", "6"]
    r["err_nan_data"] = _error(data("nan.npy"))
    r["err_sparse"] = _error(data("sparse.npy") + ["--max-consecutive-nan-iters", "2"])
    r["err_missing_load"] = _error(BASE + ["--load", p("no-such-run")])
    return r


@pytest.fixture(scope="module")
def crashed(tmp_path_factory):
    """A run whose rank 1 died in the window of its iteration-4 save, and what came after."""
    tmp = str(tmp_path_factory.mktemp("reliability"))
    with pytest.raises(Exception, match="exit code 17"):
        run_distributed(_crash_after_args, 2, os.path.join(tmp, "run"))
    state = {"latest": _read(os.path.join(tmp, "run", "latest")),
             "args_written": os.path.exists(os.path.join(tmp, "run", "iter_0000004", "dchag_args.json")),
             "manifest_written": os.path.exists(os.path.join(tmp, "run", "iter_0000004", "manifest.json"))}
    return tmp, state, run_distributed(_after_crash_job, 2, tmp)


# ----------------------------------------------------------------------------------------------
# a crash in the window of a save


def test_crash_between_files_and_latest_resumes_exactly(crashed):
    tmp, state, ranks = crashed
    assert state == {"latest": "iter_0000002", "args_written": True, "manifest_written": False}
    folder = os.path.join(tmp, "run")
    for r in ranks:
        resumed, full = r["resumed"], r["full"]
        assert sorted(resumed) == [3, 4] and all(resumed[i] == full[i] for i in resumed), (resumed, full)
    assert os.path.isdir(f"{folder}/iter_0000004.interrupted"), "set aside, not deleted"
    said = ranks[0]["resume_out"]
    assert f"> moved {folder}/iter_0000004 aside to {folder}/iter_0000004.interrupted: an interrupted save" in said, \
        said[-3000:]
    assert _read(os.path.join(folder, "latest")) == "iter_0000004"
    assert os.path.exists(os.path.join(folder, "iter_0000004", "manifest.json"))


def test_completeness_is_judged_by_the_manifest_everywhere(tmp_path, capsys):
    """Pure file-system checks (no process group): a folder without its manifest is an interrupted
    save for resume, the overwrite check, recovery and the converter; a complete folder newer than
    ``latest`` (a crash after the manifest, before latest) is what resume continues from."""
    from dchag.checkpointing import compat, reader, recovery
    from dchag.checkpointing.errors import CheckpointError
    run = _fake_run(tmp_path, complete=(2, 4), interrupted=(6,), latest=2)
    args = argparse.Namespace(load=run, save=run, ckpt_step=None, no_load_optim=False)
    assert compat.load_tag(args) == "iter_0000004"  # newer than latest, and complete
    assert "the newest complete checkpoint is iter_0000004" in capsys.readouterr().out
    with pytest.raises(CheckpointError, match="iter_0000006 is an interrupted save"):
        compat.load_tag(argparse.Namespace(**{**vars(args), "ckpt_step": 6}))
    assert recovery.last_good(run, 100) == 4
    assert reader.resolve_folder(run).endswith("iter_0000004")
    with pytest.raises(CheckpointError, match="interrupted save"):
        reader.resolve_folder(os.path.join(run, "iter_0000006"))
    compat.check_save_dir(args, 4)
    assert os.path.isdir(os.path.join(run, "iter_0000006.interrupted"))
    assert not os.path.exists(os.path.join(run, "iter_0000006"))


def _fake_run(tmp_path, complete, interrupted, latest):
    """A run folder of tiny checkpoints: model states (a real torch zip), dchag_args.json, and for
    the complete ones the manifest."""
    from dchag.checkpointing import manifest
    run = str(tmp_path / "fake")
    for it in tuple(complete) + tuple(interrupted):
        folder = os.path.join(run, f"iter_{it:07d}")
        os.makedirs(folder)
        torch.save({"module": {"w": torch.zeros(2)}, "args": {}}, os.path.join(folder, "mp_rank_00_model_states.pt"))
        with open(os.path.join(folder, "dchag_args.json"), "w") as f:
            json.dump({"tensor_model_parallel_size": 1}, f)
        if it in complete:
            manifest.write_manifest(folder)
    with open(os.path.join(run, "latest"), "w") as f:
        f.write(f"iter_{latest:07d}")
    return run


# ----------------------------------------------------------------------------------------------
# latest, dchag_args.json, --load


@pytest.mark.parametrize("content, expected", [
    (b"\x7fELF\x02\x01\x01\x00\xff\xfe", "holds 10 bytes of binary data (starting 7f 45 4c 46"),
    (b"", "is empty (0 bytes)"),
    (b"global_step10\n", "holds 'global_step10', not a checkpoint tag of pretrain_dchag.py"),
    (b"../other/iter_0000020", "names '../other/iter_0000020', a folder outside"),
])
def test_damaged_latest_is_refused_with_its_content(tmp_path, content, expected):
    from dchag.checkpointing import compat
    from dchag.checkpointing.errors import CheckpointError
    run = _fake_run(tmp_path, complete=(2,), interrupted=(), latest=2)
    os.makedirs(tmp_path / "other" / "iter_0000020")
    with open(os.path.join(run, "latest"), "wb") as f:
        f.write(content)
    with pytest.raises(CheckpointError) as e:
        compat.load_tag(argparse.Namespace(load=run, save=None, ckpt_step=None))
    assert f"{run}/latest {expected}" in str(e.value) and "--ckpt-step 2" in str(e.value), str(e.value)
    # a fine-tune (and the converter) takes a checkpoint folder, not --ckpt-step: the hint says so
    from dchag.transfer.errors import FinetuneError
    from dchag.transfer.pretrained import open_pretrained
    with pytest.raises(FinetuneError) as e:
        open_pretrained(run)
    assert f"{run}/latest {expected}" in str(e.value) and "--ckpt-step" not in str(e.value) and \
        f"name one of them instead of the run folder (e.g. {run}/iter_0000002)" in str(e.value), str(e.value)


def test_a_checkpoint_or_latest_linked_out_of_its_folder_is_refused(tmp_path):
    """An iter_* that is a symbolic link to another run's checkpoint (newer than latest: "a save
    stopped before updating latest") is refused on resume, --ckpt-step, conversion and fine-tune;
    so is a latest linked out of the folder; a latest that is a folder says so."""
    from dchag.checkpointing import compat, convert, reader
    from dchag.checkpointing.errors import CheckpointError
    from dchag.transfer.errors import FinetuneError
    from dchag.transfer.pretrained import open_pretrained
    run = _fake_run(tmp_path, complete=(2,), interrupted=(), latest=2)
    other = str(tmp_path / "other")
    shutil.copytree(os.path.join(run, "iter_0000002"), os.path.join(other, "iter_0000006"))
    link = os.path.join(run, "iter_0000006")
    os.symlink(os.path.join(other, "iter_0000006"), link)
    args = argparse.Namespace(load=run, save=run, ckpt_step=None, no_load_optim=False)
    refusal = f"{link} is a symbolic link to {other}/iter_0000006, outside {run}"
    for load in (lambda: compat.check_compatible(args), lambda: compat.load_tag(argparse.Namespace(**{**vars(args),
                                                                                                   "ckpt_step": 6})),
                 lambda: reader.resolve_folder(run), lambda: reader.resolve_folder(link),
                 lambda: convert.export_consolidated(run, str(tmp_path / "out"))):
        with pytest.raises(CheckpointError, match=re.escape(refusal)):
            load()
    with pytest.raises(FinetuneError, match=re.escape(refusal)):
        open_pretrained(run)
    os.remove(link)
    os.symlink(os.path.join(run, "iter_0000002"), link)  # a link to another checkpoint of the same run
    with pytest.raises(CheckpointError, match="iter_0000006 is a symbolic link to another checkpoint of the same"):
        compat.load_tag(args)
    os.remove(link)
    assert compat.load_tag(args) == "iter_0000002"
    latest = os.path.join(run, "latest")
    with open(os.path.join(other, "latest"), "w") as f:
        f.write("iter_0000002")
    os.remove(latest)
    os.symlink(os.path.join(other, "latest"), latest)
    with pytest.raises(CheckpointError, match=re.escape(f"{latest} is a symbolic link to {other}/latest, outside")):
        compat.load_tag(args)
    os.remove(latest)
    os.symlink(os.path.join(run, "iter_0000002"), latest)  # latest linked to a folder (not only "Is a directory")
    with pytest.raises(CheckpointError, match=re.escape(f"{latest} is a folder (a symbolic link to {run}/iter_0000002"
                                                        "), not the one-line file naming a checkpoint")) as e:
        compat.load_tag(args)
    assert "--ckpt-step 2" in str(e.value)


def test_damaged_args_file_is_named_with_the_ckpt_step_hint(tmp_path):
    from dchag.checkpointing import compat
    from dchag.checkpointing.errors import CheckpointError
    run = _fake_run(tmp_path, complete=(2, 4), interrupted=(), latest=4)
    path = os.path.join(run, "iter_0000004", "dchag_args.json")
    with open(path, "w") as f:
        f.write('{"tensor_model_par')  # cut short
    with pytest.raises(CheckpointError) as e:
        compat.check_compatible(argparse.Namespace(load=run, save=None, ckpt_step=None, no_load_optim=False))
    assert f"{path} is damaged" in str(e.value) and "--ckpt-step 2 added" in str(e.value), str(e.value)


def test_missing_load_folder_says_so(crashed):
    tmp, _, ranks = crashed
    for r in ranks:
        kind, msg = r["err_missing_load"]
        assert kind == "CheckpointError" and f"--load {tmp}/no-such-run: folder does not exist" in msg, msg


# ----------------------------------------------------------------------------------------------
# non-finite runs; the picture of a finished run


def test_data_without_any_valid_value_is_refused(crashed):
    tmp, _, ranks = crashed
    for r in ranks:
        kind, msg = r["err_nan_data"]
        assert kind == "DataError" and f"{tmp}/nan.npy has no valid value at all" in msg, msg


def test_batches_with_nothing_to_learn_count_toward_the_limit(crashed):
    _, _, ranks = crashed
    for r in ranks:
        kind, msg = r["err_sparse"]
        assert kind == "NonFiniteError" and "consecutive iterations (up to" in msg, msg
        assert "had no valid input value" in msg and "no checkpoint was saved before it" in msg, msg


def test_finished_run_loaded_into_a_new_folder_writes_its_picture(crashed):
    tmp, _, ranks = crashed
    assert ranks[0]["finished"] == {}, "nothing left to train"
    assert os.path.isfile(os.path.join(tmp, "new", f"reconstruction_iter_{ITERS:07d}.png"))


# ----------------------------------------------------------------------------------------------
# untrusted checkpoints


def test_planted_pickle_is_refused_and_never_run(crashed, tmp_path):
    from dchag.checkpointing import compat, convert, pickles, reader, weights_only
    tmp, _, ranks = crashed
    planted = os.path.join(tmp, "planted", f"iter_{ITERS:07d}")
    for r in ranks:  # --load: every rank refuses before DeepSpeed loads anything
        kind, msg = r["err_planted"]
        assert kind == "UnsafeCheckpointError" and "mp_rank_00_model_states.pt" in msg, msg
        assert "asks for" in msg and "trust" in msg, msg
    # the converter and every other load dchag makes itself
    marker = os.path.join(tmp, MARKER)
    bare = str(tmp_path / "bare")  # model states alone: no dchag_args.json, no optimizer files
    os.makedirs(bare)
    shutil.copy(os.path.join(planted, "mp_rank_00_model_states.pt"), bare)
    for load in (lambda: convert.export_consolidated(planted, str(tmp_path / "out")),
                 lambda: reader.client_state(planted), lambda: weights_only.has_optimizer_state(bare),
                 lambda: compat.saved_args(bare), lambda: pickles.vet(planted)):
        with pytest.raises(pickles.UnsafeCheckpointError, match="asks for"):
            load()
    assert not os.path.exists(marker), "the payload ran"
    assert not os.path.exists(tmp_path / "out")


class _System:
    """A payload whose unpickling runs a shell command (``os.system``: pickled as posix.system)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _error_of(load) -> str:
    try:
        load()
    except Exception as e:  # noqa: BLE001 - every reader's own refusal
        return f"{type(e).__name__}: {e}"
    return "loaded"


def test_no_planted_pickle_runs_in_any_file_a_tool_reads(tmp_path):
    """A posix.system payload in every file the tools read that could hold a pickle: each
    checkpoint file (model and optimizer states: resume, --no-load-optim, the converter, fine-tune),
    a study's pictures (tools/parity.py --merge: the old pictures.pt and an object array in
    pictures.npz), data, statistics and target files. Nothing runs; a pickle's refusal names the global."""
    from dchag.checkpointing import compat, convert, manifest, pickles, reader, weights_only
    from dchag.data.readers.open import open_source
    from dchag.data.stats import load_stats
    from dchag.data.targets import open_targets
    from dchag.parity.merge import merge_studies
    from dchag.parity.report import write_report
    from dchag.transfer.pretrained import open_pretrained
    from tests.test_parity import _fake_study
    marker = str(tmp_path / "payload_ran")
    payload = _System(marker)
    errors = {}
    # checkpoints: each .pt file planted in turn, the manifest rewritten to match
    run = _fake_run(tmp_path, complete=(2,), interrupted=(), latest=2)
    folder = os.path.join(run, "iter_0000002")
    optim = os.path.join(folder, "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    model = os.path.join(folder, "mp_rank_00_model_states.pt")
    torch.save({"optimizer_state_dict": {}}, optim)
    for planted in (model, optim):
        clean = open(planted, "rb").read()
        state = torch.load(planted, weights_only=False)  # our own file, in the test
        torch.save({**state, "extra": payload}, planted)
        manifest.write_manifest(folder)
        for name, load in (("vet", lambda: pickles.vet(folder)), ("saved_args", lambda: compat.saved_args(folder)),
                           ("client_state", lambda: reader.client_state(folder)),
                           ("zero_to_fp32", lambda: reader._fp32_weights_of_rank(folder, 0)),
                           ("no_load_optim", lambda: weights_only.has_optimizer_state(folder)),
                           ("finetune", lambda: open_pretrained(folder)),
                           ("convert", lambda: convert.export_consolidated(folder, str(tmp_path / "out")))):
            errors[f"{os.path.basename(planted)} {name}"] = _error_of(load)
        with open(planted, "wb") as f:
            f.write(clean)
    # a study's pictures: the old torch pickle, and an object array (pickled) in the npz
    parts = []
    for i, kind in enumerate(("pictures.pt", "pictures.npz")):
        part = str(tmp_path / f"study{i}")
        write_report(_fake_study({"flat": [1.0], "linear": [1.1]}, [i + 1]), part)
        os.remove(os.path.join(part, "pictures.npz"))
        if kind == "pictures.pt":
            torch.save({"flat": {"target": np.zeros(2), "extra": payload}}, os.path.join(part, kind))
        else:
            np.savez(os.path.join(part, kind), __tree__=np.frombuffer(b"{}", np.uint8),
                     a0=np.array([payload], dtype=object))
        errors[f"{kind} merge"] = _error_of(lambda: merge_studies([part, part]))
        parts.append(part)
    proc = subprocess.run([sys.executable, "tools/parity.py", "--merge", *parts, "--output-dir", str(tmp_path / "m")],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "DS_ACCELERATOR": "cpu"})
    errors["tools/parity.py --merge"] = f"exit {proc.returncode}: {proc.stderr[-600:]}"
    # data, statistics and targets: object arrays (pickled) where numbers belong
    images = np.empty((2, 3, 4, 4), dtype=object)
    images[0, 0, 0, 0] = payload
    np.save(tmp_path / "data.npy", images, allow_pickle=True)
    np.savez(tmp_path / "stats.npz", mean=images, std=np.ones(3))
    np.save(tmp_path / "clean.npy", np.zeros((2, 3, 4, 4), np.float32))
    errors["data"] = _error_of(lambda: open_source(str(tmp_path / "data.npy")))
    errors["stats"] = _error_of(lambda: load_stats(str(tmp_path / "stats.npz")))
    errors["targets"] = _error_of(lambda: open_targets(str(tmp_path / "data.npy"),
                                                       open_source(str(tmp_path / "clean.npy")), kind="regress"))
    assert not os.path.exists(marker), f"a payload ran: {errors}"
    refused = {f"mp_rank_00_model_states.pt {n}" for n in ("vet", "client_state", "zero_to_fp32", "finetune",
                                                            "convert")} | \
        {f"zero_pp_rank_0_mp_rank_00_optim_states.pt {n}" for n in ("vet", "zero_to_fp32")} | \
        {"pictures.pt merge", "tools/parity.py --merge"}
    for k in refused:  # the others never opened the planted file (e.g. saved_args reads dchag_args.json)
        assert "asks for posix.system" in errors[k], (k, errors[k])
    assert "exit 1" in errors["tools/parity.py --merge"], errors
    for k in ("pictures.npz merge", "data", "stats", "targets"):
        assert "Object arrays cannot be loaded" in errors[k] or "Python objects" in errors[k], (k, errors[k])
    # a study folder from before pictures.npz: its plain pictures.pt still merges (restricted load)
    target = np.arange(6, dtype=np.float32).reshape(2, 3)
    torch.save({"flat": {"target": target, "mask": target > 2, "index": 3}}, os.path.join(parts[0], "pictures.pt"))
    os.remove(os.path.join(parts[1], "pictures.npz"))
    merged = merge_studies(parts)
    np.testing.assert_array_equal(merged["pictures"]["flat"]["target"], target)
    assert merged["pictures"]["flat"]["mask"].dtype == np.bool_


EXPORTS = r"""
import contextlib, io, json, os, shutil, sys, time
import torch
from safetensors.torch import load_file, save_file
from dchag.checkpointing import consolidated, convert, manifest, shards
from dchag.checkpointing.errors import CheckpointError
from dchag.inference.runtime import build_serial_model
from dchag.model.config import DChagConfig
import dchag
out = sys.argv[1]
cfg = DChagConfig(num_channels=5, img_h=8, img_w=8, patch_dim=2, hidden_size=16, num_layers=1,
                  num_attention_heads=2, ffn_hidden_size=32, aggregation="linear", groups=2)
model = build_serial_model(cfg)
consolidated.write(out, dict(model.named_parameters()), {"model": consolidated.config_to_dict(cfg),
                   "parameters": shards.param_specs(model), "iteration": 4, "consumed_samples": 8})
print("modes", sorted(oct(os.stat(os.path.join(out, f)).st_mode & 0o777) for f in os.listdir(out)))

def attempt(name, load):
    err = io.StringIO()
    t0 = time.time()
    try:
        with contextlib.redirect_stderr(err):
            load()
        print(name, "loaded", "| stderr:", err.getvalue().replace(chr(10), " "))
    except CheckpointError as e:
        print(name, "refused in %.2f s:" % (time.time() - t0), e)

# tampered exports, with and without their manifest
first = sorted(dict(model.named_parameters()))[0]
def variant(name, edit, keep_manifest):
    dst = f"{out}_{name}"
    shutil.copytree(out, dst)
    tensors = load_file(os.path.join(dst, consolidated.WEIGHTS))
    edit(tensors)
    save_file(tensors, os.path.join(dst, consolidated.WEIGHTS))
    if keep_manifest:
        manifest.write_manifest(dst)  # a consistent tamper
    else:
        os.remove(os.path.join(dst, manifest.MANIFEST))
    return dst
def nan(t):
    t[first].view(-1)[0] = float("nan")
def boolean(t):
    t[first] = t[first] != 0
def half(t):
    t[first] = t[first].half()
for name, edit, keep in (("nan", nan, False), ("bool", boolean, False), ("f16", half, True), ("nan_m", nan, True),
                         ("bare", lambda t: None, False)):
    path = variant(name, edit, keep)
    attempt(f"pretrained_{name}", lambda: dchag.load_pretrained(path, device="cpu"))
attempt("deepspeed_bare", lambda: convert.to_deepspeed(out + "_bare", out + "_bare_ds", 1, 1))
attempt("deepspeed_bare_accepted", lambda: convert.to_deepspeed(out + "_bare", out + "_bare_ds", 1, 1, True))
print("verify_nan_m", json.dumps(convert.verify(out + "_nan_m")))

# a config claiming hidden size 10^7 (the manifest rewritten to match)
with open(os.path.join(out, "config.json")) as f:
    config = json.load(f)
config["model"]["hidden_size"] = 10 ** 7
with open(os.path.join(out, "config.json"), "w") as f:
    json.dump(config, f)
manifest.write_manifest(out)  # a consistent tamper
import resource
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:  # an export over the file-size limit
    consolidated.write(out + "_small", dict(model.named_parameters()), {"model": consolidated.config_to_dict(cfg)})
    print("write", "done")
except CheckpointError as e:
    print("write", "refused:", e)
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
attempt("load_pretrained", lambda: dchag.load_pretrained(out, device="cpu"))
attempt("to_deepspeed", lambda: convert.to_deepspeed(out, out + "_ds", 1, 1))
"""


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """One process writes a small export, tampers with copies of it and loads them (what it says)."""
    tmp = tmp_path_factory.mktemp("exports")
    proc = subprocess.run([sys.executable, "-c", EXPORTS, str(tmp / "export")], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(proc.stdout)  # the refusal times, for the log
    return tmp, {ln.split(" ", 1)[0]: ln for ln in proc.stdout.splitlines()}


def test_export_config_claiming_a_huge_model_is_refused_fast(exports):
    """Also: exports are written 0644, and an export over the file-size limit names the cause and
    leaves nothing."""
    tmp, said = exports
    assert said["modes"] == "modes ['0o644', '0o644', '0o644']", said
    for name in ("load_pretrained", "to_deepspeed"):
        line = said[name]
        assert "refused in" in line and "hidden size 10000000" in line and "nothing was allocated" in line, line
    assert not os.path.exists(tmp / "export_ds")
    assert f"write refused: cannot write {tmp}/export_small: file too large: over this process's file-size " \
           "limit of 4 KB (ulimit -f 4); nothing was written" in said["write"], said["write"]
    assert not os.path.exists(tmp / "export_small") and not any(n.startswith(".tmp-export_small")
                                                                 for n in os.listdir(tmp))


def test_an_export_is_verified_with_or_without_its_manifest(exports):
    """NaN weights or tensors stored as BOOL / F16 where config.json says float32 are refused by
    load_pretrained naming the tensor, manifest or not; an export without its manifest loads with a
    warning naming the --verify command, and --format deepspeed refuses it unless told to accept it."""
    tmp, said = exports
    first = "refused in"
    for name, why in (("nan", "hold NaN or infinite values: "), ("bool", "are not float32 (F32) as config.json says:"),
                      ("f16", "are not float32 (F32) as config.json says:"), ("nan_m", "hold NaN or infinite values: ")):
        line = said[f"pretrained_{name}"]
        assert first in line and f"export {tmp}/export_{name} is damaged: 1 tensor(s) of " in line and why in line, line
        assert ("It has no manifest.json" in line) == (not name.endswith("_m") and name != "f16"), line
    assert "(BOOL)" in said["pretrained_bool"] and "(F16)" in said["pretrained_f16"]
    assert "(1 of " in said["pretrained_nan"]
    bare = said["pretrained_bare"]
    assert bare.startswith("pretrained_bare loaded") and f"warning: {tmp}/export_bare has no manifest.json" in bare \
        and f"python tools/convert_checkpoint.py --load-dir {tmp}/export_bare --verify" in bare, bare
    assert "refused in" in said["deepspeed_bare"] and "--accept-export-without-manifest" in said["deepspeed_bare"]
    assert said["deepspeed_bare_accepted"].startswith("deepspeed_bare_accepted loaded")
    problems = json.loads(said["verify_nan_m"].split(" ", 1)[1])[0][1]
    assert len(problems) == 1 and "hold NaN or infinite values" in problems[0], problems


# ----------------------------------------------------------------------------------------------
# processes: two jobs on one folder, a file-size limit, a second SIGINT

ONE = _ds("zero1_fp32.json") + [a if a != "2" or MAE[i - 1] != "--tensor-model-parallel-size" else "1"
                                for i, a in enumerate(MAE)] + ["--lr-decay-iters", "12", "--log-interval", "1"]


def _job(argv, logs, name, ulimit_kb=None, prefix=()):
    """One single-rank job as a scheduler starts it; returns (process, (stdout, stderr) paths).
    ``prefix``: a command that starts it elsewhere (a new PID namespace)."""
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = list(prefix) + [sys.executable, os.path.join(REPO, "pretrain_dchag.py")] + argv
    if ulimit_kb is not None:  # the limit applies to this process only
        cmd = ["bash", "-c", f'ulimit -f {ulimit_kb} && exec "$@"', "job"] + cmd
    os.makedirs(logs, exist_ok=True)
    out, err = os.path.join(logs, f"{name}.out"), os.path.join(logs, f"{name}.err")
    with open(out, "w") as fo, open(err, "w") as fe:
        proc = subprocess.Popen(cmd, stdout=fo, stderr=fe, cwd=logs, env=env)
    return proc, (out, err)


def test_two_jobs_on_one_folder_and_a_write_over_the_size_limit(tmp_path):
    """The second job starts in another PID namespace (as from a container) where this machine
    allows one: it is refused, the first job's lock stays, and the first goes on to its own end."""
    from dchag.checkpointing import lock
    run, logs = str(tmp_path / "run"), str(tmp_path / "logs")
    ns = new_pid_namespace()
    first, first_logs = _job(ONE + ["--train-iters", "100000", "--save", run, "--exit-signal-handler"], logs, "first")
    try:
        _wait_for([first_logs], "iteration        1/", [first])
        token = lock._read(os.path.join(run, "dchag.lock"))["token"]
        second, second_logs = _job(ONE + ["--train-iters", "4", "--save", run], logs, "second", prefix=ns)
        assert second.wait(timeout=300) == 1, _read(second_logs[1])[-3000:]
        err = _read(second_logs[1])
        pid = f"PID {first.pid} in another PID namespace" if ns else f"PID {first.pid},"
        assert f"--save {run} is in use by another job (host " in err and pid in err, err[-3000:]
        assert lock._read(os.path.join(run, "dchag.lock"))["token"] == token, "the refused job left the lock alone"
        seen = int(re.findall(r"iteration\s+(\d+)/", _read(first_logs[0]))[-1])
        _wait_for([first_logs], f"iteration {seen + 2:8d}/", [first])  # the first goes on
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=300) == 0, _read(first_logs[1])[-3000:]
    finally:
        for p in (first,):
            if p.poll() is None:
                p.kill()
    assert not os.path.exists(os.path.join(run, "dchag.lock")), "released at the end of the run"
    last = _read(os.path.join(run, "latest"))
    # A lock left by a process killed with -9 is taken over; the resumed job's first save is over its
    # file-size limit.
    holder, _ = _holder(run)
    holder.kill()
    holder.wait()
    third, third_logs = _job(ONE + ["--train-iters", "100000", "--save-interval", "1", "--load", run, "--save", run],
                             logs, "third", ulimit_kb=64)
    try:
        code = third.wait(timeout=300)
    finally:
        if third.poll() is None:
            third.kill()
    out, err = _read(third_logs[0]), _read(third_logs[1])
    assert code == 1, err[-3000:]
    assert f"> took over the lock of --save {run} from host" in out and f"PID {holder.pid}," in out and \
        "no process holds its lock any more" in out, out[-3000:]
    it = int(last[len("iter_"):]) + 1
    failed = f"{run}/iter_{it:07d}"
    assert f"error: cannot save checkpoint {failed}: writing {failed}/mp_rank_00_model_states.pt failed on rank 0: " \
           "file too large: over this process's file-size limit of 64 KB (ulimit -f 64)" in err, err[-3000:]
    assert f"the last complete checkpoint is {run}/{last}" in err, err[-3000:]
    assert not os.path.exists(failed), "the partial checkpoint is removed"
    assert _read(os.path.join(run, "latest")) == last and not os.path.exists(os.path.join(run, "dchag.lock"))


READ_ONLY_MID_RUN = r"""
# In a private mount namespace: $1 becomes a tmpfs, the job (the rest of the arguments) writes
# its --save folder there, and the file system turns read-only once its first checkpoint is complete.
mount -t tmpfs tmpfs "$1" || exit 99
folder=$1; shift
"$@" > "$folder.out" 2> "$folder.err" &
job=$!
until [ -e "$folder/latest" ]; do kill -0 $job 2>/dev/null || break; sleep 0.05; done
mount -o remount,ro "$folder" || echo "remount failed" >> "$folder.err"
wait $job
"""


def test_a_save_folder_turned_read_only_mid_run_is_one_message(tmp_path):
    """The --save folder's file system turns read-only mid-run (a tmpfs remounted ro in a private
    mount namespace; else the folder made immutable with chattr +i): the next save fails with one
    line naming the cause, not DeepSpeed's raw OSError from its zero_to_fp32.py copy (outside the
    checkpoint engine) nor a second error from releasing the lock."""
    run = str(tmp_path / "run")
    os.makedirs(run)
    argv = ONE + ["--train-iters", "8", "--save-interval", "4", "--save", run]
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    job = [sys.executable, os.path.join(REPO, "pretrain_dchag.py")] + argv
    mount = ["unshare", "--mount", "--map-root-user"]
    if subprocess.run(mount + ["true"], capture_output=True).returncode == 0:
        proc = subprocess.run(mount + ["bash", "-c", READ_ONLY_MID_RUN, "ro", run] + job, cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=600)
        code, err, cause = proc.returncode, _read(run + ".err"), "read-only file system"
    elif subprocess.run(["chattr", "+i", run], capture_output=True).returncode == 0:
        subprocess.run(["chattr", "-i", run], check=True)
        with open(run + ".out", "w") as fo, open(run + ".err", "w") as fe:
            proc = subprocess.Popen(job, cwd=REPO, env=env, stdout=fo, stderr=fe)
        try:
            while not os.path.exists(os.path.join(run, "latest")):
                assert proc.poll() is None, _read(run + ".err")[-3000:]
                time.sleep(0.05)
            subprocess.run(["chattr", "+i", run], check=True)
            code = proc.wait(timeout=600)
        finally:
            subprocess.run(["chattr", "-i", run])
            if proc.poll() is None:
                proc.kill()
        err, cause = _read(run + ".err"), "operation not permitted"
    else:
        pytest.skip("this machine lets the test make no folder unwritable to itself (no mount namespace, no chattr)")
    assert code == 1, err[-3000:]
    errors = [ln for ln in err.splitlines() if "error" in ln.lower() and "warn" not in ln.lower()]
    assert "Traceback" not in err and len(errors) == 1, err[-3000:]
    assert errors[0].startswith(f"error: cannot save checkpoint {run}/iter_0000008: writing {run}/") and \
        f"failed on rank 0: {cause}" in errors[0] and f"the last complete checkpoint is {run}/iter_0000004" in \
        errors[0], errors[0]


def test_second_sigint_during_the_handled_stop_is_not_a_traceback(capfd):
    """Real signals to this process: the first Ctrl-C is the handled stop; the second arrives
    after the run restored its handlers, during shutdown, and must not raise KeyboardInterrupt."""
    from dchag.training.signals import ExitRequest
    original = signal.getsignal(signal.SIGINT)
    try:
        request = ExitRequest(argparse.Namespace(exit_signal_handler=True, exit_signal="SIGINT",
                                                 exit_duration_in_mins=None), 0.0).install()
        os.kill(os.getpid(), signal.SIGINT)  # the first Ctrl-C: the loop saves and returns
        assert request.received
        request.restore()  # the run is over; shutdown() follows
        os.kill(os.getpid(), signal.SIGINT)  # the second Ctrl-C, during shutdown: no KeyboardInterrupt
    finally:
        signal.signal(signal.SIGINT, original)
    assert "received SIGINT again while stopping: the stop goes on" in capfd.readouterr().err


# ----------------------------------------------------------------------------------------------
# the lock: real holders, in this PID namespace and in another one

HOLD = r"""
import os, sys, time
from dchag.checkpointing import lock
held = lock.acquire(sys.argv[1])
print("held", os.getpid(), flush=True)
time.sleep(300)
"""
TRY = r"""
import sys
import time
from dchag.checkpointing import lock
from dchag.checkpointing.errors import CheckpointError
try:
    lock.acquire(sys.argv[1]).release()
    print("acquired")
except CheckpointError as e:
    print("refused:", e)
"""


def new_pid_namespace() -> list[str]:
    """The command prefix that starts a process in a new PID namespace, as a container does
    (``unshare --pid --fork``, in a new user namespace unless we are root), or [] where this
    machine allows none (the foreign namespace is then emulated: see the lock test)."""
    for prefix in (["unshare", "--pid", "--fork", "--kill-child"],
                   ["unshare", "--pid", "--fork", "--kill-child", "--map-root-user"]):
        try:
            if subprocess.run(prefix + ["true"], capture_output=True, timeout=30).returncode == 0:
                return prefix
        except (OSError, subprocess.TimeoutExpired):
            pass
    return []


def _holder(save, prefix=()):
    proc = subprocess.Popen(list(prefix) + [sys.executable, "-c", HOLD, save], stdout=subprocess.PIPE, text=True,
                            cwd=REPO)
    line = proc.stdout.readline()
    assert line.startswith("held"), line
    return proc, int(line.split()[1])  # the PID as the holder sees it (1 in a new namespace)


def _try(save, prefix=()):
    return subprocess.run(list(prefix) + [sys.executable, "-c", TRY, save], capture_output=True, text=True,
                          cwd=REPO, timeout=120).stdout.strip()


def test_lock_holds_across_pid_namespaces_and_is_taken_over_only_from_the_gone(tmp_path, capsys):
    """A live owner in another PID namespace (its PID means nothing here, or another process) is
    refused by acquire and by the pre-flight's check, both ways; its lock survives the refusal; once
    it is killed (-9) the lock is taken over. Where no new namespace can be made, the foreign owner
    is emulated: a live holder whose record names a PID namespace and a PID that are not ours."""
    from dchag.checkpointing import lock
    from dchag.checkpointing.errors import CheckpointError
    save = str(tmp_path / "run")
    path = os.path.join(save, lock.LOCK)
    ns = new_pid_namespace()
    print("new PID namespace:", ns or "not available here: emulated")
    holder, pid_seen = _holder(save, ns)
    try:
        record = lock._read(path)
        if not ns:  # what a foreign namespace looks like: same boot id, a PID that means something else
            dead = subprocess.Popen([sys.executable, "-c", "pass"])
            dead.wait()
            record.update(pid=dead.pid, pid_namespace="pid:[1]")
            with open(path, "r+") as f:  # rewritten in place: the holder's inode and OS lock stay
                f.write(json.dumps(record, indent=1))
                f.truncate()
        else:
            assert pid_seen == 1 and record["pid_namespace"] != lock._pid_namespace(), record
        with pytest.raises(CheckpointError, match="in use by another job .*a process still holds its lock") as e:
            lock.acquire(save)
        if ns:
            assert "PID 1 in another PID namespace" in str(e.value), str(e.value)
        with pytest.raises(CheckpointError, match="in use by another job"):
            lock.check(save)
        assert lock._read(path)["token"] == record["token"], "the refused job left the owner's lock alone"
        holder.kill()
        holder.wait()
        held = lock.acquire(save)
        assert "no process holds its lock any more" in capsys.readouterr().out
        # the other way round: this process holds it, a job in another namespace is refused
        said = _try(save, ns)
        assert said.startswith("refused:") and f"PID {os.getpid()}" in said, said
        assert lock._read(path)["token"] == held.record["token"]
        held.release()
        assert not os.path.exists(path)
    finally:
        if holder.poll() is None:
            holder.kill()


def test_lock_records_the_heartbeat_and_release_removes_only_its_own(tmp_path, capsys):
    """Another host's lock (another boot id: its OS lock proves nothing here) is taken over only once
    its heartbeat is older than STALE_S; a lock from a dchag without heartbeats is never taken
    over; where the file system has no flock, the PID answers in the same PID namespace only; a
    job whose lock file was replaced by another's leaves that one in place on release, and a
    release that cannot remove its file does not raise."""
    from dchag.checkpointing import lock
    from dchag.checkpointing.errors import CheckpointError
    save = str(tmp_path / "run")
    os.makedirs(save)
    path = os.path.join(save, lock.LOCK)
    me = lock.owner_record()

    def plant(record, age=0.0):
        with open(path, "w") as f:
            json.dump(record, f)
        os.utime(path, (time.time() - age,) * 2)

    other_host = {**me, "host": "node-7", "boot_id": "another-kernel", "os_lock": "flock"}
    plant(other_host, age=60)
    with pytest.raises(CheckpointError, match="its heartbeat was refreshed 60 s ago \(taken over once it is 10 min"):
        lock.acquire(save)
    plant(other_host, age=lock.STALE_S + 60)
    lock.acquire(save).release()
    assert "its heartbeat stopped 11 min ago" in capsys.readouterr().out
    plant({"host": me["host"], "pid": 999999, "started": "t0", "job": {}}, age=lock.STALE_S * 10)  # no token
    with pytest.raises(CheckpointError, match="from before lock heartbeats"):
        lock.acquire(save)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    plant({**me, "pid": dead.pid, "os_lock": None})  # no flock where it was written: same namespace, PID gone
    lock.acquire(save).release()
    assert f"its process {dead.pid} is no longer running" in capsys.readouterr().out
    plant({**me, "pid": dead.pid, "os_lock": None, "pid_namespace": "pid:[1]"})  # that PID means nothing here
    with pytest.raises(CheckpointError, match="its heartbeat was refreshed"):
        lock.acquire(save)
    os.remove(path)
    held = lock.acquire(save)
    os.replace(path, path + ".mine")
    plant({**me, "token": "someone-else"})  # another job's lock at the path now
    held.release()
    assert lock._read(path)["token"] == "someone-else", "a job never deletes a lock it does not own"
    os.remove(path)
    held = lock.acquire(save)
    with _unwritable(save) as how:  # the lock cannot be removed: release says nothing, raises nothing
        held.release()
        assert os.path.exists(path), how
    os.remove(path)
    with _unwritable(save) as how:  # a start on an unwritable folder: the cause, not a PermissionError
        with pytest.raises(CheckpointError, match=f"cannot write to --save {save}: creating its lock file {path} "
                                                  "failed: (operation not permitted|permission denied). Make the"):
            lock.acquire(save)


@contextlib.contextmanager
def _unwritable(folder):
    """``folder`` made unwritable to this process: immutable (chattr +i, as root), else mode 0500
    (a user other than root)."""
    if subprocess.run(["chattr", "+i", folder], capture_output=True).returncode == 0:
        try:
            yield "chattr +i"
        finally:
            subprocess.run(["chattr", "-i", folder], check=True)
        return
    os.chmod(folder, 0o500)
    try:
        probe = os.path.join(folder, "probe")
        try:
            open(probe, "w").close()
        except OSError:
            yield "chmod 0500"
            return
        os.remove(probe)
        pytest.skip("this process can make no folder unwritable to itself (root without CAP_LINUX_IMMUTABLE)")
    finally:
        os.chmod(folder, 0o700)


# ----------------------------------------------------------------------------------------------
# issue 30 (part B): the small files the pre-flight reads are checked against the manifest first


def test_an_edited_args_file_is_named_as_damaged_not_as_a_flag_conflict(tmp_path):
    """Issue 30: an edited dchag_args.json that is still valid JSON was reported as a flag conflict
    (its advice cost another start before the checksum error). Its manifest entry is checked first."""
    from dchag.checkpointing import compat
    from dchag.checkpointing.errors import CheckpointError
    run = _fake_run(tmp_path, complete=(2, 4), interrupted=(), latest=4)
    path = os.path.join(run, "iter_0000004", "dchag_args.json")
    with open(path, "w") as f:
        json.dump({"tensor_model_parallel_size": 2}, f)  # valid JSON, another value
    args = argparse.Namespace(load=run, save=None, ckpt_step=None, no_load_optim=False, tensor_model_parallel_size=1)
    with pytest.raises(CheckpointError) as e:
        compat.check_compatible(args)
    assert f"cannot load {run}/iter_0000004: {path} is damaged: has a different SHA-256 than when it was saved" in \
        str(e.value) and "--ckpt-step 2 added" in str(e.value), str(e.value)
