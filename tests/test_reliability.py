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
import shutil
import signal
import socket
import subprocess
import sys

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


HUGE = r"""
import json, os, sys, time
import torch
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
                   "parameters": shards.param_specs(model)})
print("modes", sorted(oct(os.stat(os.path.join(out, f)).st_mode & 0o777) for f in os.listdir(out)))
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
for name, load in (("load_pretrained", lambda: dchag.load_pretrained(out, device="cpu")),
                   ("to_deepspeed", lambda: convert.to_deepspeed(out, out + "_ds", 1, 1))):
    t0 = time.time()
    try:
        load()
        print(name, "loaded")
    except CheckpointError as e:
        print(name, "refused in %.2f s:" % (time.time() - t0), e)
"""


def test_export_config_claiming_a_huge_model_is_refused_fast(tmp_path):
    """Also: exports are written 0644, and an export over the file-size limit names the cause and
    leaves nothing."""
    proc = subprocess.run([sys.executable, "-c", HUGE, str(tmp_path / "export")], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(proc.stdout)  # the refusal times, for the log
    assert "modes ['0o644', '0o644', '0o644']" in proc.stdout, proc.stdout
    for name in ("load_pretrained", "to_deepspeed"):
        line = next(ln for ln in proc.stdout.splitlines() if ln.startswith(name))
        assert "refused in" in line and "hidden size 10000000" in line and "nothing was allocated" in line, line
    assert not os.path.exists(tmp_path / "export_ds")
    assert f"write refused: cannot write {tmp_path}/export_small: file too large: over this process's file-size " \
           "limit of 4 KB (ulimit -f 4); nothing was written" in proc.stdout, proc.stdout
    assert not os.path.exists(tmp_path / "export_small") and not any(
        n.startswith(".tmp-export_small") for n in os.listdir(tmp_path))


# ----------------------------------------------------------------------------------------------
# processes: two jobs on one folder, a file-size limit, a second SIGINT

ONE = _ds("zero1_fp32.json") + [a if a != "2" or MAE[i - 1] != "--tensor-model-parallel-size" else "1"
                                for i, a in enumerate(MAE)] + ["--lr-decay-iters", "12", "--log-interval", "1"]


def _job(argv, logs, name, ulimit_kb=None):
    """One single-rank job as a scheduler starts it; returns (process, (stdout, stderr) paths)."""
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [sys.executable, os.path.join(REPO, "pretrain_dchag.py")] + argv
    if ulimit_kb is not None:  # the limit applies to this process only
        cmd = ["bash", "-c", f'ulimit -f {ulimit_kb} && exec "$@"', "job"] + cmd
    os.makedirs(logs, exist_ok=True)
    out, err = os.path.join(logs, f"{name}.out"), os.path.join(logs, f"{name}.err")
    with open(out, "w") as fo, open(err, "w") as fe:
        proc = subprocess.Popen(cmd, stdout=fo, stderr=fe, cwd=logs, env=env)
    return proc, (out, err)


def test_two_jobs_on_one_folder_and_a_write_over_the_size_limit(tmp_path):
    run, logs = str(tmp_path / "run"), str(tmp_path / "logs")
    first, first_logs = _job(ONE + ["--train-iters", "100000", "--save", run, "--exit-signal-handler"], logs, "first")
    try:
        _wait_for([first_logs], "iteration        1/", [first])
        second, second_logs = _job(ONE + ["--train-iters", "4", "--save", run], logs, "second")
        assert second.wait(timeout=300) == 1, _read(second_logs[1])[-3000:]
        err = _read(second_logs[1])
        assert f"--save {run} is in use by another job (host " in err and f"PID {first.pid}," in err, err[-3000:]
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=300) == 0, _read(first_logs[1])[-3000:]
    finally:
        for p in (first,):
            if p.poll() is None:
                p.kill()
    assert not os.path.exists(os.path.join(run, "dchag.lock")), "released at the end of the run"
    last = _read(os.path.join(run, "latest"))
    # A lock left by a process that is gone (the second job's PID, which has exited) is taken over;
    # the resumed job's first save is over its file-size limit.
    with open(os.path.join(run, "dchag.lock"), "w") as f:
        json.dump({"host": socket.gethostname(), "pid": second.pid, "started": "earlier", "job": {}}, f)
    third, third_logs = _job(ONE + ["--train-iters", "100000", "--save-interval", "1", "--load", run, "--save", run],
                             logs, "third", ulimit_kb=64)
    try:
        code = third.wait(timeout=300)
    finally:
        if third.poll() is None:
            third.kill()
    out, err = _read(third_logs[0]), _read(third_logs[1])
    assert code == 1, err[-3000:]
    assert f"> took over the lock of --save {run} from host" in out and f"its process {second.pid} is no longer " \
        "running" in out, out[-3000:]
    it = int(last[len("iter_"):]) + 1
    failed = f"{run}/iter_{it:07d}"
    assert f"error: cannot save checkpoint {failed}: writing {failed}/mp_rank_00_model_states.pt failed on rank 0: " \
           "file too large: over this process's file-size limit of 64 KB (ulimit -f 64)" in err, err[-3000:]
    assert f"the last complete checkpoint is {run}/{last}" in err, err[-3000:]
    assert not os.path.exists(failed), "the partial checkpoint is removed"
    assert _read(os.path.join(run, "latest")) == last and not os.path.exists(os.path.join(run, "dchag.lock"))


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
# the lock, without processes


def test_lock_refuses_a_live_owner_and_takes_over_a_dead_one(tmp_path, capsys):
    from dchag.checkpointing import lock
    from dchag.checkpointing.errors import CheckpointError
    save = str(tmp_path / "run")
    os.makedirs(save)
    path = os.path.join(save, lock.LOCK)
    host = socket.gethostname()
    live = {"host": host, "pid": os.getppid(), "started": "t0", "job": {}}  # our parent: alive
    with open(path, "w") as f:
        json.dump(live, f)
    with pytest.raises(CheckpointError, match=f"in use by another job \\(host {host}, PID {os.getppid()},"):
        lock.acquire(save)
    other_host = {**live, "host": "node-that-died"}
    with open(path, "w") as f:
        json.dump(other_host, f)
    with pytest.raises(CheckpointError, match="If that job is gone .* remove"):
        lock.acquire(save)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with open(path, "w") as f:
        json.dump({**live, "pid": dead.pid}, f)
    held = lock.acquire(save)
    assert f"its process {dead.pid} is no longer running" in capsys.readouterr().out
    with open(path) as f:
        assert json.load(f)["pid"] == os.getpid()
    held.release()
    assert not os.path.exists(path)


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
