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
        if not param.requires_grad or not torch.is_grad_enabled():
            return param[start:stop]
        self.registered.setdefault(id(param), set()).add((start, stop))
        return _SliceIntoSink.apply(param, start, stop, self)


class _SliceIntoSink(torch.autograd.Function):
    @staticmethod
    def forward(ctx, param, start, stop, sink):
        ctx.start, ctx.stop, ctx.sink, ctx.key = start, stop, sink, id(param)
        ctx.shape, ctx.dtype, ctx.device = param.shape, param.dtype, param.device
        return param.narrow(0, start, stop - start)

    @staticmethod
    def backward(ctx, grad):
        sink, key = ctx.sink, ctx.key
        buf = sink.buffers.get(key)
        if buf is None:
            buf = sink.buffers[key] = torch.zeros(ctx.shape, dtype=ctx.dtype, device=ctx.device)
        buf[ctx.start:ctx.stop] += grad
        done = sink.done.setdefault(key, set())
        done.add((ctx.start, ctx.stop))
        if done != sink.registered[key]:
            return None, None, None, None
        del sink.done[key]  # (a second backward through the same graph starts over)
        return sink.buffers.pop(key), None, None, None  # the last chunk: the whole gradient, once


def _split_state(state: tuple, at: int) -> tuple[tuple, tuple]:
    return tuple(t[:, :at] for t in state), tuple(t[:, at:] for t in state)


def _chunk_state(tokenizer: nn.Module, level: nn.Module, images: torch.Tensor, chunk, sink: ChunkGradSink) -> tuple:
    if level.fuses_tokenizer:
        # D-CHAG-L is linear in the tokens and the tokens in the input: the chunk's share of
        # sum_i w_i token_i is one convolution per segment piece with kernels w_i W_i, and no
        # token of the chunk is ever built.
        coefficients = level(None, chunk=chunk)  # [k]
        return (tokenizer(images, channels=chunk.inputs, grad_sink=sink, mix=(chunk.sizes, coefficients)),)
    return level(tokenizer(images, channels=chunk.inputs, grad_sink=sink), chunk=chunk)


def streamed_first_level(images: torch.Tensor, tokenizer: nn.Module, level: nn.Module, chunks: int) -> torch.Tensor:
    """images [B, c_r, H, W] -> the first reduction level's output [B, n_out, L, D], in ``chunks``
    chunks of consecutive channels (``ChannelPartition.stream_chunks``).

    ``level`` is a LinearReduce or CrossReduce. A chunk's state is a tuple of tensors [B, segments, ...]:
    ``level(tokens, chunk=...)`` (cross), or the tokenizer's ``mix`` of the coefficients
    ``level(None, chunk=...)`` (linear, ``level.fuses_tokenizer``); ``level.merge`` combines two
    states of the same segments; ``level(state, finish=True)`` makes the output."""
    finished, carry = [], None  # states of completed segments; the state of a segment still open
    sink = ChunkGradSink()  # the tokenizer's per-chunk parameter slices
    for chunk in chunk_plan(level.level.sizes, chunks):
        x = images[:, chunk.inputs.start:chunk.inputs.stop]  # a view: the input is kept anyway
        # Non-reentrant checkpoint: autograd keeps x and the returned state only, and reruns
        # the chunk in backward. No RNG inside (the channel stage has no dropout).
        state = checkpoint(_chunk_state, tokenizer, level, x, chunk, sink, use_reentrant=False,
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
                                 chunks: int) -> torch.Tensor:
    """images [B, c_r, H, W] -> [B, G/P, L, D]: the tokenizer and the first level streamed, the
    later tree levels (on G 2^(k-2) / P tokens or fewer) as usual."""
    first, *later = partial.levels
    tokens = streamed_first_level(images, tokenizer, first, chunks)
    for level in later:
        tokens = level(tokens)
    return tokens
