"""Can this job write to ``--save``? Found before anything heavy is imported (the pre-flight), and
without writing anything (the pre-flight changes nothing, and another rank may be looking at the
folder): the kernel is asked with ``access(2)`` whether this process may create entries in the
folder, or, for a folder still to be made, in its nearest existing parent. That answer counts what
permission bits alone do not show: a read-only mount, an immutable folder (``chattr +i``, refused to
root too) and file systems that refuse new entries (``/proc``); on NFS the server answers.
"""

from __future__ import annotations

import os

from dchag.checkpointing.errors import CheckpointError

_FIX = "choose a folder this job can write to, or fix the folder (permissions, mount, chattr -i)"


def _why(folder: str) -> str:
    try:
        if os.statvfs(folder).f_flag & os.ST_RDONLY:
            return "read-only file system"
    except OSError:
        pass
    return "permission denied"


def check_writable(save_dir: str | None, flag: str = "--save") -> None:
    """Raise :class:`CheckpointError` naming the cause unless this process may create files in
    ``save_dir`` (or create ``save_dir`` with its parents)."""
    if not save_dir:
        return
    folder = os.path.abspath(save_dir)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise CheckpointError(f"{flag} {save_dir} is a file, not a folder; {flag} names the folder the checkpoints go "
                              "into: choose another path.")
    if os.path.isdir(folder):
        if not os.access(folder, os.W_OK | os.X_OK):
            raise CheckpointError(f"cannot write to {flag} {save_dir}: this job may not create files there "
                                  f"({_why(folder)}); {_FIX}.")
        return
    parent = os.path.dirname(folder)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise CheckpointError(f"cannot create {flag} {save_dir}: {parent} is a file, not a folder; choose another "
                              "path.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CheckpointError(f"cannot create {flag} {save_dir}: this job may not create folders in {parent} "
                              f"({_why(parent)}); {_FIX}.")
