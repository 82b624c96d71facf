"""The data a checkpoint was trained on: ``DIR/iter_NNNNNNN/data_fingerprint.json`` (the document of
dchag/data/fingerprint.py: sizes, shapes, channel identities, sample counts and a digest of fixed
windows, per data source), written with every checkpoint and compared on resume.

A resume on changed data does not continue the run exactly (other samples, other statistics): it is
refused, naming what changed, unless ``--allow-data-change``; then the run goes on with the new data
normalized with the checkpoint's statistics, and the start-up summary says so. A checkpoint saved
before fingerprints were recorded resumes with one line saying that the data cannot be checked.

Contract: :func:`check_resume` is a pure file-system check (no process group, nothing written), the
same verdict on every rank, as dchag.checkpointing.compat's.
"""

from __future__ import annotations

import os

from dchag.checkpointing import durable
from dchag.checkpointing.errors import CheckpointError

FILE = "data_fingerprint.json"


def write(folder: str, doc: dict) -> str:
    return durable.write_json(os.path.join(folder, FILE), doc)


def read(folder: str) -> dict | None:
    """The fingerprint of a checkpoint folder, or None when it records none (saved before dchag did)."""
    path = os.path.join(folder, FILE)
    try:
        doc = durable.read_json(path)
        if doc is None:
            return None
        if not isinstance(doc, dict) or not isinstance(doc.get("sources"), dict):
            raise ValueError("it holds no per-source records")
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot load {folder}: {path} is damaged ({e}); the manifest check names what else "
                              "is, and which checkpoint is intact.") from e
    return doc


def check_resume(load_dir: str, tag: str, current: dict, allow_change: bool) -> tuple[str | None, bool]:
    """(a start-up note or None, whether the data changed) for resuming ``load_dir/tag`` on the data
    whose fingerprint is ``current``; raises :class:`CheckpointError` on changed data unless
    ``allow_change`` (--allow-data-change)."""
    from dchag.data.fingerprint import differences
    folder = os.path.join(load_dir, tag)
    saved = read(folder)
    if saved is None:
        return (f"{folder} records no data fingerprint (it was saved before dchag recorded one), so whether the data "
                "changed since cannot be checked."), False
    changes = differences(saved, current)
    if not changes:
        return None, False
    what = "; ".join(changes)
    decided = (" (the split's sample counts follow --valid-fraction and --lead-time too)"
               if all("samples" in c for c in changes) else "")
    if not allow_change:
        raise CheckpointError(
            f"cannot resume from {folder}: the data differs from the data it was trained on: {what}{decided}. A resume "
            "on other data does not continue the run (other samples, other statistics). Resume on the checkpoint's "
            "data, or add --allow-data-change to go on with this data (normalized with the checkpoint's "
            "statistics).")
    return (f"the data differs from the data {folder} was trained on ({what}); --allow-data-change: training goes "
            "on with this data, normalized with the checkpoint's statistics."), True
