"""Checkpoint folders and the pointer file that names one.

``--save DIR`` holds ``DIR/iter_NNNNNNN/`` per saved iteration and ``DIR/latest`` (a text file
holding one such tag; ds_to_universal output: ``latest_universal``).
"""

from __future__ import annotations

import os
import re

TAG_RE = re.compile(r"^iter_(\d{7,})$")


def tag_for(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def iteration_of(tag: str) -> int | None:
    m = TAG_RE.match(tag)
    return int(m.group(1)) if m else None


def read_latest(directory: str, name: str = "latest") -> str | None:
    """The tag a pointer file names (``latest``; ds_to_universal output: ``latest_universal``)."""
    path = os.path.join(directory, name)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return f.read().strip()


def saved_iterations(directory: str | None, complete: bool = False) -> list[int]:
    """Iterations of the checkpoint folders under ``directory``; with ``complete``, only those
    every rank finished (``dchag_args.json`` is written after that, just before ``latest``)."""
    if not directory or not os.path.isdir(directory):
        return []
    out = []
    for name in os.listdir(directory):
        it = iteration_of(name)
        if it is None or not os.path.isdir(os.path.join(directory, name)):
            continue
        if complete and not os.path.exists(os.path.join(directory, name, "dchag_args.json")):
            continue
        out.append(it)
    return sorted(out)
