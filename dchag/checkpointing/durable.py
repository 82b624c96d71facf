"""Small files written so that a crash leaves either the old file or the new one, on disk."""

from __future__ import annotations

import os


def fsync_dir(folder: str) -> None:
    """Make a rename or a new file in ``folder`` durable (where the file system supports it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # not every file system syncs a directory
    finally:
        os.close(fd)


def fsync_tree(folder: str) -> None:
    """Every file and folder under ``folder`` on disk (before a rename publishes the folder: a crash
    after the rename must not leave empty or short files under the new name)."""
    for root, _, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(root)


def write_text(path: str, text: str) -> str:
    """Write ``path`` atomically: a temporary sibling (``.tmp``), fsynced, renamed over it."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path) or ".")
    return path


def write_json(path: str, doc) -> str:
    """``doc`` as indented JSON, written atomically (:func:`write_text`)."""
    import json
    return write_text(path, json.dumps(doc, indent=1) + "\n")


def read_json(path: str):
    """The JSON document at ``path``, or None when there is no such file (a damaged one raises
    ``ValueError``)."""
    import json
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)
