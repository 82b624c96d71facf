"""One job per ``--save`` folder: ``DIR/dchag.lock``.

The first rank of a job creates the lock (atomically: written beside it, then hard-linked into
place, which fails when the file exists) holding the owner's host, PID, process start time and
job identity (SLURM job and step, torchrun run id, rendezvous address). A second job is refused,
naming the owner. The lock goes when the run ends (normally, on an error, or on a handled or
unhandled signal). A lock left behind by a process that died (``kill -9``, a node lost) is taken
over, with a message, when its owner is provably gone:

- same host, and its PID is not running (or runs a process started at another time: PID reuse);
- an earlier run of the same SLURM job (a requeue keeps the job id; the host may differ).

On a shared file system the lock's creation is atomic on NFS v3+, Lustre and GPFS, but a process
on another node cannot be seen: a lock from another host is only taken over for the same SLURM
job. Otherwise remove ``DIR/dchag.lock`` yourself once you know its job is gone (the message
says so, with the owner).
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import sys
import time

from dchag.checkpointing.errors import CheckpointError
from dchag.checkpointing.ranks import is_first_rank
from dchag.checkpointing.write_errors import cause_of

LOCK = "dchag.lock"
_held: list["SaveLock"] = []  # this process's locks, released at exit (also by exit_interrupted)


def _proc_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def job_identity() -> dict:
    """What every rank of one job shares and another job does not."""
    env = os.environ
    return {"slurm_job_id": env.get("SLURM_JOB_ID"), "slurm_step_id": env.get("SLURM_STEP_ID"),
            "torchelastic_run_id": env.get("TORCHELASTIC_RUN_ID"),
            "rendezvous": f"{env.get('MASTER_ADDR', '')}:{env.get('MASTER_PORT', '')}"}


def owner_record() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "proc_start": _proc_start(os.getpid()),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "job": job_identity(),
            "command": " ".join(sys.argv)[:500]}


def describe(owner: dict | None) -> str:
    if not owner:
        return "an unreadable owner"
    job = owner.get("job") or {}
    slurm = f", SLURM job {job['slurm_job_id']}" if job.get("slurm_job_id") else ""
    return f"host {owner.get('host')}, PID {owner.get('pid')}{slurm}, started {owner.get('started')}"


def _read(path: str) -> dict | None:
    try:
        with open(path) as f:
            doc = json.load(f)
        return doc if isinstance(doc, dict) else None
    except (OSError, ValueError):
        return None


def _same_job(owner: dict, me: dict) -> bool:
    return (owner.get("job") or {}) == me["job"] and bool(me["job"]["rendezvous"].strip(":"))


def stale_reason(owner: dict | None, me: dict) -> str | None:
    """Why the lock's owner is provably gone (None: it may be running)."""
    if not owner:
        return None
    if owner.get("host") == me["host"]:  # the process table answers
        pid = owner.get("pid")
        if not isinstance(pid, int):
            return None
        if pid == me["pid"]:
            return "it was left by this process (an earlier run in it that ended without releasing it)"
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return f"its process {pid} is no longer running"
        except PermissionError:
            pass  # running, under another user
        start = _proc_start(pid)
        if owner.get("proc_start") is not None and start is not None and start != owner["proc_start"]:
            return f"its process {pid} is gone (that PID now belongs to another process)"
        return None
    mine, theirs = me["job"], owner.get("job") or {}
    if mine.get("slurm_job_id") and (theirs.get("slurm_job_id"), theirs.get("slurm_step_id")) == \
            (mine["slurm_job_id"], mine.get("slurm_step_id")):  # one step has one first rank: this is an earlier run
        return f"it was left by an earlier run of SLURM job {mine['slurm_job_id']} (requeued)"
    return None


def _refusal(save_dir: str, path: str, owner: dict | None) -> CheckpointError:
    if owner is None:
        return CheckpointError(f"--save {save_dir} has a lock file ({path}) that cannot be read. If no job is writing to "
                               f"that folder, remove {path} and start again; otherwise choose another --save folder.")
    return CheckpointError(
        f"--save {save_dir} is in use by another job ({describe(owner)}: {path}); two jobs writing one folder "
        f"overwrite each other's checkpoints. Wait for it to end, or choose another --save folder. If that job is "
        f"gone (e.g. its node died), remove {path} and start again.")


class SaveLock:
    def __init__(self, save_dir: str, record: dict, created_dir: bool):
        self.save_dir, self.path, self.record, self.created_dir = save_dir, os.path.join(save_dir, LOCK), record, \
            created_dir

    def release(self) -> None:
        """Remove the lock if it is still this process's; a --save folder this run created and left
        empty is removed too (a refused start leaves nothing behind)."""
        if self in _held:
            _held.remove(self)
        owner = _read(self.path)
        if owner and owner.get("pid") == self.record["pid"] and owner.get("host") == self.record["host"]:
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass
        if self.created_dir:
            try:
                os.rmdir(self.save_dir)  # only when empty
            except OSError:
                pass


def _create(path: str, record: dict) -> bool:
    """Create ``path`` holding ``record`` unless it exists (atomically); True when created."""
    tmp = f"{path}.{record['host']}.{record['pid']}.tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, path)  # fails if path exists; atomic on local and network file systems
        return True
    except FileExistsError:
        return False
    except OSError:  # no hard links here: exclusive create instead
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(record, f, indent=1)
        return True
    finally:
        os.remove(tmp)


def acquire(save_dir: str, log=print) -> SaveLock:
    """Take the lock of ``save_dir`` (creating the folder), taking over a stale one with a message;
    raises :class:`CheckpointError` naming the owner when another job holds it. Call on one rank."""
    created = not os.path.isdir(save_dir)
    path, me = os.path.join(save_dir, LOCK), owner_record()
    for _ in range(5):
        try:
            os.makedirs(save_dir, exist_ok=True)
            made = _create(path, me)
        except OSError as e:
            raise CheckpointError(f"cannot write to --save {save_dir}: creating {path} failed: "
                                  f"{cause_of(e, path)}.") from e
        if made:
            lock = SaveLock(save_dir, me, created)
            _held.append(lock)
            return lock
        owner = _read(path)
        reason = stale_reason(owner, me)
        if reason is None:
            if created and not os.listdir(save_dir):
                os.rmdir(save_dir)
            raise _refusal(save_dir, path, owner)
        aside = f"{path}.stale.{me['host']}.{me['pid']}"
        try:
            os.rename(path, aside)  # only one taker succeeds with this file
        except FileNotFoundError:
            continue  # another job took it over first: look again
        if stale_reason(_read(aside), me) is None:  # a live job's lock replaced the stale one meanwhile: put it back
            try:
                os.link(aside, path)
            except OSError:
                pass
            os.remove(aside)
            continue
        os.remove(aside)
        log(f"> took over the lock of --save {save_dir} from {describe(owner)}: {reason}", flush=True)
    raise CheckpointError(f"could not take the lock {path}: other jobs keep taking it; is more than one job starting "
                          "on this --save folder?")


def check(save_dir: str) -> None:
    """Read-only check for a rank that does not take the lock: raises as :func:`acquire` would
    when another live job holds it (the lock of this job's own first rank passes)."""
    path, me = os.path.join(save_dir, LOCK), owner_record()
    if not os.path.exists(path):
        return
    owner = _read(path)
    if owner is None and not os.path.exists(path):  # released meanwhile
        return
    if owner is not None and (_same_job(owner, me) or stale_reason(owner, me) is not None):
        return
    raise _refusal(save_dir, path, owner)


def acquire_for_run(save_dir: str | None) -> SaveLock | None:
    """One job per ``--save`` folder, for a training run: the first rank takes the lock and every
    rank raises the same refusal. Callable before torch.distributed is initialized (then the first
    rank, RANK 0 from the environment, takes it; the others check it read-only) and after (the
    first rank's outcome is broadcast). Returns the lock on the rank that holds it, else None."""
    if not save_dir:
        return None
    import torch.distributed as dist
    if dist.is_initialized():
        lock, error = None, [None]
        if dist.get_rank() == 0:
            try:
                lock = acquire(save_dir)
            except CheckpointError as e:
                error = [str(e)]
        dist.broadcast_object_list(error, src=0)
        if error[0]:
            raise CheckpointError(error[0])
        return lock
    if is_first_rank():
        return acquire(save_dir)
    check(save_dir)
    return None


@atexit.register
def release_held() -> None:
    """Release every lock this process holds (at exit, and before an exit that skips atexit)."""
    for lock in list(_held):
        lock.release()
