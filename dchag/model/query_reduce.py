"""D-CHAG-C without projections (``--dchag-cross-projections none``): a learned query per segment
attends over the segment's tokens themselves.

    out_n^h = sum_{i in segment n} softmax_i(q_n^h . x_i^h / sqrt(hd)) x_i^h      per head h, [B, n, L, D]

CrossReduce's attention with its key, value and output projections (three D x D matrices per
segment, and the output bias) replaced by the identity and not trained: D parameters per segment
(the query) instead of 3 D^2 + 2 D. An untrained segment (zero query) is the mean of its tokens,
as LinearReduce's and CrossReduce's are. Unlike D-CHAG-L's fixed coefficients, the weights
depend on each position's content, which is what flat's attention over all C channels has and
D-CHAG-L lacks (docs/PARITY.md, "Where the MAE gap comes from"). Streamed like CrossReduce
(online softmax over chunks of the segment's tokens).
"""

from __future__ import annotations

import torch
from torch import nn

from dchag.model.aggregation import CrossReduce, PartialAggregation, SegmentLevel, source_tree_levels
from dchag.model.init import mark_channel_sharded


class QueryReduce(CrossReduce):
    """CrossReduce whose keys and values are the tokens and whose output is the attention's.
    It reuses CrossReduce's attention, streaming and merge through the two hooks ``_qkv`` and
    ``_project``; it holds none of CrossReduce's projection parameters."""

    def __init__(self, level: SegmentLevel, hidden_size: int, num_heads: int, owner: bool,
                 attention_backend: str = "unfused", levels: tuple[SegmentLevel, ...] | None = None):
        """``levels``: this level per data source (default ``(level,)``), as CrossReduce's."""
        nn.Module.__init__(self)  # not CrossReduce.__init__: no key, value or output projection
        self.level, self.num_heads, self.attention_backend = level, num_heads, attention_backend
        self.levels = tuple(levels) if levels is not None else (level,)
        self.query = nn.Parameter(torch.zeros(len(level.sizes), hidden_size))  # zero: the segment mean
        mark_channel_sharded(self.query, level.out_rows, level.global_out, owner)

    def forward(self, x, chunk=None, finish: bool = False, source: int = 0):
        if finish:  # the merged online-softmax state of all chunks -> the weighted mean
            numerator, denominator, _ = x  # [B, n, L, H, hd], [B, n, L, H]
            B, n, L, H, hd = numerator.shape
            return (numerator / denominator[..., None]).to(self.query.dtype).reshape(B, n, L, H * hd)
        return super().forward(x, chunk, source=source)

    def _qkv(self, seg: torch.Tensor, rows: range):
        """seg [B, n, S, L, D] -> q [n, H, hd], k = v = the tokens [B, n, L, S, H, hd]."""
        B, n, S, L, D = seg.shape
        H = self.num_heads
        tokens = seg.transpose(2, 3).reshape(B, n, L, S, H, D // H)
        return self.query[rows.start:rows.stop].reshape(n, H, D // H), tokens, tokens

    def _project(self, mixed: torch.Tensor, rows: range) -> torch.Tensor:
        return mixed


def build_query_partial_aggregation(partition, rank: int, tree_levels_k: int, hidden_size: int, num_heads: int,
                                    owner: bool, attention_backend: str = "unfused", sources=None) -> PartialAggregation:
    """The partial stage of ``--dchag-aggregation cross --dchag-cross-projections none``: a
    QueryReduce per tree level (as ``build_partial_aggregation`` builds CrossReduce levels;
    ``sources``: a blend's layout)."""
    return PartialAggregation([QueryReduce(lv[0], hidden_size, num_heads, owner, attention_backend, lv)
                               for lv in source_tree_levels(partition, rank, tree_levels_k, sources)])
