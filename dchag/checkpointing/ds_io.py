"""How DeepSpeed's engine reads and writes checkpoint files in a dchag run.

DeepSpeed does its file I/O through a pluggable checkpoint engine (``engine.checkpoint_engine``;
by default ``TorchCheckpointEngine``: ``torch.save(obj, path)`` and
``torch.load(path, weights_only=False)``). :func:`install` wraps it:

- ``save`` writes through a Python file object and fsyncs it, so a failed write keeps its error
  number (no space, file too large, quota, permission) instead of torch's ``basic_ios::clear``;
  the failure is recorded, not raised, so this rank still joins DeepSpeed's collectives and every
  rank can agree on the outcome afterwards (:func:`dchag.checkpointing.engine.save`);
- ``load`` is :func:`dchag.checkpointing.pickles.load`: ``weights_only=True`` with the allowlist.

Everything else (``create``, ``commit``, ``is_decoupled`` ...) is DeepSpeed's. Only DeepSpeed's
default engine is wrapped.
"""

from __future__ import annotations

import os

import torch

from dchag.checkpointing import pickles


class CheckpointFiles:
    def __init__(self, inner):
        self.inner = inner
        self.failures: list[tuple[str, BaseException]] = []  # (path, error) of this rank's failed writes

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def makedirs(self, path, exist_ok=False):
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
    engine.checkpoint_engine = CheckpointFiles(current)
    return engine.checkpoint_engine
