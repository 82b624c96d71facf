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

:func:`segment_attention` (CrossReduce over a group's tokens) and :func:`token_attention`
(FinalAggregation over the G tokens) are the aggregation attentions' entry points; the backbone gets the same choice through the
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


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """q [N, H, Lq, hd], k/v [N, H, S, hd], key_mask broadcastable to [N, 1, 1, S] (True = attends)."""
    return F.scaled_dot_product_attention(q.to(k.dtype), k, v, attn_mask=key_mask, scale=1.0 / math.sqrt(q.shape[-1]))


def segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str,
                      pad: torch.Tensor | None = None) -> torch.Tensor:
    """CrossReduce: segment n's query attends over its S tokens at every (b, l).

    q [n, H, hd]; k, v [B, n, L, S, H, hd]; pad [n, S] (True = a real token) or None.
    Returns [B, n, L, H, hd]. ``unfused`` is the explicit einsum/softmax_fp32 path (the reference,
    whose saved tensors dchag/planner/memory.py models)."""
    B, n, L, S, H, hd = k.shape
    if resolve_attention_backend(backend) == "sdpa":
        def rows(t):  # [B, n, L, S, H, hd] -> [B n L, H, S, hd]
            return t.permute(0, 1, 2, 4, 3, 5).reshape(B * n * L, H, S, hd)
        qq = q.reshape(1, n, 1, H, 1, hd).expand(B, n, L, H, 1, hd).reshape(B * n * L, H, 1, hd)
        mask = None if pad is None else pad[None, :, None, :].expand(B, n, L, S).reshape(B * n * L, 1, 1, S)
        return _sdpa(qq, rows(k), rows(v), mask).reshape(B, n, L, H, hd)
    scores = torch.einsum("nhe,bnlshe->bnlhs", q, k) / math.sqrt(hd)
    if pad is not None:
        scores = scores.masked_fill(~pad[None, :, None, None, :], float("-inf"))
    attn = softmax_fp32(scores).to(v.dtype)
    return torch.einsum("bnlhs,bnlshe->bnlhe", attn, v)


def token_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str) -> torch.Tensor:
    """FinalAggregation: one learned query per head attends over the N tokens of every position.

    q [H, hd]; k, v [N, P, H, hd] (P = B L positions, megatron's sequence-first layout).
    Returns [P, H, hd]."""
    N, P, H, hd = k.shape
    if resolve_attention_backend(backend) == "sdpa":
        qq = q.reshape(1, H, 1, hd).expand(P, H, 1, hd).contiguous()  # fused kernels want real strides
        return _sdpa(qq, k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3)).reshape(P, H, hd)
    attn = softmax_fp32(torch.einsum("he,nbhe->bhn", q.to(k.dtype), k) / math.sqrt(hd)).to(v.dtype)
    return torch.einsum("bhn,nbhe->bhe", attn, v)
