"""Signals sent to real training processes (2 ranks started as a cluster scheduler starts them:
one process per rank, no launcher in between; SLURM's srun variables or RANK/WORLD_SIZE/MASTER_*
in the environment), and a rank killed under torchrun's restarts.

* srun's way (SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID / SLURM_JOB_ID / SLURM_JOB_NODELIST only):
  SIGTERM to one rank of a run with ``--exit-signal-handler``: both ranks stop after the same
  iteration, a checkpoint is saved, both exit 0 with one line saying why; resuming from it to
  iteration R gives weights bit-identical to an uninterrupted run of R iterations.
* SIGINT (Ctrl-C: every rank gets it) without the handler: each rank exits 130 with one line,
  no traceback.
* torchrun --max-restarts 2 --master_port P (gloo; the workers share the agent's TCP store across
  restarts, which hung the restarted workers in init_process_group): rank 1 killed with SIGKILL
  after a checkpoint; torchrun restarts both ranks, they resume from the last checkpoint, the run
  completes and its last loss is the uninterrupted run's.

The interrupted runs ask for 100000 iterations (they never end by themselves) with a fixed
``--lr-decay-iters 12``, so the LR schedule does not depend on --train-iters and the resume, the
restarted run and the reference run can stop at any R with the same schedule.
"""

from __future__ import annotations

import os
import random
import re
import signal
import socket
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


RESTART_ITERS = 40  # the torchrun run's length: long enough to be killed mid-run (~40 ms an iteration)


def _job_with_free_port() -> str:
    """A SLURM job id whose port (dchag.training.launch.port_for_job: 20000 + id mod 10000) is free here."""
    from dchag.training.launch import port_for_job
    rng = random.Random()
    for _ in range(200):
        job_id = str(rng.randrange(10**6, 10**7))
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port_for_job(job_id)))
            except OSError:
                continue
        return job_id
    raise RuntimeError("no free port in 20000-29999")


def _launch(argv, folder, name, srun=False):
    """Start 2 ranks; returns the processes and their (stdout, stderr) paths. ``srun``: the
    environment srun gives its tasks (the run derives rank, world size and rendezvous from it)."""
    os.makedirs(folder, exist_ok=True)
    port = free_port()
    job_id = _job_with_free_port() if srun else None
    procs, logs = [], []
    for rank in range(2):
        if srun:
            where = {"SLURM_PROCID": str(rank), "SLURM_NTASKS": "2", "SLURM_LOCALID": str(rank),
                     "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_ID": job_id}
        else:
            where = {"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
                     "MASTER_PORT": str(port)}
        base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                                  "MASTER_PORT") and not k.startswith("SLURM_")}
        env = {**base, **where, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
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


def _torchrun(argv, folder, name):
    """torchrun --max-restarts 2 --master_port P with 2 workers on gloo (static rendezvous: the
    workers share the agent's TCP store across restarts; no TORCH_DISABLE_SHARE_RDZV_TCP_STORE);
    returns the agent and its output path."""
    out = os.path.join(folder, f"{name}.out")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE")
           and not k.startswith("SLURM_")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    with open(out, "w") as f:
        agent = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                  "--max-restarts", "2", "--master_port", str(free_port()),
                                  os.path.join(REPO, "pretrain_dchag.py")] + argv,
                                 stdout=f, stderr=subprocess.STDOUT, cwd=folder, env=env)
    return agent, out


def _worker(agent, rank: int) -> int:
    """The pid of torchrun's worker of ``rank`` (a child of the agent with RANK=rank)."""
    for task in os.listdir(f"/proc/{agent.pid}/task"):
        with open(f"/proc/{agent.pid}/task/{task}/children") as f:
            for pid in f.read().split():
                with open(f"/proc/{pid}/environ", "rb") as env:
                    if f"RANK={rank}".encode() in env.read().split(b"\0"):
                        return int(pid)
    raise AssertionError(f"no worker of rank {rank} under torchrun {agent.pid}")


def _stop(agent) -> None:
    """End a torchrun agent and its workers (SIGTERM: the agent stops its workers first)."""
    if agent.poll() is None:
        agent.terminate()
        try:
            agent.wait(timeout=60)
        except subprocess.TimeoutExpired:
            agent.kill()


def _finish(procs, timeout=600):
    return [p.wait(timeout=timeout) for p in procs]


def _weights(folder, tag):
    sd = torch.load(os.path.join(folder, tag, "mp_rank_00_model_states.pt"), map_location="cpu", weights_only=False)
    return sd["module"]


def _losses(text):
    return {int(m.group(1)): m.group(2) for m in re.finditer(r"iteration\s+(\d+)/\s*\d+ \|.*? loss: (\S+) \|", text)}


def test_sigterm_saves_and_resume_equals_uninterrupted_run(tmp_path):
    run, logs = str(tmp_path / "run"), str(tmp_path / "logs")
    # 1. srun's way: SIGTERM to rank 1 only (rank 0 learns it through the flag all-reduce);
    #    meanwhile a second run gets Ctrl-C on both ranks without a handler, and a third, under
    #    torchrun, loses rank 1 to SIGKILL after its first checkpoint.
    term, term_logs = _launch(BASE + ["--train-iters", "100000", "--save", run, "--exit-signal-handler"], logs, "term",
                              srun=True)
    intr, intr_logs = _launch(BASE + ["--train-iters", "100000", "--save", str(tmp_path / "intr")], logs, "intr")
    restarted = str(tmp_path / "restarted")
    codes = None
    agent, agent_log = _torchrun(BASE + ["--train-iters", str(RESTART_ITERS), "--save-interval", "1", "--save",
                                         restarted, "--load", restarted], logs, "torchrun")
    try:
        t0 = time.time()
        while not os.path.exists(os.path.join(restarted, "latest")):  # a checkpoint to resume from
            assert agent.poll() is None and time.time() - t0 < 600, _read(agent_log)[-3000:]
            time.sleep(0.02)
        os.kill(_worker(agent, 1), signal.SIGKILL)
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
        if codes is None:
            _stop(agent)
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

    # 2. Resume to R, and the uninterrupted reference run of R iterations.
    end = max(stop + 2, RESTART_ITERS)
    resumed, resumed_logs = _launch(BASE + ["--train-iters", str(end), "--load", run, "--save", run], logs, "resumed",
                                    srun=True)
    ref, ref_logs = _launch(BASE + ["--train-iters", str(end), "--save", str(tmp_path / "ref")], logs, "ref")
    try:
        assert _finish(resumed) == [0, 0], _read(resumed_logs[0][1])[-3000:]
        assert _finish(ref) == [0, 0], _read(ref_logs[0][1])[-3000:]
        agent_code = agent.wait(timeout=600)
    finally:
        _stop(agent)
    tag = f"iter_{end:07d}"
    a, b = _weights(run, tag), _weights(str(tmp_path / "ref"), tag)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    la, lb = _losses(_read(resumed_logs[0][0])), _losses(_read(ref_logs[0][0]))
    assert sorted(la) == list(range(stop + 1, end + 1)) and all(la[i] == lb[i] for i in la), (la, lb)

    # 3. torchrun restarted both ranks, which resumed from the last checkpoint and ended on the
    #    uninterrupted run's loss.
    text = _read(agent_log)
    assert agent_code == 0, text[-4000:]
    loaded = re.findall(r"> loaded checkpoint \S+/iter_(\d+) at iteration", text)
    assert len(loaded) == 1 and 1 <= int(loaded[0]) < RESTART_ITERS, text[-4000:]
    lr = _losses(text)
    assert lr[RESTART_ITERS] == lb[RESTART_ITERS], (lr, lb)


INTERRUPTED = r"""
import sys, time
from dchag.training import signals
signals.progress.update(iteration=7, saved="RUN/iter_0000006")
signals.install_interrupt_handler()
print("training", flush=True)
try:
    while True:
        time.sleep(0.01)
finally:
    time.sleep(60)  # a cleanup that blocks: a collective with a peer that has already exited
"""


def test_the_first_ctrl_c_prints_its_line_before_anything_can_kill_the_rank(tmp_path):
    """Issue 30: under torchrun a second Ctrl-C makes the agent SIGTERM its workers; rank 0, still
    unwinding its KeyboardInterrupt through a cleanup blocked on a peer already gone, died without
    its line. The handler prints the line at once and exits: Ctrl-C twice gives exit 130 and the line
    within seconds (without the handler the cleanup still runs after 20 s, and the SIGTERM then sent
    kills the process without its line)."""
    proc = subprocess.Popen([sys.executable, "-c", INTERRUPTED], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=REPO, env={**os.environ, "RANK": "3"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert proc.stdout.readline() == "training\n"
        proc.send_signal(signal.SIGINT)
        proc.send_signal(signal.SIGINT)
        try:  # the handler exits at once; a KeyboardInterrupt would sit in the 60 s cleanup
            code = proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)  # what torchrun's agent sends after a second Ctrl-C
            code = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = proc.stderr.read()
    assert code == 130, (code, err)
    assert err == ("rank 3: interrupted (SIGINT) at iteration 7; stopping (last checkpoint RUN/iter_0000006). To "
                   "save on a signal, run with --exit-signal-handler [--exit-signal SIGINT].\n"), err
