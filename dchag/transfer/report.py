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


def _wavelength_line(plan: TransferPlan) -> str | None:
    """The pretrained bands' range, and how many of this run's bands fall inside it (only those can be
    interpolated: a band outside matches by name or an equal wavelength, or starts new)."""
    old, cfg = plan.pretrained, plan.cfg
    if all(m.kind == "same" for m in plan.matches):
        return None
    lams = sorted(w for w in (old.wavelengths or []) if w is not None)
    here = [w for w in (cfg.wavelengths or []) if w is not None]
    if not lams:
        return "  wavelengths: the pretrained model records none, so channels match by name only"
    line = f"  wavelengths: pretrained {lams[0]:g}-{lams[-1]:g} nm ({len(lams)} bands)"
    if not here:
        return line + "; this run's data gives none, so its channels match by name only"
    inside = sum(lams[0] <= w <= lams[-1] for w in here)
    line += f"; here {min(here):g}-{max(here):g} nm"
    if inside == 0:
        return line + (f": none of the {len(here)} bands falls inside the pretrained range, so none can be "
                       "interpolated (only a name or an equal wavelength matches; wrong unit?)")
    return line + f": {inside} of {len(here)} inside the pretrained range"


def _row_kind(sources) -> str:
    if not sources:
        return "new"
    return "loaded" if len(sources) == 1 and sources[0][1] == 1.0 else "interpolated"


def _values(plan: TransferPlan, new_shapes: dict) -> dict:
    """Values per category; a per-channel tensor's values counted row by row (a copied row is loaded)."""
    out = dict.fromkeys(("loaded", "interpolated", "new"), 0)
    for name, p in plan.params.items():
        n = math.prod(new_shapes[name])
        if p.per_channel:
            for sources in p.rows:
                out[_row_kind(sources)] += n // len(p.rows)
        else:
            out[p.category] += n
    return out


def _listed(plan: TransferPlan, name: str) -> str:
    p = plan.params[name]
    if not p.per_channel:
        return name
    counts = {k: sum(_row_kind(r) == k for r in p.rows) for k in ("loaded", "interpolated", "new")}
    return f"{name} (per channel: " + ", ".join(f"{v} {k}" for k, v in counts.items() if v) + ")"


def _lora_lines(plan: TransferPlan, new_shapes: dict, roles: dict) -> list[str]:
    """What trains under --lora-rank, and the trainable share (dchag/transfer/load.py freeze_for_lora)."""
    from dchag.model.lora import spec_of
    values = {role: sum(math.prod(new_shapes[n]) for n in names) for role, names in roles.items()}
    total = sum(values.values())
    trains = total - values["frozen"]
    linears = len(roles["adapters"]) // 2
    return [f"  LoRA: {spec_of(plan.cfg).describe()}: {linears} linears, {len(roles['adapters'])} adapter tensors "
            f"({values['adapters']:,} values)",
            f"    trains besides the adapters: the head and the task's conditioning ({_names(roles['task'])}; "
            f"{values['task']:,} values); the new and interpolated tensors ({_names(roles['transferred'])}; "
            f"{values['transferred']:,} values)",
            f"    frozen: {len(roles['frozen'])} tensors loaded from the pretrained model ({values['frozen']:,} values); "
            f"trainable: {trains:,} of {total:,} values ({100.0 * trains / max(total, 1):.2f} %)"]


def format_table(plan: TransferPlan, where: str, shapes: dict, new_shapes: dict, groups_given: bool,
                 channel_parallel_size: int, frozen: list[str] | None = None, lr_mult: float = 1.0,
                 lora: dict | None = None) -> str:
    from dchag.transfer.architecture import group_rule
    old, cfg = plan.pretrained, plan.cfg
    kinds = {k: [c for c, m in enumerate(plan.matches) if m.kind == k] for k in KINDS}
    lines = [f"> fine-tuning from {where}: weights only (iteration 0, a fresh optimizer and LR schedule, this run's layout)"]
    if len(kinds["same"]) == cfg.num_channels:
        lines.append(f"  channels: the pretrained model's own {cfg.num_channels} (the same names and wavelengths)")
    else:
        lines.append(f"  channels: {old.num_channels} pretrained -> {cfg.num_channels} here: "
                     f"{len(kinds['name']) + len(kinds['wavelength'])} loaded ({len(kinds['name'])} by name, "
                     f"{len(kinds['wavelength'])} by wavelength), {len(kinds['interpolated'])} interpolated between "
                     f"two pretrained bands, {len(kinds['new'])} new")
    wavelengths = _wavelength_line(plan)
    if wavelengths:
        lines.append(wavelengths)
    if kinds["interpolated"]:
        lines.append(f"    interpolated: {_names([_channel(cfg, c) for c in kinds['interpolated']])}")
    if kinds["new"]:
        lines.append(f"    new: {_names([_channel(cfg, c) for c in kinds['new']])}")
    if plan.groups is not None:
        line = (f"  groups: G = {cfg.num_groups} by count over {cfg.num_channels} channels (pretrained: G = "
                f"{old.num_groups} over {old.num_channels})")
        G, why = group_rule(old, list(plan.matches), channel_parallel_size)
        if groups_given:
            line += "; --dchag-groups"
        elif G != old.num_groups:
            line += f"; {why} (--dchag-groups chooses)"
        whole = sum(same for _, same in plan.groups)
        if whole:
            line += f"; {whole} of {cfg.num_groups} are pretrained groups, whole"
        lines.append(line)
    if old.grid != cfg.grid:
        lines.append(f"  tile: {old.img_h} x {old.img_w} -> {cfg.img_h} x {cfg.img_w} pixels: position embedding "
                     f"interpolated (bicubic, {old.grid[0]} x {old.grid[1]} -> {cfg.grid[0]} x {cfg.grid[1]} patches)")
    if old.channel_embedding != cfg.channel_embedding:
        lines.append(f"  channel embedding: {old.channel_embedding} -> {cfg.channel_embedding} (--channel-embedding; "
                     "the fixed wavelength part has no weight)")
    if old.task != cfg.task:
        lines.append(f"  task: {old.task} -> {cfg.task}: the head and the task's conditioning start new")
    lines.append(f"  {'parameters':<14}{'tensors':>8}{'values':>14}   (values: a per-channel tensor counted by row)")
    numel = lambda shape: math.prod(shape)  # noqa: E731
    values = _values(plan, new_shapes)
    for category in ("loaded", "interpolated", "new"):
        lines.append(f"    {category:<12}{len(plan.names(category)):>8}{values[category]:>14,}")
    lines.append(f"    {'dropped':<12}{len(plan.dropped):>8}{sum(numel(shapes[n]) for n in plan.dropped):>14,}")
    adapters = set(lora["adapters"]) if lora else set()
    new = _names([n for n in plan.names("new") if n not in adapters]) + \
        (f" (and the {len(adapters)} LoRA adapter tensors)" if adapters else "")
    lines += [f"  interpolated: {_names([_listed(plan, n) for n in plan.names('interpolated')])}",
              f"  new: {new}", f"  dropped: {_names(list(plan.dropped))}"]
    if lr_mult != 1.0:
        lines.append(f"  --new-params-lr-mult {lr_mult:g}: the new and interpolated tensors train at {lr_mult:g}x the rate")
    if frozen is not None:
        lines.append(f"  --freeze-encoder: only {_names(frozen)} train "
                     f"({sum(numel(new_shapes[n]) for n in frozen):,} values)")
    if lora is not None:
        lines += _lora_lines(plan, new_shapes, lora)
    return "\n".join(lines)
