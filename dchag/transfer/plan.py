"""Where each parameter of the new model comes from: the transfer plan, from names and shapes only.

Per parameter of the new model (names as in the serial model, shapes of the full tensors):

- per-channel rows (dim 0 = channels: the tokenizer's ``weight``, ``bias``, ``channel_embed``;
  D-CHAG-L's first-level coefficients; the MAE head's rows when both models are MAE) follow each
  channel's match (dchag/transfer/channels.py): copied, interpolated between two pretrained rows,
  or left at this run's initialization (a model pretrained on a blend of sources has one row per
  channel of their union: the new sensor is matched against the union). D-CHAG-L's coefficients
  are moved relative to their segment's size, w = w_old n_old / n_new, so a group still starts
  near its mean (a new channel keeps its initial 1 / n_new);
- per-group rows (the rest of the partial aggregation: D-CHAG-C's per-segment query, key, value,
  projections; later tree levels) are the rows of the pretrained group nearest to each new group;
- ``pos_embed`` on another tile grid: interpolated (dchag/transfer/pos_embed.py);
- the task's head and conditioning (``DChagViT.task_parameter_names``) are loaded only when the
  task is the same (a forecast head also needs the same channels), else they start new and the
  pretrained ones are dropped;
- everything else is loaded when the pretrained model has a tensor of that name and shape.

A parameter is "loaded" when every value is copied, "new" when none comes from the pretrained
model, and "interpolated" otherwise (resized, interpolated or re-grouped rows, or a mix of copied
and new rows). Nothing here depends on the layout: each rank applies the plan to its own rows and
shards (dchag/transfer/load.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from dchag.model.config import DChagConfig
from dchag.transfer.channels import ChannelMatch, match_channels, match_groups
from dchag.transfer.errors import FinetuneError

TOKENIZER_ROWS = ("tokenizer.weight", "tokenizer.bias", "tokenizer.channel_embed")
MAE_HEAD_ROWS = ("head.weight", "head.bias")
COEFFICIENTS = "partial.levels.0.weight"  # D-CHAG-L's first level: one coefficient per channel


@dataclass(frozen=True)
class ParamPlan:
    category: str  # "loaded" | "interpolated" | "new"
    source: str | None = None  # the pretrained tensor it comes from
    rows: tuple | None = None  # per row of dim 0: ((pretrained row, weight), ...), () = keep this run's init
    resize: tuple | None = None  # (pretrained grid, new grid): the position embedding
    per_channel: bool = False


@dataclass(frozen=True)
class TransferPlan:
    params: dict  # new parameter name -> ParamPlan
    dropped: tuple  # pretrained tensors nothing comes from
    matches: tuple  # ChannelMatch per new channel
    groups: tuple | None  # (pretrained group, same channels) per new group; None for flat
    pretrained: DChagConfig
    cfg: DChagConfig

    def names(self, category: str) -> list[str]:
        return [n for n, p in self.params.items() if p.category == category]


def full_shapes(model) -> dict[str, tuple[int, ...]]:
    """Each parameter's full (layout-free) shape, from this rank's shard."""
    from megatron.core import parallel_state as ps
    from dchag.parallel.state_dict import shard_kind
    out = {}
    for name, p in model.named_parameters():
        shape, kind = list(p.shape), shard_kind(p)
        if kind == "channel":
            shape[0] = p.channel_global_rows
        elif kind == "tensor":
            shape[p.partition_dim] *= ps.get_tensor_model_parallel_world_size()
        out[name] = tuple(shape)
    return out


def _segment_size_of_channels(cfg: DChagConfig) -> tuple[int, ...]:
    """The size of the first-level segment (group, or sub-group of a tree) of each channel (a
    blend: of each union channel's first slot in the first source that has it)."""
    from dchag.model.aggregation import identity_segment_sizes
    return identity_segment_sizes(cfg.source_layout(1), cfg.tree_levels)


def _row_category(rows) -> str:
    if not any(rows):
        return "new"
    if all(len(src) == 1 and src[0][1] == 1.0 for src in rows):
        return "loaded"
    return "interpolated"


def _channel_rows(matches: list[ChannelMatch], scale=None) -> tuple:
    rows = []
    for c, m in enumerate(matches):
        rows.append(tuple((i, w * (scale(i, c) if scale else 1.0)) for i, w in m.sources))
    return tuple(rows)


def plan_transfer(pretrained: DChagConfig, shapes: dict, cfg: DChagConfig, new_shapes: dict,
                  task_parameters: set, prefer: str | None = None) -> TransferPlan:
    """The plan for a model of ``cfg`` whose parameters have (full) ``new_shapes``, from a pretrained
    model of config ``pretrained`` whose tensors have ``shapes``; ``task_parameters``: the names of
    the new model's head and task conditioning; ``prefer``: --match-channels."""
    matches = match_channels(pretrained, cfg, prefer)
    same_channels = pretrained.num_channels == cfg.num_channels and all(
        m.copied and m.sources[0][0] == c for c, m in enumerate(matches))
    same_task = pretrained.task == cfg.task
    per_channel = set(TOKENIZER_ROWS) | (set(MAE_HEAD_ROWS) if same_task and cfg.task == "mae" else set())
    has_partial = cfg.aggregation != "flat" and pretrained.aggregation == cfg.aggregation
    groups = tuple(match_groups(pretrained, cfg, matches)) if has_partial else None
    if has_partial and cfg.aggregation == "linear":
        per_channel.add(COEFFICIENTS)
        n_old, n_new = _segment_size_of_channels(pretrained), _segment_size_of_channels(cfg)
    params = {}
    for name, shape in new_shapes.items():
        old = tuple(shapes[name]) if name in shapes else None
        shape = tuple(shape)
        if old is None or (name in task_parameters and not same_task) or \
                (name.startswith("head.") and cfg.task == "forecast" and not same_channels):
            params[name] = ParamPlan("new")
        elif name in per_channel:
            if old[1:] != shape[1:]:
                params[name] = ParamPlan("new")
                continue
            scale = (lambda i, c: n_old[i] / n_new[c]) if name == COEFFICIENTS else None
            rows = _channel_rows(matches, scale)
            params[name] = ParamPlan(_row_category(rows), name, rows, per_channel=True)
        elif name.startswith("partial.") and groups is not None:
            G_old, G_new = pretrained.num_groups, cfg.num_groups
            f = shape[0] // G_new
            if old[1:] != shape[1:] or old[0] != f * G_old or shape[0] != f * G_new:
                params[name] = ParamPlan("new")
                continue
            rows = tuple(((src * f + k, 1.0),) for src, _ in groups for k in range(f))
            same = all(identical for _, identical in groups)
            params[name] = ParamPlan("loaded" if same else "interpolated", name, rows)
        elif name == "pos_embed" and pretrained.grid != cfg.grid and old[-1] == shape[-1]:
            params[name] = ParamPlan("interpolated", name, resize=(pretrained.grid, cfg.grid))
        elif old == shape:
            params[name] = ParamPlan("loaded", name)
        else:
            params[name] = ParamPlan("new")
    used = {p.source for p in params.values() if p.source}
    plan = TransferPlan(params, tuple(n for n in shapes if n not in used), tuple(matches), groups, pretrained, cfg)
    _refuse_if_nothing_shared(plan, shapes, new_shapes, task_parameters)
    return plan


def _refuse_if_nothing_shared(plan: TransferPlan, shapes: dict, new_shapes: dict, task_parameters: set) -> None:
    if any(p.category != "new" for n, p in plan.params.items() if n not in task_parameters):
        return
    common = [n for n in new_shapes if n in shapes]
    if not common:
        raise FinetuneError(
            f"the pretrained checkpoint shares nothing with this model: none of its {len(shapes)} tensors is named like "
            f"a parameter of it (it has e.g. {', '.join(sorted(shapes)[:3])}; this model e.g. "
            f"{', '.join(sorted(new_shapes)[:3])}). Is it a dchag checkpoint (pretrain_dchag.py --save, or "
            "tools/convert_checkpoint.py --format consolidated)?")
    differ = [f"{n} {list(shapes[n])} vs {list(new_shapes[n])}" for n in common if tuple(shapes[n]) != tuple(new_shapes[n])]
    raise FinetuneError(
        "the pretrained checkpoint shares nothing with this model: no parameter of the encoder fits its tensors "
        f"(pretrained vs this model: {'; '.join(differ[:4])}). Leave the architecture flags out so they take the "
        "pretrained model's values.")
