"""The streamed channel stage (``--dchag-channel-chunk K``): tokenize and reduce K channels at a time.

Unstreamed, a rank materializes all of its channel tokens [B, c_r, L, D] (and the reduction's
copy of them), although the partial aggregation's output is only [B, G/P, L, D]. Streamed, the
tokenizer and the first reduction level run over chunks of at most K of the rank's channels:

    for each chunk [a, b) of the rank's channels            (checkpointed: nothing inside is kept)
        cross:  tokens = tokenizer(images[:, a:b])            [B, b - a, L, D]
                state  = level(tokens, chunk)                 online-softmax state of the segments it touches
        linear: state  = tokenizer(images[:, a:b], mix=w)     sum_i w_i token_i without building a token
    a segment split over chunks: level.merge(state, state)    linear: a sum; cross: online softmax
    level(merged, finish=True)                                [B, n_out, L, D]

In backward each chunk is recomputed from its slice of the input (the compute of one extra
forward of the stage), instead of keeping its tokens.
The stage then holds the input, its output and one chunk's working memory: its memory stops
growing with C. Later tree levels reduce the (small) first-level output as usual.

The outputs and gradients equal the unstreamed stage's to float rounding (tests/test_streaming.py,
tests/test_equivalence.py); the memory and time cost are in docs/BENCHMARKS.md section 8.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from dchag.model.chunks import chunk_plan


class ChunkGradSink:
    """Collects the gradients of one parameter's per-chunk row slices in a single full-size buffer.

    Slicing a parameter inside autograd (``weight[a:b]``) makes every chunk's backward produce a
    zero-filled gradient of the *whole* parameter, which the engine adds into another: two
    parameter-sized tensors at once, for the tokenizer (C D p^2 values) as large as the tokens a
    chunk saves many times over. Here each chunk's backward adds its rows into one buffer and
    returns nothing, and the last chunk to finish hands the buffer to autograd (so AccumulateGrad,
    and DeepSpeed's hooks on it, see one ordinary full-size gradient). Chunks are keyed by their
    rows: the checkpoint's recomputation slices again with the same keys and registers nothing new.
    One sink per forward pass."""

    def __init__(self):
        self.registered: dict[int, set] = {}  # id(param) -> chunk keys sliced in forward
        self.done: dict[int, set] = {}
        self.buffers: dict[int, torch.Tensor] = {}

    def rows(self, param: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """``param[start:stop]`` (a chunk's rows, keyed by them)."""
        if not param.requires_grad or not torch.is_grad_enabled():
            return param[start:stop]
        self.registered.setdefault(id(param), set()).add((start, stop))
        return _SliceIntoSink.apply(param, (start, stop), (start, stop), self)

    def index(self, t: torch.Tensor, key, index: torch.Tensor) -> torch.Tensor:
        """``t[index]`` (a chunk's rows of a per-identity parameter in a blend, or of the rows it
        borrowed: dchag/model/bank.py), keyed by ``key`` (the chunk's slots); repeated rows add
        their gradients."""
        if not t.requires_grad or not torch.is_grad_enabled():
            return t.index_select(0, index)
        self.registered.setdefault(id(t), set()).add(key)
        return _SliceIntoSink.apply(t, key, index, self)


class _SliceIntoSink(torch.autograd.Function):
    @staticmethod
    def forward(ctx, param, key, rows, sink):
        """``rows``: (start, stop) of a slice, or an index tensor."""
        ctx.key, ctx.rows, ctx.sink, ctx.param = key, rows, sink, id(param)
        ctx.shape, ctx.dtype, ctx.device = param.shape, param.dtype, param.device
        if isinstance(rows, torch.Tensor):
            return param.index_select(0, rows)
        return param.narrow(0, rows[0], rows[1] - rows[0])

    @staticmethod
    def backward(ctx, grad):
        sink, param = ctx.sink, ctx.param
        buf = sink.buffers.get(param)
        if buf is None:
            buf = sink.buffers[param] = torch.zeros(ctx.shape, dtype=ctx.dtype, device=ctx.device)
        if isinstance(ctx.rows, torch.Tensor):
            buf.index_add_(0, ctx.rows, grad.to(buf.dtype))
        else:
            buf[ctx.rows[0]:ctx.rows[1]] += grad
        done = sink.done.setdefault(param, set())
        done.add(ctx.key)
        if done != sink.registered[param]:
            return None, None, None, None
        del sink.done[param]  # (a second backward through the same graph starts over)
        return sink.buffers.pop(param), None, None, None  # the last chunk: the whole gradient, once


def _split_state(state: tuple, at: int) -> tuple[tuple, tuple]:
    return tuple(t[:, :at] for t in state), tuple(t[:, at:] for t in state)


def _chunk_state(tokenizer: nn.Module, level: nn.Module, images: torch.Tensor, chunk, sink: ChunkGradSink,
                 source: int, lent: dict) -> tuple:
    slots = dict(slots=chunk.inputs, grad_sink=sink, source=source, borrowed=lent.get("tokenizer"))
    if level.fuses_tokenizer:
        # D-CHAG-L is linear in the tokens and the tokens in the input: the chunk's share of
        # sum_i w_i token_i is one convolution per segment piece with kernels w_i W_i, and no
        # token of the chunk is ever built.
        coefficients = level(None, chunk=chunk, source=source, borrowed=lent.get("level"))  # [k]
        return (tokenizer(images, mix=(chunk.sizes, coefficients), **slots),)
    return level(tokenizer(images, **slots), chunk=chunk, source=source)


def streamed_first_level(images: torch.Tensor, tokenizer: nn.Module, level: nn.Module, chunks: int,
                         source: int = 0) -> torch.Tensor:
    """images [B, c_r, H, W] (the rank's slots of data ``source``) -> the first reduction level's
    output [B, n_out, L, D], in ``chunks`` chunks of consecutive slots (``ChannelPartition.stream_chunks``).

    ``level`` is a LinearReduce or CrossReduce. A chunk's state is a tuple of tensors [B, segments, ...]:
    ``level(tokens, chunk=...)`` (cross), or the tokenizer's ``mix`` of the coefficients
    ``level(None, chunk=...)`` (linear, ``level.fuses_tokenizer``); ``level.merge`` combines two
    states of the same segments; ``level(state, finish=True)`` makes the output.

    In a blend, the rows of per-identity parameters this rank borrows for the source
    (dchag/model/bank.py) come first, once: ``module(None, source=...)``, one collective per module
    (inside a checkpointed chunk it would run again in backward, once per chunk)."""
    finished, carry = [], None  # states of completed segments; the state of a segment still open
    sink = ChunkGradSink()  # the tokenizer's per-chunk parameter slices
    lent = {name: module(None, source=source) for name, module in (("tokenizer", tokenizer), ("level", level))
            if module.borrows(source)}
    for chunk in chunk_plan(level.level_of(source).sizes, chunks):
        x = images[:, chunk.inputs.start:chunk.inputs.stop]  # a view: the input is kept anyway
        # Non-reentrant checkpoint: autograd keeps x and the returned state only, and reruns
        # the chunk in backward. No RNG inside (the channel stage has no dropout).
        state = checkpoint(_chunk_state, tokenizer, level, x, chunk, sink, source, lent, use_reentrant=False,
                           preserve_rng_state=False)
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
                                 chunks: int, source: int = 0) -> torch.Tensor:
    """images [B, c_r, H, W] -> [B, G/P, L, D]: the tokenizer and the first level streamed, the
    later tree levels (on G 2^(k-2) / P tokens or fewer) as usual."""
    first, *later = partial.levels
    tokens = streamed_first_level(images, tokenizer, first, chunks, source)
    for level in later:
        tokens = level(tokens, source=source)
    return tokens
