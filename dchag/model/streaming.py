"""The streamed channel stage (``--dchag-channel-chunk K``): tokenize and reduce K channels at a time.

Unstreamed, a rank materializes all of its channel tokens [B, c_r, L, D] (and the reduction's
copy of them), although the partial aggregation's output is only [B, G/P, L, D]. Streamed, the
tokenizer and the first reduction level run over chunks of at most K of the rank's channels:

    for each chunk [a, b) of the rank's channels            (checkpointed: nothing inside is kept)
        tokens = tokenizer(images[:, a:b])                    [B, b - a, L, D]
        state  = level(tokens, chunk)                         the chunk's share of the segments it touches
    a segment split over chunks: level.merge(state, state)    linear: a sum; cross: online softmax
    level(merged, finish=True)                                [B, n_out, L, D]

In backward each chunk is recomputed from its slice of the input (a per-channel convolution and
the reduction: the compute of one extra forward of the stage), instead of keeping its tokens.
The stage then holds the input, its output and one chunk's working memory: its memory stops
growing with C. Later tree levels reduce the (small) first-level output as usual.

The outputs and gradients equal the unstreamed stage's to float rounding (tests/test_streaming.py,
tests/test_equivalence.py); the memory and time cost are in docs/BENCHMARKS.md section 8.
"""

from __future__ import annotations

import bisect
import itertools
import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from dchag.model.aggregation import Chunk


def num_chunks(rank_channels: list[int], chunk_size: int) -> int:
    """How many chunks every channel rank streams: ceil(largest c_r / K), so no chunk exceeds K
    channels, but the same count on every rank (ZeRO-3 records the order of module calls and
    requires it to be identical on all ranks), and at most the smallest c_r (no empty chunk)."""
    if chunk_size < 1:
        raise ValueError(f"chunk size must be >= 1, got {chunk_size}")
    return max(1, min(math.ceil(max(rank_channels) / chunk_size), min(rank_channels)))


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


def _split_state(state: tuple, at: int) -> tuple[tuple, tuple]:
    return tuple(t[:, :at] for t in state), tuple(t[:, at:] for t in state)


def _chunk_state(tokenizer: nn.Module, level: nn.Module, images: torch.Tensor, chunk: Chunk) -> tuple:
    return level(tokenizer(images, channels=chunk.inputs), chunk=chunk)


def streamed_first_level(images: torch.Tensor, tokenizer: nn.Module, level: nn.Module, chunks: int) -> torch.Tensor:
    """images [B, c_r, H, W] -> the first reduction level's output [B, n_out, L, D], in ``chunks``
    chunks of consecutive channels (:func:`num_chunks`).

    ``level`` is a LinearReduce or CrossReduce: ``level(tokens, chunk=...)`` gives a chunk's state
    (a tuple of tensors [B, segments, ...]), ``level.merge`` combines two states of the same
    segments, ``level(state, finish=True)`` makes the output."""
    finished, carry = [], None  # states of completed segments; the state of a segment still open
    for chunk in chunk_plan(level.level.sizes, chunks):
        x = images[:, chunk.inputs.start:chunk.inputs.stop]  # a view: the input is kept anyway
        # Non-reentrant checkpoint: autograd keeps x and the returned state only, and reruns
        # the chunk in backward. No RNG inside (the channel stage has no dropout).
        state = checkpoint(_chunk_state, tokenizer, level, x, chunk, use_reentrant=False, preserve_rng_state=False)
        if carry is not None:  # the first segment began in the previous chunk
            head, rest = _split_state(state, 1)
            state = tuple(torch.cat(pair, 1) for pair in zip(level.merge(carry, head), rest))
        carry = None
        if chunk.continues:
            state, carry = _split_state(state, len(chunk.segments) - 1)
        if state[0].shape[1] > 0:
            finished.append(state)
    merged = tuple(torch.cat(parts, 1) for parts in zip(*finished))
    return level(merged, finish=True)


def streamed_partial_aggregation(images: torch.Tensor, tokenizer: nn.Module, partial: nn.Module,
                                 chunks: int) -> torch.Tensor:
    """images [B, c_r, H, W] -> [B, G/P, L, D]: the tokenizer and the first level streamed, the
    later tree levels (on G 2^(k-2) / P tokens or fewer) as usual."""
    first, *later = partial.levels
    tokens = streamed_first_level(images, tokenizer, first, chunks)
    for level in later:
        tokens = level(tokens)
    return tokens
