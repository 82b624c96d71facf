"""Collectives per training step and rank, as ``DChagViT`` + megatron + ZeRO issue them.

Payload = the tensor a rank hands to the collective (for all-gather: its own input). Bytes a
rank sends (ring algorithms, group of n ranks):

    all_reduce      2 (n-1)/n * S      all_gather    (n-1) * s
    reduce_scatter  (n-1)/n * S        broadcast / all_to_all   (n-1)/n * S

Per step (tok = B L D a bytes, one hidden state; N = C for flat, G for D-CHAG; g_r = G/P):

    forward   gather of the partial tokens     all_gather  g_r tok        channel group  (P > 1)
              final proj (row-parallel)        all_reduce  tok            TP group       (T > 1)
              backbone, per layer              2 all_reduce tok           TP             (no SP)
                                               2 all_gather tok/T + 2 reduce_scatter tok (SP)
              MAE loss sums                    all_reduce  8 bytes        channel group  (P > 1)
    backward  final kv input grad (column)     all_reduce  N tok          TP   <- C/G smaller with D-CHAG
              backbone, per layer              2 all_reduce tok (no SP) | 4 all_gather tok/T + 2 reduce_scatter tok (SP)
              MAE head input grad              all_reduce  tok            channel group  (P > 1)
              recompute: the layers' forward collectives once more
    optimizer data parallel (DP > 1)           ZeRO-0 all_reduce grads; ZeRO-1/2 reduce_scatter grads +
                                               all_gather params; ZeRO-3 also all_gathers params in fwd and bwd
"""

from __future__ import annotations

from dataclasses import dataclass

from dchag.planner.params import param_counts, shapes
from dchag.planner.spec import LayoutSpec, ModelSpec, validate

LOSS_SUM_BYTES = 8  # two fp32 sums (error, weight) reduced over the channel group


def ring_bytes_sent(kind: str, payload: float, n: int) -> float:
    if n <= 1:
        return 0.0
    if kind == "all_reduce":
        return 2.0 * (n - 1) / n * payload
    if kind == "all_gather":
        return float((n - 1) * payload)
    return (n - 1) / n * payload


@dataclass(frozen=True)
class Collective:
    phase: str  # forward | backward | optimizer
    what: str
    kind: str
    group: str  # tp | cp | dp
    group_size: int
    payload_bytes: float
    calls: int = 1
    channel_stage: bool = False

    @property
    def sent_bytes(self) -> float:
        return self.calls * ring_bytes_sent(self.kind, self.payload_bytes, self.group_size)

    @property
    def total_payload(self) -> float:
        return self.calls * self.payload_bytes


def collectives(model: ModelSpec, layout: LayoutSpec) -> list[Collective]:
    validate(model, layout)
    T, P, DP, B, a = (layout.tensor_parallel, layout.channel_parallel, layout.data_parallel,
                      layout.micro_batch_size, layout.act_bytes)
    D, L, n = model.D, model.L, model.num_layers
    tok = B * L * D * a
    sp = layout.sequence_parallel and T > 1
    s = shapes(model, layout)
    out: list[Collective] = []
    add = out.append
    if P > 1:
        add(Collective("forward", "gather partial tokens", "all_gather", "cp", P, s.g_r * tok, channel_stage=True))
    if T > 1:
        add(Collective("forward", "final aggregation proj", "all_reduce", "tp", T, tok, channel_stage=True))
        add(Collective("backward", "final aggregation kv input grad", "all_reduce", "tp", T, model.G * tok,
                       channel_stage=True))
        if sp:
            add(Collective("forward", "backbone qkv/fc1 input", "all_gather", "tp", T, tok / T, calls=2 * n))
            add(Collective("forward", "backbone proj/fc2 output", "reduce_scatter", "tp", T, tok, calls=2 * n))
            add(Collective("forward", "gather backbone output", "all_gather", "tp", T, tok / T))
            add(Collective("backward", "backbone qkv/fc1 input (again) and proj/fc2 output grad", "all_gather",
                           "tp", T, tok / T, calls=4 * n))
            add(Collective("backward", "backbone qkv/fc1 input grad", "reduce_scatter", "tp", T, tok, calls=2 * n))
            add(Collective("backward", "scatter backbone input grad", "all_gather", "tp", T, tok / T))
            if layout.zero_stage == 3:  # partitioned parameters: one all-reduce per parameter (the fallback)
                add(Collective("backward", "sequence-parallel norm/bias grads", "all_reduce", "tp", T, D * a,
                               calls=6 * n + 2))
            else:  # coalesced (dchag.parallel.grads): one flat all-reduce per layer (2 norms x 2 + 2 biases)
                add(Collective("backward", "sequence-parallel norm/bias grads, per layer", "all_reduce", "tp", T,
                               6 * D * a, calls=n))
                add(Collective("backward", "sequence-parallel final norm grads", "all_reduce", "tp", T, 2 * D * a))
        else:
            add(Collective("forward", "backbone proj/fc2 output", "all_reduce", "tp", T, tok, calls=2 * n))
            add(Collective("backward", "backbone qkv/fc1 input grad", "all_reduce", "tp", T, tok, calls=2 * n))
        if layout.recompute:  # the recomputed forward runs the layers' forward collectives again
            if sp:
                add(Collective("backward", "recompute: backbone qkv/fc1 input", "all_gather", "tp", T, tok / T,
                               calls=2 * n))
                add(Collective("backward", "recompute: backbone proj/fc2 output", "reduce_scatter", "tp", T, tok,
                               calls=2 * n))
            else:
                add(Collective("backward", "recompute: backbone proj/fc2 output", "all_reduce", "tp", T, tok,
                               calls=2 * n))
    if P > 1 and model.task == "mae":
        add(Collective("forward", "MAE loss sums", "all_reduce", "cp", P, LOSS_SUM_BYTES))
        add(Collective("backward", "MAE head input grad", "all_reduce", "cp", P, tok))
    if DP > 1:
        numel = sum(param_counts(model, layout).values())
        g = p = 4 if layout.precision == "fp32" else 2  # gradient / parameter bytes
        if layout.zero_stage == 0:
            add(Collective("optimizer", "data-parallel gradient all-reduce", "all_reduce", "dp", DP, numel * g))
        else:
            add(Collective("optimizer", "ZeRO gradient reduce-scatter", "reduce_scatter", "dp", DP, numel * g))
            add(Collective("optimizer", "ZeRO updated-parameter all-gather", "all_gather", "dp", DP, numel * p / DP))
            if layout.zero_stage == 3:
                add(Collective("forward", "ZeRO-3 parameter all-gather", "all_gather", "dp", DP, numel * p / DP))
                add(Collective("backward", "ZeRO-3 parameter all-gather", "all_gather", "dp", DP, numel * p / DP))
    return out


def summarize(colls: list[Collective], channel_stage_only: bool = False) -> dict:
    """{phase: {"calls", "payload_bytes", "sent_bytes"}} in the benchmark's format."""
    out: dict = {}
    for c in colls:
        if channel_stage_only and not c.channel_stage:
            continue
        if c.group_size <= 1:
            continue
        ph = out.setdefault(c.phase, {"calls": 0, "payload_bytes": 0.0, "sent_bytes": 0.0})
        ph["calls"] += c.calls
        ph["payload_bytes"] += c.total_payload
        ph["sent_bytes"] += c.sent_bytes
    return out
