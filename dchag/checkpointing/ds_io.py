"""How DeepSpeed's engine reads and writes checkpoint files in a dchag run.

DeepSpeed does its file I/O through a pluggable checkpoint engine (``engine.checkpoint_engine``;
by default ``TorchCheckpointEngine``: ``torch.save(obj, path)`` and
``torch.load(path, weights_only=False)``). :func:`install` wraps it:

- ``save`` writes through a Python file object and fsyncs it, so a failed write keeps its error
  number (no space, file too large, quota, permission) instead of torch's ``basic_ios::clear``;
  the failure is recorded, not raised, so this rank still joins DeepSpeed's collectives and every
  rank can agree on the outcome afterwards (:func:`dchag.checkpointing.engine.save`);
- ``load`` is :func:`dchag.checkpointing.pickles.load`: ``weights_only=True`` with the allowlist.

DeepSpeed also copies its helper scripts (``zero_to_fp32.py``, ``zero_to_torch.py``) into the
``--save`` folder on rank 0 with a plain ``shutil.copyfile``, outside the checkpoint engine: a
failure there (a file system turned read-only) was DeepSpeed's raw ``OSError`` on rank 0 while the
other ranks waited. :func:`install` routes that copy through the same recorded, fsynced write.

Everything else (``create``, ``commit``, ``is_decoupled`` ...) is DeepSpeed's. Only DeepSpeed's
default engine is wrapped.
"""

from __future__ import annotations

import functools
import os
import shutil
import stat

import torch

from dchag.checkpointing import pickles


class CheckpointFiles:
    def __init__(self, inner):
        self.inner = inner
        self.failures: list[tuple[str, BaseException]] = []  # (path, error) of this rank's failed writes

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def makedirs(self, path, exist_ok=False):
        if self.failures:  # the checkpoint has failed already: one failure is enough to name
            return
        try:
            self.inner.makedirs(path, exist_ok=exist_ok)
        except OSError as e:
            self.failures.append((path, e))

    def save(self, state_dict, path: str):
        if self.failures:  # the checkpoint has failed already: write nothing more
            return
        try:
            with open(path, "wb") as f:
                torch.save(state_dict, f, _use_new_zipfile_serialization=getattr(self.inner, "zipfile_serialization",
                                                                                 True))
                f.flush()
                os.fsync(f.fileno())
        except Exception as e:  # noqa: BLE001 - recorded with its cause; every rank raises together later
            self.failures.append((path, e))

    def load(self, path: str, map_location=None):
        return pickles.load(path, map_location=map_location)

    def copy_script(self, src: str, dst: str) -> None:
        """DeepSpeed's helper-script copy, written like a checkpoint file (fsynced, failure recorded)."""
        if self.failures:
            return
        try:
            with open(src, "rb") as fi, open(dst, "wb") as fo:
                shutil.copyfileobj(fi, fo)
                fo.flush()
                os.fsync(fo.fileno())
            os.chmod(dst, os.stat(dst).st_mode | stat.S_IEXEC)
        except OSError as e:
            self.failures.append((dst, e))


def _copy_recovery_scripts(engine, files: CheckpointFiles, save_path: str) -> None:
    """``DeepSpeedEngine._copy_recovery_script`` through :meth:`CheckpointFiles.copy_script`."""
    import deepspeed.utils
    folder = os.path.dirname(deepspeed.utils.__file__)
    for script in ("zero_to_fp32.py", "zero_to_torch.py"):
        if os.path.exists(os.path.join(folder, script)):
            files.copy_script(os.path.join(folder, script), os.path.join(save_path, script))


def install(engine) -> CheckpointFiles | None:
    """Wrap ``engine.checkpoint_engine`` (once) when it is DeepSpeed's default torch engine; returns
    the wrapper. Another engine chosen in the JSON (decoupled, fast, Nebula) is left as it is
    (None): its writes keep their own behaviour, and loads are still vetted first (``engine._vet``)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    current = engine.checkpoint_engine
    if isinstance(current, CheckpointFiles):
        return current
    if type(current) is not TorchCheckpointEngine:
        return None
    engine.checkpoint_engine = files = CheckpointFiles(current)
    if hasattr(engine, "_copy_recovery_script"):
        engine._copy_recovery_script = functools.partial(_copy_recovery_scripts, engine, files)
    return files
