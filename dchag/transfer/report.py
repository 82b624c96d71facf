"""The start-up table of a fine-tune (rank 0 prints it before training)."""

from __future__ import annotations

import math

from dchag.transfer.channels import KINDS
from dchag.transfer.plan import TransferPlan

MAX_NAMES = 24


def _names(names: list[str]) -> str:
    if not names:
        return "-"
    more = f", ... ({len(names) - MAX_NAMES} more)" if len(names) > MAX_NAMES else ""
    return ", ".join(names[:MAX_NAMES]) + more


def _channel(cfg, c: int) -> str:
    name = cfg.channel_names[c] if cfg.channel_names is not None else f"channel {c}"
    lam = cfg.wavelengths[c] if cfg.wavelengths is not None else None
    return name if lam is None or name == f"{lam:.2f}nm" else f"{name} ({lam:g} nm)"


def format_table(plan: TransferPlan, where: str, shapes: dict, new_shapes: dict, groups_given: bool,
                 channel_parallel_size: int, frozen: list[str] | None = None, lr_mult: float = 1.0) -> str:
    old, cfg = plan.pretrained, plan.cfg
    kinds = {k: [c for c, m in enumerate(plan.matches) if m.kind == k] for k in KINDS}
    lines = [f"> fine-tuning from {where}: weights only (iteration 0, a fresh optimizer and LR schedule, this run's layout)"]
    if len(kinds["same"]) == cfg.num_channels:
        lines.append(f"  channels: the pretrained model's own {cfg.num_channels} (the same names and wavelengths)")
    else:
        lines.append(f"  channels: {old.num_channels} pretrained -> {cfg.num_channels} here: {len(kinds['name'])} by "
                     f"name, {len(kinds['wavelength'])} by wavelength, {len(kinds['interpolated'])} interpolated between "
                     f"two pretrained bands, {len(kinds['new'])} new")
    if kinds["interpolated"]:
        lines.append(f"    interpolated: {_names([_channel(cfg, c) for c in kinds['interpolated']])}")
    if kinds["new"]:
        lines.append(f"    new: {_names([_channel(cfg, c) for c in kinds['new']])}")
    if plan.groups is not None:
        line = (f"  groups: G = {cfg.num_groups} by count over {cfg.num_channels} channels (pretrained: G = "
                f"{old.num_groups} over {old.num_channels})")
        if cfg.num_groups != old.num_groups and not groups_given:
            line += (f"; fewer channels than the pretrained G: the largest multiple of --channel-parallel-size "
                     f"{channel_parallel_size} not above {cfg.num_channels} (--dchag-groups chooses)")
        lines.append(line)
    if old.grid != cfg.grid:
        lines.append(f"  tile: {old.img_h} x {old.img_w} -> {cfg.img_h} x {cfg.img_w} pixels: position embedding "
                     f"interpolated (bicubic, {old.grid[0]} x {old.grid[1]} -> {cfg.grid[0]} x {cfg.grid[1]} patches)")
    if old.channel_embedding != cfg.channel_embedding:
        lines.append(f"  channel embedding: {old.channel_embedding} -> {cfg.channel_embedding} (--channel-embedding; "
                     "the fixed wavelength part has no weight)")
    if old.task != cfg.task:
        lines.append(f"  task: {old.task} -> {cfg.task}: the head and the task's conditioning start new")
    lines.append(f"  {'parameters':<14}{'tensors':>8}{'values':>14}")
    numel = lambda shape: math.prod(shape)  # noqa: E731
    for category in ("loaded", "interpolated", "new"):
        names = plan.names(category)
        lines.append(f"    {category:<12}{len(names):>8}{sum(numel(new_shapes[n]) for n in names):>14,}")
    lines.append(f"    {'dropped':<12}{len(plan.dropped):>8}{sum(numel(shapes[n]) for n in plan.dropped):>14,}")
    interpolated = [n + (" (per channel)" if plan.params[n].per_channel else "") for n in plan.names("interpolated")]
    lines += [f"  interpolated: {_names(interpolated)}", f"  new: {_names(plan.names('new'))}",
              f"  dropped: {_names(list(plan.dropped))}"]
    if lr_mult != 1.0:
        lines.append(f"  --new-params-lr-mult {lr_mult:g}: the new and interpolated tensors train at {lr_mult:g}x the rate")
    if frozen is not None:
        lines.append(f"  --freeze-encoder: only {_names(frozen)} train "
                     f"({sum(numel(new_shapes[n]) for n in frozen):,} values)")
    return "\n".join(lines)
