"""Signals sent to real training processes (2 ranks started as a cluster scheduler starts them:
one process per rank, RANK/WORLD_SIZE/MASTER_* in the environment, no launcher in between).

* SIGTERM to one rank of a run with ``--exit-signal-handler``: both ranks stop after the same
  iteration, a checkpoint is saved, both exit 0 with one line saying why; resuming from it to
  iteration J + 2 gives weights bit-identical to an uninterrupted run of J + 2 iterations.
* SIGINT (Ctrl-C: every rank gets it) without the handler: each rank exits 130 with one line,
  no traceback.

The interrupted runs ask for 100000 iterations (they never end by themselves) with a fixed
``--lr-decay-iters 12``, so the LR schedule does not depend on --train-iters and the resume and
the reference run can stop at J + 2 with the same schedule.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import torch

from tests.distributed import free_port
from tests.test_training import DROPOUT, MAE, REPO, _ds

BASE = _ds("zero1_fp32.json") + MAE + DROPOUT + ["--channel-parallel-size", "2", "--lr-decay-iters", "12",
                                                 "--log-interval", "1"]
EXIT_RE = re.compile(r"> exiting at iteration (\d+) of 100000: received SIGTERM \(--exit-signal-handler\); "
                     r"checkpoint (\S+)")


def _launch(argv, folder, name):
    """Start 2 ranks; returns the processes and their (stdout, stderr) paths."""
    os.makedirs(folder, exist_ok=True)
    port = free_port()
    procs, logs = [], []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
        out, err = (os.path.join(folder, f"{name}.{rank}.{k}") for k in ("out", "err"))
        with open(out, "w") as fo, open(err, "w") as fe:
            # Ctrl-C's default action even when this test runs as a background job (whose shell
            # starts it, and so its children, with SIGINT ignored)
            procs.append(subprocess.Popen([sys.executable, os.path.join(REPO, "pretrain_dchag.py")] + argv,
                                          stdout=fo, stderr=fe, cwd=folder, env=env,
                                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)))
        logs.append((out, err))
    return procs, logs


def _read(path):
    with open(path) as f:
        return f.read()


def _wait_for(logs, text, procs, timeout=600):
    t0 = time.time()
    while text not in _read(logs[0][0]):
        assert all(p.poll() is None for p in procs), f"a rank ended before {text!r}:\n" + _read(logs[0][1])[-3000:]
        assert time.time() - t0 < timeout, f"no {text!r} after {timeout} s"
        time.sleep(0.1)


def _finish(procs, timeout=600):
    return [p.wait(timeout=timeout) for p in procs]


def _weights(folder, tag):
    sd = torch.load(os.path.join(folder, tag, "mp_rank_00_model_states.pt"), map_location="cpu", weights_only=False)
    return sd["module"]


def _losses(text):
    return {int(m.group(1)): m.group(2) for m in re.finditer(r"iteration\s+(\d+)/\s*\d+ \|.*? loss: (\S+) \|", text)}


def test_sigterm_saves_and_resume_equals_uninterrupted_run(tmp_path):
    run = str(tmp_path / "run")
    # 1. SIGTERM to rank 1 only (rank 0 learns it through the flag all-reduce); meanwhile a
    #    second run gets Ctrl-C on both ranks without a handler.
    term, term_logs = _launch(BASE + ["--train-iters", "100000", "--save", run, "--exit-signal-handler"],
                              str(tmp_path / "logs"), "term")
    intr, intr_logs = _launch(BASE + ["--train-iters", "100000", "--save", str(tmp_path / "intr")],
                              str(tmp_path / "logs"), "intr")
    try:
        _wait_for(term_logs, "iteration        2/", term)
        term[1].send_signal(signal.SIGTERM)
        _wait_for(intr_logs, "iteration        2/", intr)
        for p in intr:
            p.send_signal(signal.SIGINT)
        codes, intr_codes = _finish(term), _finish(intr)
    finally:
        for p in term + intr:
            if p.poll() is None:
                p.kill()
    out0 = _read(term_logs[0][0])
    assert codes == [0, 0], [_read(e)[-3000:] for _, e in term_logs]
    m = EXIT_RE.search(out0)
    assert m, out0[-3000:]
    stop = int(m.group(1))
    assert m.group(2) == f"{run}/iter_{stop:07d}" and stop >= 2
    assert _read(os.path.join(run, "latest")) == f"iter_{stop:07d}"
    for _, err in term_logs:
        assert "Traceback" not in _read(err)

    # SIGINT without the handler: exit 130, one line per rank, no traceback.
    assert intr_codes == [130, 130], [_read(e)[-3000:] for _, e in intr_logs]
    for rank, (_, err) in enumerate(intr_logs):
        text = _read(err)
        assert "Traceback" not in text, text[-3000:]
        lines = [ln for ln in text.splitlines() if "interrupted (SIGINT)" in ln]
        assert len(lines) == 1 and lines[0].startswith(f"rank {rank}: interrupted (SIGINT) at iteration "), text[-2000:]
        assert text.rstrip().endswith(lines[0])

    # 2. Resume to stop + 2, and the uninterrupted reference run of stop + 2 iterations.
    end = str(stop + 2)
    resumed, resumed_logs = _launch(BASE + ["--train-iters", end, "--load", run, "--save", run],
                                    str(tmp_path / "logs"), "resumed")
    ref, ref_logs = _launch(BASE + ["--train-iters", end, "--save", str(tmp_path / "ref")], str(tmp_path / "logs"),
                            "ref")
    assert _finish(resumed) == [0, 0], _read(resumed_logs[0][1])[-3000:]
    assert _finish(ref) == [0, 0], _read(ref_logs[0][1])[-3000:]
    tag = f"iter_{stop + 2:07d}"
    a, b = _weights(run, tag), _weights(str(tmp_path / "ref"), tag)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    la, lb = _losses(_read(resumed_logs[0][0])), _losses(_read(ref_logs[0][0]))
    assert sorted(la) == [stop + 1, stop + 2] and all(la[i] == lb[i] for i in la), (la, lb)
