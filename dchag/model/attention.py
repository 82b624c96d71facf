"""Which kernel computes attention: ``--attention-backend {auto,sdpa,unfused}`` (Megatron's flag name).

* ``unfused``: explicit scores -> softmax (fp32) -> weighted sum. The reference: megatron's local
  ``DotProductAttention`` (baddbmm, softmax, bmm) in the backbone and einsum-style matmuls in the
  aggregations. Materializes the [.., Lq, S] score matrix.
* ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention``, which dispatches to fused
  kernels: FlashAttention-2 / cuDNN / memory-efficient on CUDA, AOTriton/CK flash on ROCm
  (gfx90a, gfx942), a flash-style kernel or the math fallback on CPU. Same scale
  (1/sqrt(head_dim)), same masks, same dropout rate and RNG stream; under bf16 the kernels
  accumulate the softmax in fp32 internally (as ``softmax_fp32`` does for ``unfused``).
* ``auto``: ``sdpa``.

:func:`attend` is the one entry point of the aggregation attentions (CrossReduce over a group's
tokens, FinalAggregation over the G tokens); the backbone gets the same choice through the
layer spec's ``core_attention`` (``dchag.model.core_attention``). ``--transformer-impl
transformer_engine`` (optional, only where Transformer Engine is installed) swaps the whole
backbone layer for megatron's TE spec, whose fused attention then picks its own kernel.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

ATTENTION_BACKENDS = ("auto", "sdpa", "unfused")
TRANSFORMER_IMPLS = ("local", "transformer_engine")


def resolve_attention_backend(name: str) -> str:
    """'auto' -> 'sdpa'; checks the name."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"--attention-backend must be one of {ATTENTION_BACKENDS}, got {name!r}.")
    return "sdpa" if name == "auto" else name


def softmax_fp32(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis, accumulated in at least fp32 (as megatron's
    ``attention_softmax_in_fp32`` does for the backbone): bf16 sums over hundreds of channel
    tokens lose the small weights. The caller casts the result back to the values' dtype."""
    return scores.to(torch.promote_types(scores.dtype, torch.float32)).softmax(-1)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str,
           key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd)) v, no dropout.

    q [N, H, Lq, hd] (may be a broadcast view), k and v [N, H, S, hd], key_mask broadcastable to
    [N, 1, 1, S], bool, True = the key takes part (every query must keep at least one).
    Returns [N, H, Lq, hd] in v's dtype.
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    backend = resolve_attention_backend(backend)
    if backend == "sdpa":
        if q.dtype != k.dtype:
            q = q.to(k.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, scale=scale)
    scores = torch.matmul(q.to(k.dtype), k.transpose(-1, -2)) * scale
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask, float("-inf"))
    return torch.matmul(softmax_fp32(scores).to(v.dtype), v)
