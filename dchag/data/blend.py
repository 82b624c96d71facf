"""A blend of data sources: ``--data-path`` in Megatron's syntax, the sources' names, and which
source each training step reads. Pure arithmetic over numbers and strings (no torch: the
pre-flight uses it).

    --data-path A                     one source: exactly as without blends
    --data-path 0.4 A 0.3 B 0.3 C     weights, then paths (normalized to sum 1)
    --data-path A B C                 weights in proportion to the sources' training samples

**One source per step.** Every global batch (training step) reads one source, so every rank of the
step runs the same source (its channels partitioned over the channel-parallel group as that source's
own run would be): no padding, no idle rank. Step i's source is Megatron's blending rule applied to
steps: the source whose realized count lags its weight most,

    s(i) = argmax_s  w_s (i + 1) - n_s(i)        (ties to the lowest index)

with n_s(i) the steps source s got before step i; its samples are the next global batch of that
source's own sample stream (``dchag.data.sampler.SampleOrder`` with the source's seed
``(seed, s)``). Which samples a step reads is therefore a function of (weights, seed, consumed
samples) only: the same at any T, P, DP and micro-batch size, and exact on resume anywhere in the
blend. The greedy rule keeps every source's realized count within one step of w_s i.
The price: each step's gradient comes from one sensor.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

from .errors import DataError
from .readers.detect import split_selector


@dataclass(frozen=True)
class BlendSpec:
    """``--data-path`` parsed: the paths and, when given, their weights (normalized)."""
    paths: tuple[str, ...]
    weights: tuple[float, ...] | None  # None: in proportion to the sources' training samples

    @property
    def is_blend(self) -> bool:
        return len(self.paths) > 1


def is_blend(data_path) -> bool:
    """Whether ``args.data_path`` names several sources (``parse_args`` keeps one path a string)."""
    return not isinstance(data_path, str) and data_path is not None and len(data_path) > 1


def _number(token: str) -> float | None:
    try:
        return float(token)
    except ValueError:
        return None


def parse_data_path(tokens) -> BlendSpec:
    """``--data-path`` tokens -> BlendSpec (Megatron's rule: when the first token is a number, the
    tokens are weight-path pairs; else all are paths)."""
    tokens = [tokens] if isinstance(tokens, str) else [str(t) for t in tokens]
    if not tokens:
        raise DataError("--data-path needs a path (or weights and paths: --data-path 0.4 A 0.3 B 0.3 C).")
    if len(tokens) == 1 or _number(tokens[0]) is None:
        numbers = [t for t in tokens if _number(t) is not None]
        if len(tokens) > 1 and numbers:
            raise DataError(f"--data-path {' '.join(tokens)}: {numbers[0]!r} looks like a weight, but the first token "
                            "is a path; give a weight before every path (--data-path 0.4 A 0.3 B 0.3 C) or none "
                            "(--data-path A B C: in proportion to the sources' sample counts).")
        return BlendSpec(tuple(tokens), None)
    if len(tokens) % 2:
        raise DataError(f"--data-path {' '.join(tokens)}: weights and paths come in pairs (W1 P1 W2 P2 ...), but "
                        f"{len(tokens)} tokens were given; give a weight before every path.")
    weights, paths = tokens[0::2], tokens[1::2]
    bad = [w for w in weights if _number(w) is None]
    if bad:
        raise DataError(f"--data-path {' '.join(tokens)}: {bad[0]!r} stands where a weight belongs (W1 P1 W2 P2 ...); "
                        "give a number before every path.")
    values = [float(w) for w in weights]
    bad = [w for w, v in zip(weights, values) if not (math.isfinite(v) and v > 0)]
    if bad:
        raise DataError(f"--data-path: weight {bad[0]} must be a finite number > 0 (a source that should not train "
                        "is left out of --data-path).")
    paths_as_numbers = [p for p in paths if _number(p) is not None]
    if paths_as_numbers:
        raise DataError(f"--data-path {' '.join(tokens)}: {paths_as_numbers[0]!r} stands where a path belongs; give "
                        "weight-path pairs (W1 P1 W2 P2 ...).")
    total = sum(values)
    return BlendSpec(tuple(paths), tuple(v / total for v in values))


def source_name(path: str) -> str:
    """The name of a source in logs and TensorBoard: the file's name without its extension, a
    folder's name (an HDF5 dataset or Zarr array selector appended); generated data 'synthetic' with its
    band set or channel count ('synthetic-s2', 'synthetic-c16')."""
    path = str(path)
    if path == "synthetic" or path.startswith("synthetic:"):  # 'synthetic-s2' (a band set), 'synthetic-c16'
        from .readers.synthetic import parse_spec
        try:
            spec = parse_spec(path)
        except DataError:
            spec = {}
        what = spec.get("bands") or (f"c{spec['num_channels']}" if "num_channels" in spec else None)
        return re.sub(r"[^\w.+-]", "_", f"synthetic-{what}" if what else "synthetic")
    base, selector = split_selector(path)
    base = base.rstrip("/\\") or base
    name = os.path.basename(base)
    if not os.path.isdir(base) or base.endswith(".zarr"):
        name = os.path.splitext(name)[0] or name
    if selector:
        name += "-" + selector.strip("/").replace("/", "-")
    return re.sub(r"[^\w.+-]", "_", name) or "source"


def unique_names(paths) -> tuple[str, ...]:
    """``source_name`` of every path, made unique: the second 'image' becomes 'image-2', etc."""
    names = [source_name(p) for p in paths]
    taken = set()
    out = []
    for name in names:
        candidate, k = name, 1
        while candidate in taken:
            k += 1
            candidate = f"{name}-{k}"
        taken.add(candidate)
        out.append(candidate)
    return tuple(out)


def proportional_weights(counts) -> tuple[float, ...]:
    """Weights in proportion to the sources' training sample counts."""
    counts = [int(c) for c in counts]
    total = sum(counts)
    if total <= 0:
        raise DataError("the sources of --data-path hold no training sample together.")
    return tuple(c / total for c in counts)


class BlendSchedule:
    """Which source each training step reads (the module's rule), and how many steps each source
    got before a step. Steps are computed once, in order, and kept (one small int per step)."""

    def __init__(self, weights):
        weights = [float(w) for w in weights]
        if not weights or any(not (math.isfinite(w) and w > 0) for w in weights):
            raise DataError(f"blend weights must be finite and > 0, got {weights}.")
        total = sum(weights)
        self.weights = tuple(w / total for w in weights)
        self._steps: list[int] = []
        self._counts = [0] * len(weights)

    @property
    def num_sources(self) -> int:
        return len(self.weights)

    def _extend(self, steps: int) -> None:
        w, n = self.weights, self._counts
        for i in range(len(self._steps), steps):
            best, best_lag = 0, w[0] * (i + 1) - n[0]
            for s in range(1, len(w)):
                lag = w[s] * (i + 1) - n[s]
                if lag > best_lag:
                    best, best_lag = s, lag
            n[best] += 1
            self._steps.append(best)

    def source_at(self, step: int) -> int:
        """The source step ``step`` (0-based) reads."""
        if step < 0:
            raise ValueError(f"step {step} < 0")
        self._extend(step + 1)
        return self._steps[step]

    def counts_before(self, step: int) -> list[int]:
        """Per source, the steps it got among steps 0 .. step - 1."""
        self._extend(step)
        if step == len(self._steps):
            return list(self._counts)
        counts = [0] * self.num_sources
        for s in self._steps[:step]:
            counts[s] += 1
        return counts

    def shares(self, steps: int) -> list[float]:
        """Per source, its share of the first ``steps`` steps (= of the samples consumed)."""
        counts = self.counts_before(steps)
        return [c / steps if steps else 0.0 for c in counts]
