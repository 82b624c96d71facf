"""Checkpoint integrity: a manifest of every file's size and SHA-256.

``DIR/iter_NNNNNNN/manifest.json``::

    {"format": "dchag-checkpoint-manifest", "version": 1, "algorithm": "sha256",
     "files": {"mp_rank_00_model_states.pt": {"size": 1234, "sha256": "..."}, ...}}

Written after every rank finished its files and before ``latest`` names the folder; checked
by ``--load``, by the conversion tool and by ``tools/convert_checkpoint.py --verify``. A size
check catches truncation; the checksum catches any changed byte (a bit flipped inside a
tensor included). Hashing is split over the ranks (each hashes every world-th file).
"""

from __future__ import annotations

import hashlib
import json
import os

from dchag.checkpointing import durable
from dchag.checkpointing.errors import CheckpointError

MANIFEST = "manifest.json"
FORMAT = "dchag-checkpoint-manifest"
_CHUNK = 1 << 22


class IntegrityError(CheckpointError):
    """A checkpoint file is missing, truncated or changed since it was saved."""


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def list_files(folder: str) -> list[str]:
    """Every file under ``folder`` (relative, '/'-separated, sorted), the manifest excluded."""
    out = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/")
            if rel != MANIFEST and not rel.endswith(".tmp"):
                out.append(rel)
    return sorted(out)


def describe(folder: str, files: list[str]) -> dict:
    """{relative path: {"size", "sha256"}} of ``files`` under ``folder``."""
    return {rel: {"size": os.path.getsize(os.path.join(folder, rel)), "sha256": sha256_file(os.path.join(folder, rel))}
            for rel in files}


def write_manifest(folder: str, entries: dict | None = None) -> str:
    """Write ``folder/manifest.json`` atomically (``entries`` default: hash every file now)."""
    entries = describe(folder, list_files(folder)) if entries is None else entries
    doc = {"format": FORMAT, "version": 1, "algorithm": "sha256", "files": dict(sorted(entries.items()))}
    return durable.write_text(os.path.join(folder, MANIFEST), json.dumps(doc, indent=1) + "\n")


def read_manifest(folder: str) -> dict | None:
    """The manifest's file table, or None when the folder has no manifest."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            doc = json.load(f)
        if doc.get("format") != FORMAT or not isinstance(doc.get("files"), dict):
            raise ValueError("not a dchag checkpoint manifest")
        return doc["files"]
    except (OSError, ValueError) as e:
        raise IntegrityError(f"{path} is damaged ({e}); the checkpoint cannot be checked. Load an earlier "
                             "checkpoint (--ckpt-step N), or rewrite the manifest only if you know the files "
                             "are intact.") from e


def check_files(folder: str, table: dict, files: list[str]) -> list[str]:
    """Problems (one line each, naming the file) of ``files`` against the manifest ``table``."""
    problems = []
    for rel in files:
        want = table[rel]
        path = os.path.join(folder, rel)
        if not os.path.exists(path):
            problems.append(f"{rel} is missing")
            continue
        size = os.path.getsize(path)
        if size != want["size"]:
            problems.append(f"{rel} is {size} bytes but was saved with {want['size']} (truncated or overwritten)")
        elif sha256_file(path) != want["sha256"]:
            problems.append(f"{rel} has a different SHA-256 than when it was saved (its contents changed: a "
                            "damaged disk, a bad copy or an edit)")
    return problems


def verify(folder: str, require: bool = True, rank: int = 0, world: int = 1) -> list[str]:
    """Check ``folder`` against its manifest; this process checks every ``world``-th file from
    ``rank``. Returns the problems (empty: intact). With ``require``, a folder without a
    manifest is a problem; without, it passes unchecked (checkpoints saved before manifests)."""
    table = read_manifest(folder)
    if table is None:
        return [f"{folder} has no {MANIFEST}"] if require else []
    return check_files(folder, table, sorted(table)[rank::world])


def raise_problems(folder: str, problems: list[str], hint: str = "") -> None:
    if problems:
        more = f" (and {len(problems) - 1} more problem(s): {'; '.join(problems[1:4])})" if len(problems) > 1 else ""
        raise IntegrityError(f"checkpoint {folder} is damaged: {problems[0]}{more}. "
                             + (hint or "Restore the file from a copy, or use an earlier checkpoint."))


# ----------------------------------------------------------------------------------------------
# Collective versions, for the training loop (every rank calls them).

def write_manifest_distributed(folder: str) -> list[tuple[str, BaseException]]:
    """Every rank hashes a share of the files; rank 0 writes the manifest, only when every file
    was hashed. Call after every rank's files are written (and before ``latest`` is replaced).
    Returns this rank's failures (path, error) instead of raising: a raise on one rank would
    leave the others waiting, so the caller agrees on them (``dchag.checkpointing.engine``)."""
    import torch.distributed as dist
    rank, world = dist.get_rank(), dist.get_world_size()
    files = [list_files(folder) if rank == 0 else None]
    dist.broadcast_object_list(files, src=0)
    failures = []
    try:
        mine = describe(folder, files[0][rank::world])
    except OSError as e:
        mine, failures = {}, [(getattr(e, "filename", None) or folder, e)]
    every = [None] * world if rank == 0 else None
    dist.gather_object(mine, every, dst=0)
    if rank == 0:
        entries = {}
        for part in every:
            entries.update(part)
        if set(entries) == set(files[0]):  # otherwise a rank failed: no manifest, the save is not complete
            try:
                write_manifest(folder, entries)
            except OSError as e:
                failures.append((os.path.join(folder, MANIFEST), e))
    return failures


def verify_distributed(folder: str, hint: str | None = None) -> bool:
    """Check ``folder`` against its manifest, the files split over the ranks; raises
    :class:`IntegrityError` on every rank (naming the damaged file) if any rank found a problem.
    Returns False when the checkpoint has no manifest (saved before manifests existed).
    ``hint``: a callable giving what to do instead (called only when something is damaged)."""
    import torch.distributed as dist
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        has = read_manifest(folder) is not None
        problems = verify(folder, require=False, rank=rank, world=world)
    except IntegrityError as e:
        has, problems = True, [str(e)]
    every = [None] * world
    dist.all_gather_object(every, problems)
    found = [p for part in every for p in part]
    raise_problems(folder, found, hint() if found and callable(hint) else
                   "Restore the file from a copy, or load an earlier checkpoint with --ckpt-step N.")
    return has
