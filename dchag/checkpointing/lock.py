"""One job per ``--save`` folder: ``DIR/dchag.lock``.

The first rank of a job creates the lock (atomically: written beside it, then hard-linked into
place, which fails when the file exists) and keeps it open for the whole run. Three things say
that its owner is alive, none of which a PID namespace (a container, ``unshare --pid``) fools:

- **an OS lock**: the owner holds ``flock(LOCK_EX)`` on the file until it exits; the kernel drops
  it when the process dies, however it dies. Authoritative between processes of one kernel (same
  boot id: the same host, whatever container or PID namespace they run in), on any file system
  that supports ``flock`` (local ones, NFS, Lustre mounted ``flock`` or ``localflock``, GPFS).
  Across hosts it is used only one way: a lock seen held means a live owner; a lock seen free
  proves nothing (``local_lock`` NFS mounts and Lustre ``localflock`` keep locks per host).
- **a heartbeat**: the owner refreshes the file's modification time every ``HEARTBEAT_S`` seconds
  (through the descriptor it holds). A lock whose heartbeat is older than ``STALE_S`` was left by
  a job that is gone, on any file system and any host (clocks are assumed within a minute).
- **the PID**, only where it means the same process: same boot id and same PID namespace.

A second job is refused, naming the owner and why it counts as alive. A lock whose owner is
provably gone is taken over with a message:

- same kernel, and no process holds its OS lock (or, where the file system has no ``flock``, same
  PID namespace and its PID is not running, or runs a process started at another time);
- its heartbeat stopped more than ``STALE_S`` seconds ago;
- an earlier run of the same SLURM job step (a requeue keeps the job id; the host may differ).

A job removes only its own lock (the same file, by inode, holding its own token), never another's.
A lock written by a dchag from before the heartbeat (no boot id) is never taken over: remove it
yourself once you know its job is gone (the message says so, with the owner).
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import json
import os
import socket
import sys
import threading
import time
import uuid

from dchag.checkpointing.errors import CheckpointError
from dchag.checkpointing.ranks import is_first_rank
from dchag.checkpointing.write_errors import cause_of

LOCK = "dchag.lock"
HEARTBEAT_S = 30.0  # how often a live job refreshes its lock's modification time
STALE_S = 600.0  # a heartbeat this old means the job is gone (20 missed refreshes; NFS caches attributes <= 60 s)
_NO_FLOCK = (errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF, errno.EACCES, errno.EPERM)
_held: list["SaveLock"] = []  # this process's locks, released at exit (also by exit_interrupted)


def _proc_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _boot_id() -> str | None:
    """The running kernel's boot id: the same in every container and PID namespace of one host,
    different on another host and after a reboot."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip() or None
    except OSError:
        return None


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")  # 'pid:[4026531836]'
    except OSError:
        return None


def job_identity() -> dict:
    """What every rank of one job shares and another job does not."""
    env = os.environ
    return {"slurm_job_id": env.get("SLURM_JOB_ID"), "slurm_step_id": env.get("SLURM_STEP_ID"),
            "torchelastic_run_id": env.get("TORCHELASTIC_RUN_ID"),
            "rendezvous": f"{env.get('MASTER_ADDR', '')}:{env.get('MASTER_PORT', '')}"}


def owner_record() -> dict:
    return {"host": socket.gethostname(), "boot_id": _boot_id(), "pid_namespace": _pid_namespace(),
            "pid": os.getpid(), "proc_start": _proc_start(os.getpid()), "token": uuid.uuid4().hex,
            "heartbeat_s": HEARTBEAT_S, "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "job": job_identity(),
            "command": " ".join(sys.argv)[:500]}


def describe(owner: dict | None) -> str:
    if not owner:
        return "an unreadable owner"
    job = owner.get("job") or {}
    slurm = f", SLURM job {job['slurm_job_id']}" if job.get("slurm_job_id") else ""
    ns = owner.get("pid_namespace")
    where = " in another PID namespace (a container)" if ns is not None and ns != _pid_namespace() and \
        owner.get("boot_id") == _boot_id() else ""
    return f"host {owner.get('host')}, PID {owner.get('pid')}{where}{slurm}, started {owner.get('started')}"


def _read(path: str) -> dict | None:
    try:
        with open(path) as f:
            doc = json.load(f)
        return doc if isinstance(doc, dict) else None
    except (OSError, ValueError):
        return None


def _read_fd(fd: int) -> dict | None:
    """The record through a descriptor already open (closing another descriptor of the file would
    drop this process's lock where ``flock`` is emulated with POSIX locks: NFS)."""
    try:
        doc = json.loads(os.pread(fd, 1 << 16, 0).decode())
        return doc if isinstance(doc, dict) else None
    except (OSError, ValueError):
        return None


def _same_job(owner: dict, me: dict) -> bool:
    return (owner.get("job") or {}) == me["job"] and bool(me["job"]["rendezvous"].strip(":"))


def _held_here(path: str) -> bool:
    """The file at ``path`` is a lock this process holds now (another run in the same process).
    Judged by inode, without opening it: closing a second descriptor of the file would drop this
    process's lock where ``flock`` is emulated with POSIX locks (NFS)."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    for lock in _held:
        try:
            held = os.fstat(lock.fd)
        except (OSError, TypeError):
            continue
        if (held.st_dev, held.st_ino) == (st.st_dev, st.st_ino):
            return True
    return False


class _Probe:
    """The OS lock of an existing lock file, tried without waiting: ``state`` is 'held' (another
    process holds it: its owner is alive), 'free' (this probe holds it now, until closed),
    'unknown' (no ``flock`` here, or the file could not be opened) or 'gone' (removed meanwhile)."""

    def __init__(self, path: str, exclusive: bool, tries: int = 10):
        self.fd, self.state, self.age = None, "unknown", None
        for flags in ((os.O_RDWR, os.O_RDONLY) if exclusive else (os.O_RDONLY,)):
            try:
                self.fd = os.open(path, flags)
                break
            except FileNotFoundError:
                self.state = "gone"
                return
            except OSError:
                continue
        if self.fd is None:
            return
        try:
            self.age = time.time() - os.fstat(self.fd).st_mtime
        except OSError:
            pass
        mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH  # shared: two read-only checks never collide
        for i in range(tries):  # another job's check or take-over holds it for milliseconds; an owner for good
            try:
                fcntl.flock(self.fd, mode | fcntl.LOCK_NB)
                self.state = "free"
                return
            except BlockingIOError:
                self.state = "held"
            except OSError as e:
                if e.errno in (errno.EBADF,) and mode == fcntl.LOCK_EX:  # opened read-only (NFS wants write)
                    mode = fcntl.LOCK_SH
                    continue
                self.state = "unknown"
                return
            if i + 1 < tries:
                time.sleep(0.05)

    def record(self, path: str) -> dict | None:
        return _read_fd(self.fd) if self.fd is not None else _read(path)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _heartbeat_note(age: float | None) -> str:
    if age is None:
        return ""
    return f"its heartbeat was refreshed {max(age, 0):.0f} s ago"


def stale_reason(owner: dict | None, me: dict, probe_state: str = "unknown", age: float | None = None) -> str | None:
    """Why the lock's owner is provably gone (None: it may be running). ``probe_state`` is what its
    OS lock said (:class:`_Probe`), ``age`` the seconds since its heartbeat."""
    if not owner or probe_state == "held":
        return None
    same_kernel = owner.get("boot_id") is not None and owner.get("boot_id") == me["boot_id"]
    same_pids = same_kernel and owner.get("pid_namespace") is not None and owner["pid_namespace"] == me["pid_namespace"]
    pid = owner.get("pid")
    if same_pids and pid == me["pid"]:
        return "it was left by this process (an earlier run in it that ended without releasing it)"
    if same_kernel and owner.get("os_lock") == "flock" and probe_state == "free":
        return "no process holds its lock any more (its process has ended)"
    if same_pids and owner.get("os_lock") != "flock" and isinstance(pid, int):  # no flock there: the PID answers
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return f"its process {pid} is no longer running"
        except PermissionError:
            pass  # running, under another user
        start = _proc_start(pid)
        if owner.get("proc_start") is not None and start is not None and start != owner["proc_start"]:
            return f"its process {pid} is gone (that PID now belongs to another process)"
    if owner.get("heartbeat_s") is not None and age is not None and age > STALE_S:
        return (f"its heartbeat stopped {age / 60:.0f} min ago (a running job refreshes it every "
                f"{owner['heartbeat_s']:.0f} s)")
    mine, theirs = me["job"], owner.get("job") or {}
    if mine.get("slurm_job_id") and (theirs.get("slurm_job_id"), theirs.get("slurm_step_id")) == \
            (mine["slurm_job_id"], mine.get("slurm_step_id")):  # one step has one first rank: this is an earlier run
        return f"it was left by an earlier run of SLURM job {mine['slurm_job_id']} (requeued)"
    return None


def _why_alive(owner: dict | None, probe_state: str, age: float | None) -> str:
    if probe_state == "held":
        return "a process still holds its lock"
    if owner and "token" not in owner:
        return "it was written by a dchag from before lock heartbeats, whose owner cannot be checked"
    note = _heartbeat_note(age)
    return f"{note} (taken over once it is {STALE_S / 60:.0f} min old)" if note else "its owner cannot be checked"


def _refusal(save_dir: str, path: str, owner: dict | None, why: str = "") -> CheckpointError:
    if owner is None:
        return CheckpointError(f"--save {save_dir} has a lock file ({path}) that cannot be read. If no job is writing to "
                               f"that folder, remove {path} and start again; otherwise choose another --save folder.")
    why = f"; {why}" if why else ""
    return CheckpointError(
        f"--save {save_dir} is in use by another job ({describe(owner)}: {path}{why}); two jobs writing one folder "
        f"overwrite each other's checkpoints. Wait for it to end, or choose another --save folder. If that job is "
        f"gone (e.g. its node died), remove {path} and start again.")


class SaveLock:
    """The lock this process holds: its record, the open descriptor that holds the OS lock, and the
    thread that refreshes the heartbeat."""

    def __init__(self, save_dir: str, record: dict, created_dir: bool, fd: int):
        self.save_dir, self.path, self.record, self.created_dir, self.fd = \
            save_dir, os.path.join(save_dir, LOCK), record, created_dir, fd
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, name="dchag-lock-heartbeat", daemon=True)
        self._beat.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.fd)  # through the held descriptor: never opens the file again
            except OSError:
                pass  # a file system that stopped answering: the training's own writes will say so

    def _is_ours(self) -> bool:
        """The file at the lock's path is the one this process created (same inode)."""
        try:
            here, held = os.stat(self.path), os.fstat(self.fd)
        except OSError:
            return False
        return (here.st_dev, here.st_ino) == (held.st_dev, held.st_ino) and \
            (_read_fd(self.fd) or {}).get("token") == self.record["token"]

    def release(self) -> None:
        """Remove the lock if it is still this process's; a --save folder this run created and left
        empty is removed too (a refused start leaves nothing behind). Never raises: it runs on the
        way out of errors that matter more (a file system that turned read-only is named by the save)."""
        if self in _held:
            _held.remove(self)
        self._stop.set()
        if self.fd is None:
            return
        try:
            if self._is_ours():
                os.remove(self.path)
        except OSError:
            pass  # left behind: the next job sees no process holding it and takes it over
        finally:
            try:
                os.close(self.fd)  # drops the OS lock (after the file is gone: no one takes a lock being removed)
            except OSError:
                pass
            self.fd = None
        if self.created_dir:
            try:
                os.rmdir(self.save_dir)  # only when empty
            except OSError:
                pass


def _flock_supported(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new file: only "unsupported" can fail
    except OSError as e:
        if e.errno not in _NO_FLOCK:
            raise
        return False
    fcntl.flock(fd, fcntl.LOCK_UN)
    return True


def _hold(path: str, os_lock: str | None) -> int:
    """A descriptor of ``path`` kept for the run, holding its OS lock. Read-only where the file
    system allows it (a writable descriptor held for days would keep the file system from being
    remounted read-only); NFS wants a writable one for an exclusive lock (EBADF otherwise)."""
    fd = os.open(path, os.O_RDONLY)
    if os_lock != "flock":
        return fd
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return fd
    except OSError as e:
        os.close(fd)
        if e.errno != errno.EBADF:
            raise
    fd = os.open(path, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def _create(path: str, record: dict) -> int | None:
    """Create ``path`` holding ``record`` unless it exists (atomically), holding its OS lock from
    before it appears; returns the open descriptor (the lock lives as long as it), or None."""
    tmp = f"{path}.{record['host']}.{record['pid']}.{record['token'][:8]}.tmp"
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    held = -1
    try:
        try:
            record["os_lock"] = "flock" if _flock_supported(fd) else None
            os.write(fd, json.dumps(record, indent=1).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        held = _hold(tmp, record["os_lock"])  # locked before the file appears under its name
        try:
            os.link(tmp, path)  # fails if path exists; atomic on local and network file systems
        except FileExistsError:
            return None
        except OSError:  # no hard links here: exclusive create instead
            return _create_exclusive(path, record)
        fd, held = held, -1
        return fd
    finally:
        if held >= 0:
            os.close(held)
        os.remove(tmp)


def _create_exclusive(path: str, record: dict) -> int | None:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return None
    try:  # locked at once: the file is visible from its creation
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        record["os_lock"] = None
    os.write(fd, json.dumps(record, indent=1).encode())
    os.fsync(fd)
    return fd


def acquire(save_dir: str, log=print) -> SaveLock:
    """Take the lock of ``save_dir`` (creating the folder), taking over a stale one with a message;
    raises :class:`CheckpointError` naming the owner when another job holds it. Call on one rank."""
    created = not os.path.isdir(save_dir)
    path, me = os.path.join(save_dir, LOCK), owner_record()
    for _ in range(5):
        try:
            os.makedirs(save_dir, exist_ok=True)
            fd = _create(path, me)
        except OSError as e:
            raise CheckpointError(f"cannot write to --save {save_dir}: creating its lock file {path} failed: "
                                  f"{cause_of(e, path)}. Make the folder writable (read-only, immutable or another "
                                  "user's?), or choose another --save folder.") from e
        if fd is not None:
            lock = SaveLock(save_dir, me, created, fd)
            _held.append(lock)
            return lock
        if _held_here(path):
            raise CheckpointError(f"--save {save_dir} is already locked by this process (an earlier run in it "
                                  "that is still going); one run per folder at a time.")
        probe = _Probe(path, exclusive=True)  # held through the take-over: a second taker sees it held
        try:
            if probe.state == "gone":
                continue  # released meanwhile
            owner = probe.record(path)
            reason = stale_reason(owner, me, probe.state, probe.age)
            if reason is None:
                if created and not os.listdir(save_dir):
                    os.rmdir(save_dir)
                raise _refusal(save_dir, path, owner, _why_alive(owner, probe.state, probe.age))
            aside = f"{path}.stale.{me['host']}.{me['pid']}.{me['token'][:8]}"
            try:
                os.rename(path, aside)  # only one taker succeeds with this file
            except FileNotFoundError:
                continue  # another job took it over first: look again
            if probe.fd is not None and os.stat(aside).st_ino != os.fstat(probe.fd).st_ino:
                try:  # a live job's lock replaced the stale one meanwhile: put it back
                    os.link(aside, path)
                except OSError:
                    pass
                os.remove(aside)
                continue
            os.remove(aside)
        finally:
            probe.close()
        log(f"> took over the lock of --save {save_dir} from {describe(owner)}: {reason}", flush=True)
    raise CheckpointError(f"could not take the lock {path}: other jobs keep taking it; is more than one job starting "
                          "on this --save folder?")


def check(save_dir: str) -> None:
    """Read-only check for a rank that does not take the lock: raises as :func:`acquire` would
    when another live job holds it (the lock of this job's own first rank passes)."""
    path, me = os.path.join(save_dir, LOCK), owner_record()
    if not os.path.exists(path) or _held_here(path):
        return
    owner = _read(path)
    if owner is None and not os.path.exists(path):  # released meanwhile
        return
    if owner is not None and _same_job(owner, me):
        return
    probe = _Probe(path, exclusive=False)
    try:
        owner = probe.record(path) if probe.state != "gone" else None
        if probe.state == "gone" or (owner is not None and stale_reason(owner, me, probe.state, probe.age)):
            return
        raise _refusal(save_dir, path, owner, _why_alive(owner, probe.state, probe.age))
    finally:
        probe.close()


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
