"""FLOPs per training step and rank (multiply-add = 2 FLOPs; backward = 2 x forward).

Forward, per rank (B micro batch, L patches, c_r = the rank's channels, N = C flat / G D-CHAG):

    tokenizer     2 B c_r L D p^2                       (TP alone: every rank tokenizes all C)
    linear level  2 B n_in L D
    cross level   4 B n_in L D^2 (K, V) + 4 B n_in L D (scores, mix) + 2 B n_out L D^2 (proj)
    final         4 B N L D^2/T + 4 B N L D/T + 2 B L D^2/T
    layer         2 B L (4 D^2 + 2 D F)/T + 4 B L^2 D/T
    head          MAE 2 B L D c_r p^2; forecast 2 B L D V p^2

A step is 3 x forward, plus one more backbone forward with recompute, plus one more forward of
the tokenizer and the first partial level when the channel stage is streamed (each chunk is
recomputed in backward; for cross the first level's K, V, scores and mix, not its projection).
"""

from __future__ import annotations

from dchag.planner.params import shapes
from dchag.planner.spec import LayoutSpec, ModelSpec, validate


def forward_flops(model: ModelSpec, layout: LayoutSpec) -> dict[str, float]:
    validate(model, layout)
    T, B = layout.tensor_parallel, layout.micro_batch_size
    D, L, F, p2 = model.D, model.L, model.F, model.patch_dim ** 2
    s = shapes(model, layout)
    out = {"tokenizer": 2.0 * B * s.c_r * L * D * p2}
    if model.aggregation == "linear":
        out["partial"] = sum(2.0 * B * n * L * D for n in s.level_inputs)
    elif model.aggregation == "cross":
        out["partial"] = sum(4.0 * B * i * L * D * D + 4.0 * B * i * L * D + 2.0 * B * o * L * D * D
                             for i, o in zip(s.level_inputs, s.level_outputs))
    else:
        out["partial"] = 0.0
    N = model.G
    out["final"] = 4.0 * B * N * L * D * D / T + 4.0 * B * N * L * D / T + 2.0 * B * L * D * D / T
    out["backbone"] = model.num_layers * (2.0 * B * L * (4 * D * D + 2 * D * F) / T + 4.0 * B * L * L * D / T)
    outputs = s.c_r if model.task == "mae" else model.V
    out["head"] = 2.0 * B * L * D * outputs * p2
    return out


def step_flops(model: ModelSpec, layout: LayoutSpec) -> float:
    f = forward_flops(model, layout)
    total = 3.0 * sum(f.values())
    if layout.recompute:
        total += f["backbone"]
    if model.channel_chunk:
        s = shapes(model, layout)
        n_in, n_out, D = s.level_inputs[0], s.level_outputs[0], model.D
        B, L = layout.micro_batch_size, model.L
        level0 = (2.0 * B * n_in * L * D if model.aggregation == "linear"
                  else 4.0 * B * n_in * L * D * D + 4.0 * B * n_in * L * D)
        total += f["tokenizer"] + level0
    return total


def model_flops_per_sample(model: ModelSpec) -> float:
    """Useful FLOPs of one sample's training step on the unsharded model (no replication)."""
    return step_flops(model, LayoutSpec())
