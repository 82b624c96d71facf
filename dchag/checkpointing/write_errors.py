"""Why a checkpoint write failed, in words: no space, file too large, quota, permission.

Writes go through Python file objects (see :mod:`ds_io`), so the operating system's error number
reaches us (torch's own file writer turns it into ``basic_ios::clear: iostream error``); Rust
writers (safetensors) put it in their message. When an error carries no number, the cause is
found by looking at the file system: free space, the process's file-size limit (``ulimit -f``)
and write permission.
"""

from __future__ import annotations

import errno
import os
import re
import resource

_CAUSES = {
    errno.ENOSPC: "no space left on the device",
    errno.EFBIG: "file too large",
    errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
    errno.EIO: "input/output error (a failing disk or a lost network file system)",
}


def _free_bytes(path: str) -> int | None:
    folder = path if os.path.isdir(path) else os.path.dirname(path) or "."
    while folder and not os.path.exists(folder):
        folder = os.path.dirname(folder)
    try:
        st = os.statvfs(folder or ".")
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def _mb(n: int) -> str:
    return f"{n / 2**10:,.0f} KB" if n < 2**20 else f"{n / 2**20:,.1f} MB"


def file_size_limit() -> int | None:
    """The process's file-size limit in bytes (``ulimit -f``), or None when unlimited."""
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    return None if soft == resource.RLIM_INFINITY else soft


def _largest_file(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    sizes = [os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files]
    return max(sizes, default=0)


def os_code(exc: BaseException, path: str) -> int | None:
    """The operating-system error behind a failed write of ``path`` (a file, or a folder being
    written), or None when the file system shows none."""
    for e in (exc, exc.__cause__, exc.__context__):
        if isinstance(e, OSError) and e.errno is not None:
            return e.errno
    m = re.search(r"\(os error (\d+)\)", str(exc))  # Rust's io::Error (safetensors)
    if m:
        return int(m.group(1))
    limit, free = file_size_limit(), _free_bytes(path)
    if limit is not None and _largest_file(path) >= limit:
        return errno.EFBIG
    if free is not None and free < 1 << 20:
        return errno.ENOSPC
    folder = path if os.path.isdir(path) else os.path.dirname(path) or "."
    if os.path.isdir(folder) and not os.access(folder, os.W_OK):
        return errno.EACCES
    return None


def cause_of(exc: BaseException, path: str) -> str:
    """One phrase: what went wrong writing ``path``, with the figure that shows it."""
    code = os_code(exc, path)
    if code == errno.EFBIG:
        limit = file_size_limit()
        return (f"file too large: over this process's file-size limit of {_mb(limit)} (ulimit -f {limit // 1024})"
                if limit is not None else "file too large for the file system")
    if code == errno.ENOSPC:
        free = _free_bytes(path)
        return _CAUSES[code] + (f" ({_mb(free)} free)" if free is not None else "")
    if code in _CAUSES:
        return _CAUSES[code]
    if code is not None:
        return f"{os.strerror(code).lower()} (errno {code})"
    return f"{type(exc).__name__}: {exc}"
