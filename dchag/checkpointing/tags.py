"""Checkpoint folders, when one is complete, and the pointer file that names one.

``--save DIR`` holds ``DIR/iter_NNNNNNN/`` per saved iteration and ``DIR/latest`` (a text file
holding one such tag; ds_to_universal output: ``latest_universal``).

**A checkpoint is complete when its manifest is written** (``manifest.json``, the last file of
the folder a save writes, after every rank finished). A folder without one is an interrupted
save. Resume, the overwrite check, recovery and the converter all judge it this way.
"""

from __future__ import annotations

import os
import re

from dchag.checkpointing.errors import CheckpointError
from dchag.checkpointing.manifest import MANIFEST

TAG_RE = re.compile(r"^iter_(\d{7,})$")
_POINTER_MAX = 4096  # a tag is ~12 bytes; a bigger pointer file is something else


def tag_for(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def iteration_of(tag: str) -> int | None:
    m = TAG_RE.match(tag)
    return int(m.group(1)) if m else None


def is_complete(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, MANIFEST))


def is_universal_folder(folder: str) -> bool:
    """ds_to_universal output (a zero/ folder of per-parameter files): another tool's folder,
    complete without a manifest of ours."""
    return os.path.isdir(os.path.join(folder, "zero"))


def is_universal(load_dir: str | None) -> bool:
    """A run folder written by ``tools/convert_checkpoint.py --format universal``
    (``latest_universal``, no ``latest``)."""
    return bool(load_dir) and read_latest(load_dir) is None and read_latest(load_dir, "latest_universal") is not None


def saved_iterations(directory: str | None, complete: bool = False) -> list[int]:
    """Iterations of the checkpoint folders under ``directory``; with ``complete``, only the
    complete ones (with a manifest)."""
    if not directory or not os.path.isdir(directory):
        return []
    out = []
    for name in os.listdir(directory):
        it = iteration_of(name)
        if it is None or not os.path.isdir(os.path.join(directory, name)):
            continue
        if complete and not is_complete(os.path.join(directory, name)):
            continue
        out.append(it)
    return sorted(out)


def interrupted_iterations(directory: str | None) -> list[int]:
    """Iterations whose folder has no manifest (and is not ds_to_universal output): saves that
    did not finish."""
    complete = set(saved_iterations(directory, complete=True))
    return [i for i in saved_iterations(directory)
            if i not in complete and not is_universal_folder(os.path.join(directory, tag_for(i)))]


def check_own(directory: str, name: str) -> None:
    """Refuse ``directory/name`` (a checkpoint folder or a pointer file) when it is a symbolic link
    that leaves ``directory``, or an ``iter_N`` that leads to another checkpoint: a run folder holds
    its own checkpoints. Such a link would be resumed, converted or fine-tuned from as this run's,
    and a resume with ``--save`` there would write into the other run's folder."""
    path = os.path.join(directory, name)
    if not os.path.islink(path):
        return
    target = os.path.realpath(path)
    inside = os.path.dirname(target) == os.path.realpath(directory)
    if inside and (not TAG_RE.match(name) or os.path.basename(target) == name):
        return
    where = f"another checkpoint of the same folder ({os.path.basename(target)})" if inside else \
        f"{target}, outside {directory}"
    raise CheckpointError(f"{path} is a symbolic link to {where}: a run folder's {name} must be its own "
                          f"(a link would be loaded as this run's {'checkpoint' if TAG_RE.match(name) else 'pointer'}, "
                          f"and a resume would save into the other folder). Name the folder it lives in instead "
                          f"({os.path.dirname(target)}), or replace the link with a copy.")


def _describe(raw: bytes) -> str | None:
    """What is wrong with a pointer file's bytes, or None when they are one line of text."""
    if not raw.strip():
        return f"is empty ({len(raw)} bytes)"
    if len(raw) > _POINTER_MAX:
        return f"holds more than {_POINTER_MAX} bytes ({raw[:16].hex(' ')} ...), not a checkpoint tag"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is None or any(not c.isprintable() for c in text.strip()):
        return f"holds {len(raw)} bytes of binary data (starting {raw[:16].hex(' ')}), not a checkpoint tag"
    return None


def ckpt_step_hint(directory: str, iteration: int) -> str:
    """How training picks a checkpoint of ``directory`` instead of the one ``latest`` names."""
    return f"pass --ckpt-step N to load one (e.g. --ckpt-step {iteration})"


def folder_hint(directory: str, iteration: int) -> str:
    """How the converter and a fine-tune pick one (they take a checkpoint folder, not --ckpt-step)."""
    return f"name one of them instead of the run folder (e.g. {os.path.join(directory, tag_for(iteration))})"


def read_latest(directory: str, name: str = "latest", pick=ckpt_step_hint) -> str | None:
    """The tag a pointer file names (``latest``; ds_to_universal output: ``latest_universal``), or
    None when there is no such file. Refuses (:class:`CheckpointError`, the content described)
    an empty, binary or foreign pointer, and a tag that leads out of ``directory``; ``pick``
    (directory, iteration) -> how the caller's command loads another checkpoint instead."""
    path = os.path.join(directory, name)
    if not os.path.lexists(path):
        return None
    check_own(directory, name)
    problem = None
    if os.path.isdir(path):
        link = f" (a symbolic link to {os.path.realpath(path)})" if os.path.islink(path) else ""
        problem = f"is a folder{link}, not the one-line file naming a checkpoint (e.g. iter_0000100)"
        raw = b""
    elif not os.path.exists(path):
        problem = f"is a symbolic link to {os.path.realpath(path)}, which does not exist"
        raw = b""
    else:
        try:
            with open(path, "rb") as f:
                raw = f.read(_POINTER_MAX + 1)
        except OSError as e:
            raise CheckpointError(f"cannot read {path} ({e}).") from e
    problem = problem or _describe(raw)
    tag = None if problem else raw.decode("utf-8").strip()
    if tag is not None:
        if "/" in tag or "\\" in tag or tag in (".", "..") or os.path.isabs(tag):
            problem = f"names {tag!r}, a folder outside {directory} (a pointer names one of the folder's own checkpoints)"
        elif name == "latest" and not TAG_RE.match(tag):  # ds_to_universal names its output folder freely
            problem = f"holds {tag[:80]!r}, not a checkpoint tag of pretrain_dchag.py (iter_NNNNNNN)"
    if problem:
        complete = saved_iterations(directory, complete=True)
        have = (f"complete checkpoints there: {', '.join(tag_for(i) for i in complete[-3:])}; "
                f"{pick(directory, complete[-1])}" if complete else "there is no complete checkpoint there")
        raise CheckpointError(f"{path} {problem}: it is damaged or was written by something else; {have}.")
    return tag


def resume_point(directory: str, universal: bool = False, pick=ckpt_step_hint) -> tuple[str | None, str | None]:
    """(tag, note): the checkpoint a resume from ``directory`` continues from, and a note when it
    is not the one the pointer names. That is the newest complete checkpoint: the pointer's, or a
    newer complete one (a save stopped after its manifest, before the pointer), or the newest
    complete one when the pointer is missing or names an interrupted save. (None, None): there is
    no complete checkpoint. ``universal``: ``latest_universal`` is a pointer too (ds_to_universal
    output, whose folder has no manifest of ours). Raises on a damaged pointer, saying how to pick
    another checkpoint with ``pick`` (see :func:`read_latest`)."""
    pointer = read_latest(directory, pick=pick) or \
        (read_latest(directory, "latest_universal", pick) if universal else None)
    complete = saved_iterations(directory, complete=True)
    newest = tag_for(complete[-1]) if complete else None
    if pointer is None:
        note = f"> {directory} has no 'latest' file, but {newest} is complete (a save was stopped before writing it)"
        return (newest, note) if newest else (None, None)
    folder = os.path.join(directory, pointer)
    check_own(directory, pointer)
    if not os.path.isdir(folder):
        how = f"; {pick(directory, complete[-1])}" if complete else ""
        raise CheckpointError(f"{os.path.join(directory, 'latest')} names {pointer!r}, which is not a folder there: the "
                              f"checkpoint was moved or deleted (complete checkpoints: "
                              f"{', '.join(tag_for(i) for i in complete[-5:]) or 'none'}{how}).")
    usable = is_complete(folder) or is_universal_folder(folder)
    it = iteration_of(pointer)
    if usable and (newest is None or it is None or complete[-1] <= it):
        return pointer, None
    if newest is None:
        return None, None
    check_own(directory, newest)
    why = ("a save wrote it completely but was stopped before updating latest" if usable else
           f"{pointer} is an interrupted save, without {MANIFEST}")
    return newest, f"> {directory}/latest names {pointer}, but the newest complete checkpoint is {newest} ({why})"
