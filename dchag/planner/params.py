"""Parameter counts per rank, component by component, exactly as ``DChagViT`` builds them.

    tokenizer   c_r (D p^2 + 2 D)                    per-channel patch embedding, bias, channel embedding
    partial     linear: inputs of every level          one scalar weight per input token
                cross:  outputs x (3 D^2 + 2 D)        per segment: query, K, V, proj (+ bias)
    final       3 D^2/T + 3 D/T + D                    kv (column-parallel), proj (row-parallel), query
    embed       L D + D (mae: mask token; forecast: lead-time Linear(1, D) = 2 D)
    backbone    n [(4 D^2 + 2 D F)/T + (3 D + F)/T + 6 D] + 2 D   megatron local-spec layers + final norm
    head        mae: c_r (p^2 D + p^2) (channel-sharded); forecast: V p^2 (D + 1)

c_r is the largest rank's channel count (groups differ by at most one channel). In a blend of
data sources the per-channel rows (tokenizer, first-level coefficients, MAE head) are the union's
channels a rank holds, and c_r the largest source's slots on a rank.
"""

from __future__ import annotations

from dataclasses import dataclass

from dchag.model.chunks import chunk_plan
from dchag.parallel.partition import ChannelPartition
from dchag.planner.spec import LayoutSpec, ModelSpec, validate

CHANNEL_STAGE = ("tokenizer", "partial", "final")


@dataclass(frozen=True)
class Shapes:
    """Per-rank token counts of the channel stage."""
    c_r: int  # channels of the largest channel-parallel rank
    g_r: int  # groups per rank (G/P; C/P for flat)
    level_inputs: tuple[int, ...]  # per partial level: input tokens per position on this rank
    level_outputs: tuple[int, ...]  # per partial level: output tokens per position on this rank
    # per partial level: n_out x the largest segment (the padded copy uneven segments are gathered
    # into; equal to level_inputs when every segment has the same size), largest over ranks
    level_padded: tuple[int, ...] = ()
    # streamed channel stage (channel_chunk > 0): the largest chunk's tokens per position, and its
    # padded copy (pieces x the largest piece, when a chunk's pieces of segments are uneven)
    stream_chunk: int = 0
    stream_padded: int = 0
    # per-channel parameter rows the largest rank holds: c_r with one source; a blend: its home ids
    # of the union (dchag/parallel/sources.py), the same whichever source a step takes
    rows: int = 0


def shapes(model: ModelSpec, layout: LayoutSpec) -> Shapes:
    P = layout.channel_parallel
    blend = model.source_layout(P)
    if blend is None:
        part = ChannelPartition(model.C, model.G, P)
        rows = None
    else:  # the source with the most slots on a rank sets the activations; the union's home rows the parameters
        part = max((blend.partition(s) for s in range(blend.num_sources)),
                   key=lambda q: max(len(q.rank_channels(r)) for r in range(P)))
        rows = max(len(blend.home_ids(r)) for r in range(P))
    c_r = max(len(part.rank_channels(r)) for r in range(P))
    rows = c_r if rows is None else rows
    g_r = part.num_groups // P
    k = model.tree_levels
    if model.aggregation == "flat":
        return Shapes(c_r, g_r, (), (), rows=rows)
    ins, outs, padded = [], [], []
    stream_chunk = stream_padded = 0
    n_in = c_r
    for level in range(1, k + 1):
        fan = 2 ** (k - level)
        n_out = g_r * fan
        ins.append(n_in)
        outs.append(n_out)
        if level == 1:  # as dchag.model.aggregation.tree_levels splits each group into `fan` sub-groups
            sizes = [[base + (1 if i < extra else 0) for g in part.rank_groups(r)
                      for base, extra in [divmod(part.group_sizes[g], fan)] for i in range(fan)] for r in range(P)]
            padded.append(max(n_out * max(sz) if len(set(sz)) > 1 else n_in for sz in sizes))
            if model.channel_chunk:  # as dchag.model.streaming streams level 1
                chunks = [c for sz in sizes for c in chunk_plan(tuple(sz), part.stream_chunks(model.channel_chunk))]
                stream_chunk = max(len(c.inputs) for c in chunks)
                stream_padded = max(len(c.sizes) * max(c.sizes) for c in chunks)
        else:
            padded.append(n_in)  # pairs: uniform
        n_in = n_out
    return Shapes(c_r, g_r, tuple(ins), tuple(outs), tuple(padded), stream_chunk, stream_padded, rows)


def param_counts(model: ModelSpec, layout: LayoutSpec) -> dict[str, int]:
    """Parameters held by one rank, per component (before any ZeRO sharding)."""
    validate(model, layout)
    T = layout.tensor_parallel
    D, F, p2, L = model.D, model.F, model.patch_dim ** 2, model.L
    s = shapes(model, layout)
    out = {"tokenizer": s.rows * (D * p2 + 2 * D)}
    if model.aggregation == "flat":
        out["partial"] = 0
    elif model.aggregation == "linear":  # the first level: one coefficient per channel row
        out["partial"] = s.rows + sum(s.level_inputs[1:])
    else:
        out["partial"] = sum(n * (3 * D * D + 2 * D) for n in s.level_outputs)
    out["final"] = (2 * D * D + 2 * D) // T + D * D // T + D + D // T
    out["embed"] = L * D + (D if model.task == "mae" else 2 * D)
    per_layer = 4 * D + (3 * D * D + 3 * D) // T + D * D // T + D + (F * D + F) // T + D * F // T + D
    out["backbone"] = model.num_layers * per_layer + 2 * D
    if model.task == "mae":
        out["head"] = s.rows * (p2 * D + p2)
    else:
        out["head"] = model.V * p2 * (D + 1)
    return out


def total_params(model: ModelSpec) -> int:
    """Parameters of the whole (unsharded) model, as on one rank with T = P = 1."""
    return sum(param_counts(model, LayoutSpec()).values())
