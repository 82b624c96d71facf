"""Plain-text / Markdown tables of plans."""

from __future__ import annotations

from dchag.planner.plan import GB, Plan


def format_table(headers: list[str], rows: list[list], markdown: bool = False) -> str:
    cells = [[str(c) for c in r] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---:" for _ in headers) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in cells]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.rjust(w) for h, w in zip(headers, widths))
    out = [line, "-" * len(line)]
    out += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    return "\n".join(out)


def _gb(x: float) -> str:
    return f"{x / GB:.2f}"


def method_name(plan: Plan) -> str:
    m = plan.model
    if m.aggregation == "flat":
        return "TP alone (flat)"
    tree = f", k={m.tree_levels}" if m.tree_levels > 1 else ""
    stream = f", streamed K={m.channel_chunk}" if m.channel_chunk else ""
    return f"D-CHAG-{'L' if m.aggregation == 'linear' else 'C'} (G={m.G}{tree}{stream})"


LAYOUT_HEADERS = ["method", "T", "P", "DP", "ZeRO", "recomp", "params+grads+opt GB", "activations GB",
                  "channel stage GB", "peak GB", "fits", "TFLOP/rank", "comm GB/rank", "step s", "samples/s"]


def layout_row(p: Plan) -> list:
    m, lay = p.memory, p.layout
    return [method_name(p), lay.tensor_parallel, lay.channel_parallel, lay.data_parallel, lay.zero_stage,
            "yes" if lay.recompute else "no", _gb(m.params + m.grads + m.optimizer), _gb(m.activation_total),
            _gb(m.activations["channel_stage"]), _gb(m.total), "yes" if p.fits else "NO",
            f"{p.flops / 1e12:.2f}", _gb(p.comm_bytes), f"{p.step_time_s:.3f}", f"{p.samples_per_s:.1f}"]


def layouts_table(plans: list[Plan], markdown: bool = False) -> str:
    return format_table(LAYOUT_HEADERS, [layout_row(p) for p in plans], markdown)


def detail(plan: Plan, markdown: bool = False) -> str:
    """Breakdown of one plan: memory components, collectives, FLOPs."""
    m = plan.memory
    mem_rows = [
        ["parameters", _gb(m.params)], ["gradients", _gb(m.grads)], ["optimizer state", _gb(m.optimizer)],
        ["input batch", _gb(m.data)],
        ["activations: channel stage", _gb(m.activations["channel_stage"])],
        ["activations: backbone", _gb(m.activations["backbone"])],
        ["activations: head + loss", _gb(m.activations["head"])],
        [f"peak (step, at {m.peak_phase})", _gb(m.total)],
        ["budget (memory - reserve)", _gb(plan.hardware.usable_bytes)],
    ]
    coll_rows = [[c.phase, c.what, c.kind, f"{c.group}({c.group_size})", c.calls, f"{c.payload_bytes / 2**20:.2f}",
                  f"{c.sent_bytes / 2**20:.2f}"] for c in plan.colls if c.group_size > 1]
    flop_rows = [[k, f"{3 * v / 1e12:.3f}"] for k, v in plan.flops_breakdown.items()]
    parts = [f"{method_name(plan)}: T={plan.layout.tensor_parallel} P={plan.layout.channel_parallel} "
             f"DP={plan.layout.data_parallel} ZeRO-{plan.layout.zero_stage} {plan.layout.precision}"
             f"{' recompute' if plan.layout.recompute else ''}"
             f"{' SP' if plan.layout.sequence_parallel else ''}, micro batch {plan.layout.micro_batch_size}; "
             f"{m.param_numel / 1e9:.3f} B parameters on this rank",
             format_table(["memory per rank", "GB"], mem_rows, markdown),
             format_table(["phase", "collective", "kind", "group", "calls", "payload MiB", "sent MiB"],
                          coll_rows or [["-", "none (one rank)", "", "", "", "", ""]], markdown),
             format_table(["FLOPs per step (fwd + bwd)", "TFLOP"], flop_rows + [["total", f"{plan.flops / 1e12:.3f}"]],
                          markdown),
             f"estimated step {plan.step_time_s:.3f} s (compute {plan.compute_time_s:.3f} s, communication "
             f"{plan.comm_time_s:.3f} s), {plan.samples_per_s:.1f} samples/s"]
    return "\n\n".join(parts)
