"""Chunks of a reduction level's input for the streamed channel stage (pure arithmetic, no torch:
the model (dchag/model/streaming.py) and the planner (dchag/planner/memory.py) share it)."""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass


@dataclass(frozen=True)
class Chunk:
    """K consecutive input tokens of a reduction level, for the streamed channel stage
    (dchag/model/streaming.py). ``segments`` are the (rank-local) output segments the chunk
    touches and ``sizes`` how many of its tokens each gets; the first may have begun in the
    previous chunk and the last may continue into the next (``continues``)."""
    inputs: range
    segments: range
    sizes: tuple[int, ...]
    continues: bool


def chunk_plan(sizes: tuple[int, ...], chunks: int) -> list[Chunk]:
    """Split a level's input (segments of ``sizes`` tokens, in order) into ``chunks`` runs of
    consecutive tokens of near-equal length; a chunk may span several segments and a segment
    several chunks."""
    ends = list(itertools.accumulate(sizes))
    if not 1 <= chunks <= ends[-1]:
        raise ValueError(f"cannot split {ends[-1]} tokens into {chunks} non-empty chunks")
    bounds = [0] + list(itertools.accumulate(ends[-1] // chunks + (i < ends[-1] % chunks) for i in range(chunks)))
    plan = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        first, last = bisect.bisect_right(ends, a), bisect.bisect_left(ends, b)  # segments touched
        pieces = tuple(min(ends[n], b) - max(ends[n] - sizes[n], a) for n in range(first, last + 1))
        plan.append(Chunk(range(a, b), range(first, last + 1), pieces, continues=ends[last] > b))
    return plan
