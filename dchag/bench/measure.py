"""What a rank measures: memory, collective bytes, saved activations.

Memory (CPU). ``/proc/self/status`` gives the resident set (VmRSS) and its high-water mark
(VmHWM); writing ``5`` to ``/proc/self/clear_refs`` resets the mark to the current RSS, so a
step's peak is read exactly, per rank, at no cost. RSS follows live tensors only if freed
memory goes back to the OS: glibc otherwise keeps freed blocks in its heap and raises its mmap
threshold dynamically (up to 32 MiB) after large frees. The runner therefore starts ranks with
``MALLOC_MMAP_THRESHOLD_`` fixed (see :data:`MALLOC_ENV`): every block above it is its own
mapping, returned on free.

Collectives. :class:`CommCounter` wraps the ``torch.distributed`` collectives (and the aliases
megatron's mappings captured at import), and records for every call its kind, the phase it ran
in (``forward`` / ``backward`` / ``optimizer``, set with :func:`phase`), the group size, the
payload bytes and the bytes a rank sends under the ring algorithm:

    all_reduce        2 (n-1)/n * S      S = tensor bytes
    all_gather        (n-1) * s          s = this rank's input bytes
    reduce_scatter    (n-1)/n * S        S = input bytes
    all_to_all        (n-1)/n * S
    broadcast         (n-1)/n * S        (pipelined-ring average per rank)

Saved activations. :func:`count_saved_tensors` counts, with autograd's saved-tensor hooks, the
bytes of distinct storages saved for backward, excluding tensors that existed before (parameters,
input data): the activation memory a planner predicts.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading

import torch
import torch.distributed as dist

from dchag.planner.comm import ring_bytes_sent  # one definition for measurement and prediction

# Every allocation above 4 KiB is an mmap of its own, released to the OS on free (small
# parameters and activations otherwise reuse resident heap left by earlier cases and go
# uncounted); fixing the threshold also disables glibc's dynamic raise of it.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "4096", "MALLOC_TRIM_THRESHOLD_": "131072"}


@contextlib.contextmanager
def measurement_environment():
    """``MALLOC_ENV`` and one OpenMP thread for the ranks spawned inside (children inherit the
    environment at exec: malloc reads it at start-up); the environment restored after."""
    saved = {k: os.environ.get(k) for k in (*MALLOC_ENV, "OMP_NUM_THREADS")}
    os.environ.update(MALLOC_ENV)
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

MB = 1024 * 1024


# ----------------------------------------------------------------------------------- memory
def proc_status_kb(*fields: str) -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in fields:
                out[key] = int(value.split()[0])
    return out


def rss_bytes() -> int:
    return proc_status_kb("VmRSS")["VmRSS"] * 1024


def reset_peak() -> int:
    """Reset VmHWM to the current RSS; return that RSS (bytes)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return rss_bytes()


def peak_bytes() -> int:
    return proc_status_kb("VmHWM")["VmHWM"] * 1024


class PeakMemory:
    """``with PeakMemory() as m: step()`` -> ``m.before`` (RSS at reset), ``m.peak`` (VmHWM)."""

    def __enter__(self):
        self.before = reset_peak()
        return self

    def __exit__(self, *exc):
        self.peak = peak_bytes()
        return False

    @property
    def above(self) -> int:
        return self.peak - self.before


# ----------------------------------------------------------------------------- collectives
_PHASE = threading.local()


def current_phase() -> str:
    return getattr(_PHASE, "name", "other")


@contextlib.contextmanager
def phase(name: str):
    previous = current_phase()
    _PHASE.name = name
    try:
        yield
    finally:
        _PHASE.name = previous


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# name in torch.distributed -> (kind, function(args, kwargs) -> payload tensor or list)
_COLLECTIVES = {
    "all_reduce": ("all_reduce", lambda a, k: a[0] if a else k["tensor"]),
    "all_gather_into_tensor": ("all_gather", lambda a, k: a[1] if len(a) > 1 else k["input_tensor"]),
    "_all_gather_base": ("all_gather", lambda a, k: a[1] if len(a) > 1 else k["input_tensor"]),
    "all_gather": ("all_gather", lambda a, k: a[1] if len(a) > 1 else k["tensor"]),
    "reduce_scatter_tensor": ("reduce_scatter", lambda a, k: a[1] if len(a) > 1 else k["input"]),
    "_reduce_scatter_base": ("reduce_scatter", lambda a, k: a[1] if len(a) > 1 else k["input"]),
    "reduce_scatter": ("reduce_scatter", lambda a, k: a[1] if len(a) > 1 else k["input_list"]),
    "all_to_all_single": ("all_to_all", lambda a, k: a[1] if len(a) > 1 else k["input"]),
    "broadcast": ("broadcast", lambda a, k: a[0] if a else k["tensor"]),
}


class CommCounter:
    """Counts every collective while installed. ``records`` is a list of dicts
    ``{op, kind, phase, group_size, payload_bytes, sent_bytes, shape}``."""

    def __init__(self):
        self.records: list[dict] = []
        self._originals: dict = {}
        self._depth = threading.local()

    # -- install / uninstall
    def install(self) -> "CommCounter":
        if self._originals:
            return self
        for name, (kind, payload_of) in _COLLECTIVES.items():
            original = getattr(dist, name, None)
            if original is None:
                continue
            self._originals[(dist, name)] = original
            setattr(dist, name, self._wrap(name, kind, payload_of, original))
        # megatron captured these at import time (dist_all_gather_func = torch.distributed.x).
        try:
            from megatron.core.tensor_parallel import layers, mappings
            for module in (layers, mappings):
                for alias in ("dist_all_gather_func", "dist_reduce_scatter_func"):
                    original = getattr(module, alias, None)
                    if original is None:
                        continue
                    for name in _COLLECTIVES:
                        if self._originals.get((dist, name)) is original:
                            self._originals[(module, alias)] = original
                            setattr(module, alias, getattr(dist, name))
        except ImportError:  # pragma: no cover - megatron is a dependency
            pass
        return self

    def uninstall(self) -> None:
        for (owner, name), original in self._originals.items():
            setattr(owner, name, original)
        self._originals.clear()

    def __enter__(self):
        return self.install()

    def __exit__(self, *exc):
        self.uninstall()
        return False

    def _wrap(self, name, kind, payload_of, original):
        counter = self

        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            depth = getattr(counter._depth, "n", 0)
            if depth == 0:  # count the outermost call only (some collectives call others)
                counter._record(name, kind, payload_of(args, kwargs), kwargs.get("group", None)
                                if "group" in kwargs else _positional_group(name, args))
            counter._depth.n = depth + 1
            try:
                return original(*args, **kwargs)
            finally:
                counter._depth.n = depth

        wrapper._dchag_counted = True
        return wrapper

    def _record(self, name, kind, payload, group):
        tensors = payload if isinstance(payload, (list, tuple)) else [payload]
        nbytes = sum(_nbytes(t) for t in tensors)
        n = dist.get_world_size(group) if group is not None else dist.get_world_size()
        self.records.append({
            "op": name, "kind": kind, "phase": current_phase(), "group_size": n,
            "payload_bytes": nbytes, "sent_bytes": ring_bytes_sent(kind, nbytes, n),
            "shape": list(tensors[0].shape) if tensors else [],
        })

    # -- summaries
    def reset(self) -> None:
        self.records = []

    def summary(self) -> dict:
        """{phase: {"calls", "payload_bytes", "sent_bytes", "by_kind": {kind: {...}}}} over records
        with group size > 1 (a 1-rank collective moves nothing)."""
        out: dict = {}
        for r in self.records:
            if r["group_size"] <= 1:
                continue
            ph = out.setdefault(r["phase"], {"calls": 0, "payload_bytes": 0, "sent_bytes": 0.0, "by_kind": {}})
            kd = ph["by_kind"].setdefault(r["kind"], {"calls": 0, "payload_bytes": 0, "sent_bytes": 0.0})
            for d in (ph, kd):
                d["calls"] += 1
                d["payload_bytes"] += r["payload_bytes"]
                d["sent_bytes"] += r["sent_bytes"]
        return out


def _positional_group(name: str, args) -> object:
    """The ``group`` argument when passed positionally (torch's signatures)."""
    position = {"all_reduce": 2, "all_gather_into_tensor": 2, "_all_gather_base": 2, "all_gather": 2,
                "reduce_scatter_tensor": 3, "_reduce_scatter_base": 3, "reduce_scatter": 3,
                "all_to_all_single": 5, "broadcast": 2}[name]
    return args[position] if len(args) > position else None


# ------------------------------------------------------------------------ saved activations
def storage_key(t: torch.Tensor):
    """Identity of a tensor's storage that works for real and fake tensors (views share it)."""
    from torch.multiprocessing.reductions import StorageWeakRef
    return StorageWeakRef(t.untyped_storage())


@contextlib.contextmanager
def count_saved_tensors(exclude: list[torch.Tensor] | tuple = ()):
    """Count bytes of distinct storages autograd saves for backward inside the block (real or
    fake tensors: the benchmark and the scale simulation count alike).

    ``exclude``: tensors that exist anyway (parameters, inputs); their storages are not counted.
    Yields a dict filled on exit: ``{"bytes", "tensors"}``.
    """
    skip = {storage_key(t) for t in exclude}
    seen: dict = {}

    def pack(t):
        if isinstance(t, torch.Tensor):  # fake tensors report their fake device, not "meta"
            key = storage_key(t)
            if key not in skip and key not in seen:
                seen[key] = t.untyped_storage().nbytes()
        return t

    result = {"bytes": 0, "tensors": 0}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield result
    result["bytes"] = sum(seen.values())
    result["tensors"] = len(seen)
