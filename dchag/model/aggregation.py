"""Cross-channel aggregation: [B, C, L, D] channel tokens -> [B, L, D], as strategies.

    partial (local to a rank)      tokens [B, c_r, L, D] -> [B, G/P, L, D]
        LinearReduce  (D-CHAG-L)   a learned weight per input token: out_n = sum_{i in n} w_i x_i
        CrossReduce   (D-CHAG-C)   per segment: learned query attends over the segment's tokens
        tree of k levels           level j reduces G*2^(k-j+1) tokens to G*2^(k-j) (k=1: flat in-group)
    (all-gather over the channel group, in the model)           -> [B, G, L, D]
    FinalAggregation (TP)          learned query attends over the G tokens, heads split over TP

A *segment* is the set of input tokens one output token is reduced from. Segments are
contiguous, so a rank's G/P groups map to contiguous input and output rows at every level,
and per-segment weights shard over channel ranks by row like the tokenizer's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dchag.model.attention import segment_attention, softmax_fp32, token_attention  # noqa: F401 - softmax_fp32 re-exported
from dchag.model.bank import Bank, lend, take
from dchag.model.chunks import Chunk
from dchag.model.init import init_identity_, init_rows_, mark_channel_sharded, mark_weight_matrix
from dchag.parallel.partition import ChannelPartition
from dchag.parallel.sources import SourceLayout


@dataclass(frozen=True)
class SegmentLevel:
    """One reduction level, seen from one rank.

    ``sizes[j]`` is the number of input tokens of the rank's j-th output segment;
    ``in_rows`` / ``out_rows`` are the global token indices the rank holds at this level.
    """
    sizes: tuple[int, ...]
    in_rows: range
    out_rows: range
    global_in: int
    global_out: int

    @property
    def uniform(self) -> bool:
        return len(set(self.sizes)) == 1


def _split(n: int, parts: int) -> list[int]:
    base, extra = divmod(n, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def tree_levels(partition: ChannelPartition, rank: int, levels: int) -> list[SegmentLevel]:
    """The k reduction levels for channel-parallel ``rank``: level 1 splits every group into
    2^(k-1) near-equal sub-groups of channels; each later level merges pairs of tokens, until
    one token per group remains."""
    groups = partition.rank_groups(rank)
    G = partition.num_groups
    out = []
    in_rows, global_in = partition.rank_channels(rank), partition.num_channels
    for level in range(1, levels + 1):
        fan = 2 ** (levels - level)  # output tokens per group at this level
        if level == 1:
            sizes = [s for g in groups for s in _split(partition.group_sizes[g], fan)]
        else:
            sizes = [2] * (len(groups) * fan)
        out_rows = range(groups.start * fan, groups.stop * fan)
        out.append(SegmentLevel(tuple(sizes), in_rows, out_rows, global_in, G * fan))
        in_rows, global_in = out_rows, G * fan
    return out


def _segment_index(sizes: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """For uneven segments: the input row of each padded slot [n_out, S] and which slots are real."""
    S = max(sizes)
    starts = torch.tensor([0] + list(sizes[:-1])).cumsum(0)
    offsets = torch.arange(S)
    valid = offsets[None, :] < torch.tensor(sizes)[:, None]  # [n_out, S]
    return torch.where(valid, starts[:, None] + offsets[None, :], 0), valid


def _segments(x: torch.Tensor, sizes: tuple[int, ...]):
    """[B, n_in, L, D] -> padded [B, n_out, S, L, D] and a pad mask [n_out, S] (None if uniform)."""
    B, n_in, L, D = x.shape
    n_out, S = len(sizes), max(sizes)
    if len(set(sizes)) == 1:
        return x.reshape(B, n_out, S, L, D), None  # a view: no copy
    index, valid = _segment_index(sizes)
    return x[:, index.to(x.device)], valid.to(x.device)


class LinearReduce(nn.Module):
    """D-CHAG-L: out_n = sum_{i in segment n} w_i * x_i, one scalar per input token.
    Initialized to the segment mean, so an untrained model averages the group's channels.
    The coefficients are not a weight matrix and take no weight decay: decay would pull every
    group token towards zero, not towards a simpler map."""

    def __init__(self, level: SegmentLevel, owner: bool, levels: tuple[SegmentLevel, ...] | None = None,
                 bank: Bank | None = None, identity_sizes: tuple[int, ...] | None = None):
        """``levels``: this level per data source (default ``(level,)``: one source). ``bank``: the
        first level of a blend, whose coefficients are per channel identity (the rank's home ids,
        dchag/model/bank.py), each initialized 1/n with n = ``identity_sizes[u]`` (the segment of the
        identity's first slot in the first source that has it: one source, the segment mean)."""
        super().__init__()
        self.level = level
        self.levels = tuple(levels) if levels is not None else (level,)
        self.plans = None if bank is None else bank.plans
        if bank is None:
            weight = torch.cat([torch.full((n,), 1.0 / n) for n in level.sizes])
            self.weight = mark_channel_sharded(nn.Parameter(weight), level.in_rows, level.global_in, owner)
        else:
            weight = torch.tensor([1.0 / identity_sizes[u] for u in bank.ids], dtype=torch.float32)
            self.weight = mark_channel_sharded(nn.Parameter(weight), bank.ids, bank.global_rows, owner, identity=True)

    fuses_tokenizer = True  # streamed: the tokenizer applies the coefficients inside its convolution

    def level_of(self, source: int) -> SegmentLevel:
        return self.levels[source]

    def borrows(self, source: int) -> bool:
        """Whether data ``source`` needs coefficients of other ranks (then ``self(None, source=...)`` lends them)."""
        return self.plans is not None and self.plans[source].num_borrowed > 0

    def _coefficients(self, source: int, slots: range | None, borrowed) -> torch.Tensor:
        """w_i of the rank's input tokens ``slots`` (default all) for data ``source``."""
        if self.plans is None:
            return self.weight if slots is None else self.weight[slots.start:slots.stop]
        return take(self.weight, self.plans[source], slots, None if borrowed is None else borrowed[0])

    def forward(self, x: torch.Tensor | None, chunk: Chunk | None = None, finish: bool = False, source: int = 0,
                borrowed: list | None = None):
        """x [B, n_in, L, D] -> [B, n_out, L, D].

        Streamed (dchag/model/streaming.py): with ``chunk``, the chunk's coefficients w_i [k] (x is
        not used: the tokenizer folds them into its convolution, so no token is built; ``borrowed``:
        the coefficients lent by ``self(None, source=...)``, one collective before the chunks);
        ``finish=True`` turns the merged partial sums ``(sums,)`` of all chunks into the output."""
        if finish:
            return x[0].to(self.weight.dtype)
        if x is None and chunk is None:
            return lend([self.weight], self.plans[source])
        if chunk is not None:
            return self._coefficients(source, chunk.inputs, borrowed).clone()  # (ZeRO-3 may free the original)
        sizes = self.levels[source].sizes
        weight = self._coefficients(source, None, lend([self.weight], self.plans[source]) if self.borrows(source)
                                    else None)
        seg, valid = _segments(x, sizes)  # [B, n_out, S, L, D]
        if valid is None:
            w = weight.reshape(seg.shape[1], seg.shape[2])  # [n_out, S]
        else:  # padded slots get weight 0
            index, _ = _segment_index(sizes)
            w = weight[index.to(x.device)] * valid
        # One contraction: autograd keeps only its inputs. The elementwise form (x * w, then a
        # segment sum) kept a token-sized product too and made the channel stage's peak ~2x
        # larger (docs/BENCHMARKS.md).
        return torch.einsum("bnsld,ns->bnld", seg, w.to(x.dtype))

    @staticmethod
    def merge(a: tuple, b: tuple) -> tuple:
        """Two chunks' partial sums of the same segments -> one."""
        return (a[0] + b[0],)


class CrossReduce(nn.Module):
    """D-CHAG-C: per output segment n, a learned query attends over the segment's tokens,
    with the segment's own key/value/output projections (stacked, [n_out, D, D])."""

    fuses_tokenizer = False  # streamed: attends over the chunk's tokens (online softmax)

    def __init__(self, level: SegmentLevel, hidden_size: int, num_heads: int, seed: int, name: str, owner: bool,
                 attention_backend: str = "unfused", levels: tuple[SegmentLevel, ...] | None = None):
        """``levels``: this level per data source (default ``(level,)``: one source); the segments'
        count and positions, and so the parameters, are the same for every source."""
        super().__init__()
        D, n = hidden_size, len(level.sizes)
        self.level, self.num_heads, self.attention_backend = level, num_heads, attention_backend
        self.levels = tuple(levels) if levels is not None else (level,)
        rows, total = level.out_rows, level.global_out
        # An untrained segment is the plain mean of its tokens, as LinearReduce starts from the
        # group mean: a zero query (uniform attention, as ClimaX's variable aggregation) and
        # identity value and output projections. So D-CHAG-C, like D-CHAG-L, starts as exactly
        # flat's function (equal groups): any gap to flat is made by training, not by the draw.
        # (It does not cure D-CHAG-C's MAE plateau: 3 of 10 seeds stay on it with either start,
        # docs/PARITY.md, "Init".) Keys are unit-gain random: they only matter once the query
        # has learned something.
        self.query = nn.Parameter(torch.zeros(n, D))
        self.key = nn.Parameter(init_rows_(torch.empty(n, D, D), rows, seed, f"{name}.key", std=1.0 / math.sqrt(D)))
        self.value = nn.Parameter(init_identity_(torch.empty(n, D, D)))
        self.proj = nn.Parameter(init_identity_(torch.empty(n, D, D)))
        self.proj_bias = nn.Parameter(torch.zeros(n, D))
        for p in (self.query, self.key, self.value, self.proj, self.proj_bias):
            mark_channel_sharded(p, rows, total, owner)
        for p in (self.key, self.value, self.proj):
            mark_weight_matrix(p)

    def level_of(self, source: int) -> SegmentLevel:
        return self.levels[source]

    def borrows(self, source: int) -> bool:
        return False  # per-segment parameters: every source uses the rank's own

    def forward(self, x, chunk: Chunk | None = None, finish: bool = False, source: int = 0):
        """x [B, n_in, L, D] -> [B, n_out, L, D] (the segments of data ``source``).

        Streamed (dchag/model/streaming.py): with ``chunk``, x holds only the chunk's tokens and
        the result is its online-softmax state (see :meth:`chunk_state`); ``finish=True`` turns
        the merged state of all chunks into the output. Every use of the parameters goes through
        ``forward``, so ZeRO-3 has gathered them."""
        if finish:
            numerator, denominator, _ = x  # [B, n, L, H, hd], [B, n, L, H]
            B, n, L, H, hd = numerator.shape
            mixed = (numerator / denominator[..., None]).to(self.proj.dtype).reshape(B, n, L, H * hd)
            return self._project(mixed, range(n))
        if chunk is not None:
            return self.chunk_state(x, chunk)
        seg, pad = _segments(x, self.levels[source].sizes)  # [B, n, S, L, D]
        B, n, S, L, D = seg.shape
        q, k, v = self._qkv(seg, range(n))
        mixed = segment_attention(q, k, v, self.attention_backend, pad).reshape(B, n, L, D)
        return self._project(mixed, range(n))

    def _qkv(self, seg: torch.Tensor, rows: range):
        """seg [B, n, S, L, D] (segments ``rows``) -> q [n, H, hd], k, v [B, n, L, S, H, hd]."""
        B, n, S, L, D = seg.shape
        H, hd = self.num_heads, D // self.num_heads
        rows = slice(rows.start, rows.stop)
        k = torch.einsum("bnsld,nde->bnlse", seg, self.key[rows]).reshape(B, n, L, S, H, hd)
        v = torch.einsum("bnsld,nde->bnlse", seg, self.value[rows]).reshape(B, n, L, S, H, hd)
        return self.query[rows].reshape(n, H, hd), k, v

    def _project(self, mixed: torch.Tensor, rows: range) -> torch.Tensor:
        # The segment's output projection: mixed [B, n, L, D] @ proj[n] [D, D] -> [B, n, L, D].
        rows = slice(rows.start, rows.stop)
        return torch.einsum("bnld,nde->bnle", mixed, self.proj[rows]) + self.proj_bias[rows][None, :, None, :]

    def chunk_state(self, x: torch.Tensor, chunk: Chunk) -> tuple:
        """The chunk's share of its segments' attention, FlashAttention-style along the channels:

            shift m = max_s score_s (no gradient: any constant cancels between numerator and denominator)
            numerator   N = sum_s exp(score_s - m) v_s    [B, n, L, H, hd]  (fp32 or wider)
            denominator Z = sum_s exp(score_s - m)        [B, n, L, H]

        so every exponent is <= 0 (no overflow) and the output N / Z is the softmax-weighted sum."""
        seg, pad = _segments(x, chunk.sizes)  # [B, n, S, L, D]
        q, k, v = self._qkv(seg, chunk.segments)
        scores = torch.einsum("nhe,bnlshe->bnlhs", q.to(k.dtype), k) / math.sqrt(q.shape[-1])
        scores = scores.to(torch.promote_types(scores.dtype, torch.float32))
        if pad is not None:
            scores = scores.masked_fill(~pad[None, :, None, None, :], float("-inf"))
        shift = scores.amax(-1).detach()  # [B, n, L, H]; finite: every segment has a real token here
        weights = (scores - shift[..., None]).exp()
        numerator = torch.einsum("bnlhs,bnlshe->bnlhe", weights, v.to(weights.dtype))
        return numerator, weights.sum(-1), shift

    @staticmethod
    def merge(a: tuple, b: tuple) -> tuple:
        """Two chunks' online-softmax states of the same segments -> one (rescaled to the larger
        shift; the factors carry no gradient, so autograd keeps only them)."""
        (num_a, den_a, m_a), (num_b, den_b, m_b) = a, b
        m = torch.maximum(m_a, m_b)
        fa, fb = (m_a - m).exp(), (m_b - m).exp()
        return num_a * fa[..., None] + num_b * fb[..., None], den_a * fa + den_b * fb, m


class PartialAggregation(nn.Module):
    """The rank-local stage: a stack of reduction levels (a tree when k > 1)."""

    def __init__(self, levels: list[nn.Module]):
        super().__init__()
        self.levels = nn.ModuleList(levels)

    def forward(self, tokens: torch.Tensor, source: int = 0) -> torch.Tensor:  # [B, c_r, L, D] -> [B, G/P, L, D]
        for level in self.levels:
            tokens = level(tokens, source=source)
        return tokens


class NoPartialAggregation(nn.Module):
    """flat: every channel token goes to the final aggregation."""

    def forward(self, tokens: torch.Tensor, source: int = 0) -> torch.Tensor:
        return tokens


def identity_segment_sizes(sources: SourceLayout, levels: int) -> tuple[int, ...]:
    """Per union id: the size of the first-level segment of its first slot in the first source
    that has it (D-CHAG-L's coefficient starts at 1/n; with one source, its own segment's size)."""
    out = [0] * sources.num_channels
    for s in range(sources.num_sources):
        slots = sources.slots(s)
        sizes = tree_levels(ChannelPartition(len(slots), sources.groups), 0, levels)[0].sizes  # every group (P = 1)
        for u, n in zip(slots, (n for n in sizes for _ in range(n))):
            out[u] = out[u] or n
    return tuple(out)


def source_tree_levels(partition: ChannelPartition | None, rank: int, tree_levels_k: int,
                       sources: SourceLayout | None = None) -> list[tuple[SegmentLevel, ...]]:
    """The rank's tree levels, each per data source: ``[level][source]`` (one source: ``partition``'s)."""
    partitions = [partition] if sources is None else [sources.partition(s) for s in range(sources.num_sources)]
    by_source = [tree_levels(p, rank, tree_levels_k) for p in partitions]
    return [tuple(per_source[j] for per_source in by_source) for j in range(tree_levels_k)]


def build_partial_aggregation(kind: str, partition: ChannelPartition | None, rank: int, tree_levels_k: int,
                              hidden_size: int, num_heads: int, seed: int, owner: bool,
                              attention_backend: str = "unfused", sources: SourceLayout | None = None) -> nn.Module:
    """``partition``: the one source's channels; ``sources``: a blend's layout instead (each source
    grouped as its own channels; dchag/parallel/sources.py)."""
    if kind == "flat":
        return NoPartialAggregation()
    levels = source_tree_levels(partition, rank, tree_levels_k, sources)
    if kind == "linear":
        bank = None if sources is None else Bank.of(sources, rank)
        sizes = None if sources is None else identity_segment_sizes(sources, tree_levels_k)
        return PartialAggregation([LinearReduce(lv[0], owner, lv, bank if j == 0 else None, sizes)
                                   for j, lv in enumerate(levels)])
    return PartialAggregation([CrossReduce(lv[0], hidden_size, num_heads, seed, f"partial.{i}", owner, attention_backend,
                                           lv) for i, lv in enumerate(levels)])


class FinalAggregation(nn.Module):
    """Learned-query cross-attention over N tokens per position, heads split over TP.

    tokens [B, N, L, D] (identical on every TP rank) -> [B, L, D]. The fused key/value
    projection is a megatron ColumnParallelLinear whose output is laid out per head
    ([H, 2, hd], like megatron's fused QKV), so the contiguous TP split is a head split and the
    initialization does not depend on T. Its backward all-reduces the input gradient over TP
    (megatron's copy-to-TP-region), which is what lets the channel all-gather's backward be a
    plain slice. The output projection is a RowParallelLinear (forward all-reduce).
    """

    def __init__(self, config, hidden_size: int, num_heads: int, tensor_parallel_size: int,
                 attention_backend: str = "unfused"):
        super().__init__()
        from megatron.core import tensor_parallel
        D, T = hidden_size, tensor_parallel_size
        self.attention_backend = attention_backend
        self.heads_local, self.head_dim = num_heads // T, D // num_heads
        # Its output is the backbone's input token, not a residual branch: unit-gain projections
        # (std 1/sqrt(D), as CrossReduce's), not megatron's 0.02 and 0.02/sqrt(2 layers), which made
        # the image ~0.4 % of the token beside the position embedding at init (docs/PARITY.md, "Init").
        # With use_cpu_initialization the master weight is drawn in full, then sliced: T-independent.
        from megatron.core.utils import init_method_normal
        unit_gain = init_method_normal(1.0 / math.sqrt(D))
        self.kv = tensor_parallel.ColumnParallelLinear(D, 2 * D, config=config, init_method=unit_gain,
                                                       bias=True, gather_output=False)
        self.proj = tensor_parallel.RowParallelLinear(D, D, config=config, init_method=unit_gain,
                                                      bias=True, input_is_parallel=True, skip_bias_add=False)
        # The learned query, already in head space: [H, hd] in full, this rank's heads only. Zero,
        # as ClimaX's: uniform attention at init, the mean of the G tokens.
        self.query = nn.Parameter(torch.zeros(D // T))
        self.query.tensor_model_parallel, self.query.partition_dim, self.query.partition_stride = True, 0, 1

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        B, N, L, D = tokens.shape
        Hl, hd = self.heads_local, self.head_dim
        x = tokens.permute(1, 0, 2, 3).reshape(N, B * L, D)  # megatron layout [s, b, h], s = N tokens
        kv, _ = self.kv(x)  # [N, B*L, 2 D/T]
        kv = kv.reshape(N, B * L, Hl, 2, hd)
        k, v = kv[..., 0, :], kv[..., 1, :]  # [N, B*L, Hl, hd]
        q = self.query.reshape(Hl, hd)
        mixed = token_attention(q, k, v, self.attention_backend).reshape(1, B * L, Hl * hd)
        out, _ = self.proj(mixed)  # [1, B*L, D], all-reduced over TP
        return out.reshape(B, L, D)
