"""The plan applied to this rank's parameters: weights, marks for --new-params-lr-mult, --freeze-encoder."""

from __future__ import annotations

import torch

from dchag.transfer.plan import TransferPlan
from dchag.transfer.pos_embed import interpolate_pos_embed


@torch.no_grad()
def copy_into(model, plan: TransferPlan, tensors: dict[str, torch.Tensor]) -> None:
    """Every parameter's loaded or interpolated part from the full pretrained ``tensors``: a
    per-row parameter computes only the rows this rank holds, every other one takes its shard of
    the full (possibly resized) tensor; "new" parts keep this run's (layout-free) initialization."""
    from dchag.parallel.state_dict import shard_of
    for name, param in model.named_parameters():
        p = plan.params[name]
        if p.category == "new":
            continue
        old = tensors[p.source]
        if p.rows is not None:
            rows = getattr(param, "channel_ids", range(param.shape[0]))  # a blend: the rank's home ids
            for local, sources in enumerate(p.rows[u] for u in rows):
                if sources:  # in float64: a copied row (weight 1) stays bit-exact
                    row = sum(w * old[i].double() for i, w in sources)
                    param[local].copy_(row.to(param.dtype))
        else:
            full = interpolate_pos_embed(old, *p.resize) if p.resize else old
            param.copy_(shard_of(param, full).to(param.dtype))


def mark_new_parameters(model, plan: TransferPlan) -> None:
    """Tag every parameter with a new or interpolated part (``--new-params-lr-mult``; the unit is
    the tensor: AdamW normalizes each value's step, so a per-row rate cannot be had by scaling)."""
    for name, param in model.named_parameters():
        param.transfer_new = plan.params[name].category != "loaded"


def is_new_parameter(param) -> bool:
    return getattr(param, "transfer_new", False)


def freeze_encoder(model) -> list[str]:
    """--freeze-encoder (a linear probe): only the task's head and conditioning train; returns their names."""
    keep = set(model.task_parameter_names())
    for name, param in model.named_parameters():
        if name not in keep:
            param.requires_grad_(False)
    return sorted(keep)


def freeze_for_lora(model, plan: TransferPlan) -> dict[str, list[str]]:
    """--lora-rank: the adapters train, with the task's head and conditioning and every tensor the plan
    made new or interpolated (whole tensors: a tensor with one interpolated row trains whole); every
    tensor loaded from the pretrained model is frozen. Returns the names by role: "adapters", "task",
    "transferred" (new or interpolated), "frozen"."""
    from dchag.model.lora import is_adapter
    task = set(model.task_parameter_names())
    out = {"adapters": [], "task": [], "transferred": [], "frozen": []}
    for name, param in model.named_parameters():
        if is_adapter(param):
            out["adapters"].append(name)
        elif name in task:
            out["task"].append(name)
        elif plan.params[name].category != "loaded":
            out["transferred"].append(name)
        else:
            param.requires_grad_(False)
            out["frozen"].append(name)
    return out
