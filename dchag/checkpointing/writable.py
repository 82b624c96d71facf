"""Can this job write to ``--save``? Found before anything heavy is imported (the pre-flight), by
trying: a file created and removed in the folder (or, for a folder still to be made, a folder
created and removed in its nearest existing parent). Permission bits alone do not say it: root
passes every permission check, and a read-only mount, an immutable folder (``chattr +i``) or a
pseudo file system refuses the write itself."""

from __future__ import annotations

import os
import socket

from dchag.checkpointing.errors import CheckpointError
from dchag.checkpointing.write_errors import cause_of

_FIX = "choose a folder this job can write to, or fix the folder (permissions, mount, chattr -i)"


def _probe_name() -> str:
    return f".dchag-write-probe.{socket.gethostname()}.{os.getpid()}"  # one per rank: ranks probe at once


def check_writable(save_dir: str | None, flag: str = "--save") -> None:
    """Raise :class:`CheckpointError` naming the cause unless a file can be written in ``save_dir``
    (created with its parents if missing). Leaves nothing behind."""
    if not save_dir:
        return
    folder = os.path.abspath(save_dir)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise CheckpointError(f"{flag} {save_dir} is a file, not a folder; {flag} names the folder the checkpoints go "
                              "into: choose another path.")
    if os.path.isdir(folder):
        probe = os.path.join(folder, _probe_name())
        try:
            os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            os.unlink(probe)
        except OSError as e:
            raise CheckpointError(f"cannot write to {flag} {save_dir}: creating a file there failed: "
                                  f"{cause_of(e, probe)}; {_FIX}.") from e
        return
    parent = os.path.dirname(folder)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise CheckpointError(f"cannot create {flag} {save_dir}: {parent} is a file, not a folder; choose another "
                              "path.")
    probe = os.path.join(parent, _probe_name())
    try:
        os.mkdir(probe)
        os.rmdir(probe)
    except OSError as e:
        raise CheckpointError(f"cannot create {flag} {save_dir}: creating a folder in {parent} failed: "
                              f"{cause_of(e, probe)}; {_FIX}.") from e
