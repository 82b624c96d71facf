"""examples/slurm_pretrain.sbatch's control flow, with stand-ins for srun, scontrol and the training
tasks (training itself under srun's environment is tested in tests/test_signals.py):

- srun starts the tasks directly (no torchrun) with --exit-signal-handler;
- SLURM's time-limit signal to the batch script (USR1) reaches every task as SIGTERM; when all of
  them exit 0 the job requeues itself (``scontrol requeue <job id>``) and exits 0;
- the requeued job passes --load RUN_DIR (RUN_DIR/latest exists) and, finishing, is not requeued;
- a failing task fails the job, which is not requeued.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "examples", "slurm_pretrain.sbatch")

# srun: start SLURM_NTASKS copies of the command with their task variables, forward TERM and USR1
# to them, exit with the highest task status (srun's rule).
FAKE_SRUN = """#!{python}
import os, signal, subprocess, sys
args = [a for a in sys.argv[1:] if not a.startswith("--kill-on-bad-exit")]
n = int(os.environ["SLURM_NTASKS"])
tasks = [subprocess.Popen(args, env=dict(os.environ, SLURM_PROCID=str(r), SLURM_LOCALID=str(r))) for r in range(n)]
def forward(signum, frame):
    for t in tasks:
        t.send_signal(signum)
for s in (signal.SIGTERM, signal.SIGUSR1):
    signal.signal(s, forward)
sys.exit(max(t.wait() for t in tasks))
"""
FAKE_SCONTROL = """#!/bin/sh
echo "$@" >> "$FAKE_LOG/scontrol"
"""
# the training task: records its command line, then waits for SIGTERM (exit 0) unless told to end
FAKE_PYTHON = """#!{python}
import json, os, signal, sys, time
log = os.environ["FAKE_LOG"]
rank = os.environ["SLURM_PROCID"]
got = []
signal.signal(signal.SIGTERM, lambda s, f: got.append("SIGTERM"))
with open(os.path.join(log, "task" + rank + ".json"), "w") as f:
    json.dump(sys.argv[1:], f)
end = os.environ.get("FAKE_END")
t0 = time.time()
while end is None and not got and time.time() - t0 < 120:
    time.sleep(0.05)
with open(os.path.join(log, "task" + rank + ".end"), "w") as f:
    f.write(",".join(got) or "finished")
sys.exit(int(end or 0))
"""


def _executable(path, text):
    path.write_text(text.format(python=sys.executable))
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def _job(tmp_path, **env):
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    for p in (bin_dir, log):
        p.mkdir(exist_ok=True)
    for f in log.iterdir():
        f.unlink()
    _executable(bin_dir / "srun", FAKE_SRUN)
    _executable(bin_dir / "scontrol", FAKE_SCONTROL)
    _executable(bin_dir / "python", FAKE_PYTHON)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": str(bin_dir / "python"),
           "FAKE_LOG": str(log), "SLURM_JOB_ID": "4242", "SLURM_NTASKS": "2", "SLURM_SUBMIT_DIR": REPO,
           "RUN_DIR": str(tmp_path / "run"), "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext"), **env}
    return subprocess.Popen(["bash", SCRIPT, "--train-iters", "50"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True), log


def _argv(log, rank):
    with open(log / f"task{rank}.json") as f:
        return json.load(f)


def test_the_time_limit_signal_stops_every_task_and_requeues(tmp_path):
    job, log = _job(tmp_path)
    t0 = time.time()
    while not all((log / f"task{r}.json").exists() for r in range(2)):
        assert job.poll() is None and time.time() - t0 < 60, job.stdout.read()
        time.sleep(0.05)
    job.send_signal(signal.SIGUSR1)  # SLURM: --signal=B:USR1@300
    out, _ = job.communicate(timeout=60)
    assert job.returncode == 0, out
    assert [(log / f"task{r}.end").read_text() for r in range(2)] == ["SIGTERM", "SIGTERM"], out
    assert (log / "scontrol").read_text().split() == ["requeue", "4242"], out
    argv = _argv(log, 0)
    assert argv[0] == "pretrain_dchag.py" and "--exit-signal-handler" in argv and "--load" not in argv
    assert argv[argv.index("--save") + 1] == str(tmp_path / "run") and argv[-2:] == ["--train-iters", "50"]

    # the requeued job: RUN_DIR/latest exists, so it resumes; it finishes, so it is not requeued
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "latest").write_text("iter_0000005")
    job, log = _job(tmp_path, FAKE_END="0")
    out, _ = job.communicate(timeout=60)
    assert job.returncode == 0 and not (log / "scontrol").exists(), out
    argv = _argv(log, 1)
    assert argv[argv.index("--load") + 1] == str(tmp_path / "run")

    # a failing task fails the job, which is not requeued
    job, log = _job(tmp_path, FAKE_END="3")
    out, _ = job.communicate(timeout=60)
    assert job.returncode == 3 and not (log / "scontrol").exists(), out
