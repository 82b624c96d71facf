"""Benchmark outputs: JSON, Markdown tables, PNG plot, target ratios, planner comparison."""

from __future__ import annotations

import json
import os
import platform

from dchag.bench.config import METHODS, BenchConfig, BenchModel
from dchag.planner.comm import collectives, summarize
from dchag.planner.memory import channel_stage_param_numel, estimate_memory
from dchag.planner.spec import LayoutSpec, ModelSpec

MB = 2 ** 20
TARGETS = {  # at C = 512, T = P = 4, D-CHAG-L against TP alone
    "channel_memory_ratio": 0.30,  # channel-stage peak memory per rank <= 30 % of the baseline's
    "step_memory_reduction": 0.60,  # whole-step peak memory per rank >= 60 % lower
    "step_speedup": 2.0,  # step time >= 2x shorter
    "stream_channel_memory_ratio": 0.06,  # D-CHAG-L streamed: channel-stage memory <= 6 % of the baseline's
}


# ------------------------------------------------------------------------------ planner link
def planner_specs(model: BenchModel, row: dict) -> tuple[ModelSpec, LayoutSpec]:
    agg = METHODS[row["method"]].aggregation
    spec = ModelSpec(num_layers=model.num_layers, hidden_size=model.hidden_size,
                     num_attention_heads=model.num_attention_heads, num_channels=row["C"], img_h=model.img_h,
                     img_w=model.img_w, patch_dim=model.patch_dim, ffn_hidden_size=model.ffn_hidden_size,
                     aggregation=agg, groups=model.groups, tree_levels=model.tree_levels if agg != "flat" else 1,
                     channel_chunk=model.channel_chunk if METHODS[row["method"]].streamed else 0,
                     attention_backend="unfused")  # the benchmark's model (BenchModel.dchag_config)
    layout = LayoutSpec(tensor_parallel=row["T"], channel_parallel=row["P"], data_parallel=1, zero_stage=0,
                        precision="fp32", recompute=model.recompute_activations,
                        sequence_parallel=model.sequence_parallel, micro_batch_size=model.micro_batch_size)
    return spec, layout


def _rel(pred: float, meas: float) -> float:
    return (pred - meas) / meas if meas else (0.0 if pred == 0 else float("inf"))


def _comm_matches(pred: dict, meas: dict) -> bool:
    phases = set(pred) | set(meas)
    for ph in phases:
        p, m = pred.get(ph, {}), meas.get(ph, {})
        if p.get("calls", 0) != m.get("calls", 0) or p.get("payload_bytes", 0) != m.get("payload_bytes", 0):
            return False
        if abs(p.get("sent_bytes", 0.0) - m.get("sent_bytes", 0.0)) > 1e-6 * max(1.0, m.get("sent_bytes", 0.0)):
            return False
    return True


def planner_check(model: BenchModel, rows: list[dict]) -> list[dict]:
    """Prediction vs measurement for every benchmark row (like with like)."""
    out = []
    for row in rows:
        spec, layout = planner_specs(model, row)
        est = estimate_memory(spec, layout)
        colls = collectives(spec, layout)
        ch = row["channel"]
        item = {
            "T": row["T"], "P": row["P"], "C": row["C"], "method": row["method"],
            "param_numel": {"pred": est.param_numel, "meas": row["param_numel"]},
            "channel_saved": {"pred": est.activations["channel_stage"], "meas": ch["saved_bytes"]},
            "channel_peak": {"pred": est.channel_stage_peak, "meas": ch["memory"]["above_step"]},
            # the plotted channel-stage memory: its parameters + the peak above
            "channel_memory": {"pred": est.channel_stage_peak + 4 * channel_stage_param_numel(spec, layout),
                               "meas": channel_memory(row)},
            "channel_comm_exact": _comm_matches(summarize(colls, channel_stage_only=True), ch["comm"]),
        }
        if "step" in row:
            st = row["step"]
            item.update({
                "step_saved": {"pred": est.activation_total, "meas": st["saved_bytes"]},
                "step_static": {"pred": est.static, "meas": st["memory"]["before_step"]},
                "step_peak": {"pred": est.total, "meas": st["memory"]["above_lib"]},
                "step_comm_exact": _comm_matches(summarize(colls), st["comm"]),
            })
        for v in item.values():
            if isinstance(v, dict) and "pred" in v:
                v["err"] = _rel(v["pred"], v["meas"])
        out.append(item)
    return out


def worst_errors(check: list[dict]) -> dict:
    keys = ("channel_saved", "channel_peak", "channel_memory", "step_saved", "step_static", "step_peak")
    worst = {}
    for k in keys:
        errs = [(abs(c[k]["err"]), c) for c in check if k in c]
        if errs:
            e, c = max(errs, key=lambda x: x[0])
            worst[k] = {"abs_err": e, "T": c["T"], "C": c["C"], "method": c["method"]}
    worst["comm_exact"] = all(c["channel_comm_exact"] and c.get("step_comm_exact", True) for c in check)
    worst["param_numel_exact"] = all(c["param_numel"]["pred"] == c["param_numel"]["meas"] for c in check)
    return worst


# ------------------------------------------------------------------------------ derived numbers
def channel_memory(row: dict) -> float:
    """Channel-stage memory per rank: its parameters + the peak of its forward/backward above the
    pre-step RSS (activations, gradients, working buffers)."""
    return row["channel"]["memory"]["above_step"] + 4 * row["channel_stage_param_numel"]


def comm_mb(part: dict, phase: str) -> float:
    return part["comm"].get(phase, {}).get("payload_bytes", 0) / MB


def _find(rows, T, C, method):
    return next((r for r in rows if r["T"] == T and r["C"] == C and r["method"] == method), None)


def targets(rows: list[dict], cfg: BenchConfig) -> dict:
    """The issue's targets at the largest C and T measured (C = 512, T = P = 4 by default)."""
    T, C = max(cfg.tensor_parallel), max(cfg.channels)
    base, lin = _find(rows, T, C, "tp"), _find(rows, T, C, "dchag-l")
    if base is None or lin is None:
        return {}
    out = {"T": T, "C": C, "G": cfg.model.groups}
    ratio = channel_memory(lin) / channel_memory(base)
    out["channel_memory_ratio"] = {"measured": ratio, "target": f"<= {TARGETS['channel_memory_ratio']:.2f}",
                                   "met": ratio <= TARGETS["channel_memory_ratio"],
                                   "baseline_mb": channel_memory(base) / MB, "dchag_mb": channel_memory(lin) / MB}
    b_bwd, l_bwd = comm_mb(base["channel"], "backward"), comm_mb(lin["channel"], "backward")
    comm_ratio = b_bwd / l_bwd if l_bwd else float("inf")
    out["channel_backward_comm_ratio"] = {"measured": comm_ratio, "target": f"~ C/G = {C / cfg.model.groups:g}",
                                          "met": abs(comm_ratio / (C / cfg.model.groups) - 1) < 0.25,
                                          "baseline_mb": b_bwd, "dchag_mb": l_bwd}
    streamed = _find(rows, T, C, "dchag-l-stream")
    if streamed is not None:
        ratio = channel_memory(streamed) / channel_memory(base)
        goal = TARGETS["stream_channel_memory_ratio"]
        out["stream_channel_memory_ratio"] = {"measured": ratio, "target": f"<= {goal:.2f}", "met": ratio <= goal,
                                              "baseline_mb": channel_memory(base) / MB,
                                              "dchag_mb": channel_memory(streamed) / MB}
    out["stream_time_cost"] = stream_time_costs(rows, T, C)
    if "step" in base and "step" in lin:
        red = 1 - lin["step"]["memory"]["above_lib"] / base["step"]["memory"]["above_lib"]
        red_abs = 1 - lin["step"]["memory"]["peak"] / base["step"]["memory"]["peak"]
        out["step_memory_reduction"] = {
            "measured": red, "target": f">= {TARGETS['step_memory_reduction']:.2f}",
            "met": red >= TARGETS["step_memory_reduction"],
            "baseline_mb": base["step"]["memory"]["above_lib"] / MB, "dchag_mb": lin["step"]["memory"]["above_lib"] / MB,
            "including_libraries": red_abs}
        sp = base["step"]["time_s"] / lin["step"]["time_s"]
        out["step_speedup"] = {"measured": sp, "target": f">= {TARGETS['step_speedup']:.1f}",
                               "met": sp >= TARGETS["step_speedup"],
                               "baseline_ms": base["step"]["time_s"] * 1e3, "dchag_ms": lin["step"]["time_s"] * 1e3}
    return out


def stream_time_costs(rows: list[dict], T: int, C: int) -> dict:
    """Time of the streamed methods over their unstreamed twins (channel stage; whole step if run)."""
    out = {}
    for plain, streamed in (("dchag-l", "dchag-l-stream"), ("dchag-c", "dchag-c-stream")):
        a, b = _find(rows, T, C, plain), _find(rows, T, C, streamed)
        if a is None or b is None:
            continue
        out[streamed] = {part: b[part]["time_s"] / a[part]["time_s"] for part in ("channel", "step")
                         if part in a and part in b}
    return out


# ------------------------------------------------------------------------------ writers
def _strip(row: dict) -> dict:
    row = json.loads(json.dumps(row))
    for part in ("channel", "step"):
        if part in row:
            row[part].pop("records", None)
    return row


def machine_info() -> dict:
    import torch
    return {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
            "platform": platform.platform(), "processor": platform.processor() or platform.machine()}


def write_json(path: str, cfg: BenchConfig, rows: list[dict], check: list[dict], tgt: dict, wall_s: float) -> None:
    with open(path, "w") as f:
        json.dump({"config": cfg.to_dict(), "machine": machine_info(), "wall_s": wall_s,
                   "rows": [_strip(r) for r in rows], "targets": tgt, "planner_check": check,
                   "planner_worst": worst_errors(check)}, f, indent=1)


def _fmt_ratio(x: float) -> str:
    return f"{x:.2f}"


def markdown(cfg: BenchConfig, rows: list[dict], check: list[dict], tgt: dict, wall_s: float) -> str:
    m = cfg.model
    lines = [
        "# D-CHAG vs tensor parallelism alone: side-by-side benchmark",
        "",
        f"Model: {m.num_layers} layers, hidden {m.hidden_size}, {m.num_attention_heads} heads, FFN {m.ffn_hidden_size}, "
        f"image {m.img_h}x{m.img_w}, patch {m.patch_dim} (L = {(m.img_h // m.patch_dim) * (m.img_w // m.patch_dim)}), "
        f"micro batch {m.micro_batch_size}, G = {m.groups}, tree levels {m.tree_levels}, MAE (mask ratio {m.mask_ratio}), "
        f"fp32{', sequence parallel' if m.sequence_parallel else ''}{', recompute' if m.recompute_activations else ''}. "
        f"TP alone = flat aggregation, P = 1; D-CHAG: P = T. DP = 1. {cfg.rounds} round(s) of {cfg.warmup} warm-up + "
        f"{cfg.steps} measured steps per case (rounds in alternating method order); time = the best round's median "
        f"step time of the slowest rank; memory = the largest rank's median. Sweep wall time {wall_s:.0f} s.",
        "",
        "Memory columns (MB per rank): *channel* = channel-stage parameters + peak of its forward/backward above "
        "the RSS before the step; *step above libs* = VmHWM minus the RSS before the model was built (parameters, "
        "optimizer state, input, activations, gradients: what a GPU's max-allocated shows); *VmHWM* = absolute "
        "(includes ~400 MB of torch/megatron libraries). Communication: payload MB per rank per step.",
        "",
        "| T=P | C | method | channel ms | channel MB | vs TP | ch. bwd comm MB | step ms | speed-up | step above libs MB | vs TP | VmHWM MB | fwd / bwd comm MB |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: (r["T"], r["C"], list(METHODS).index(r["method"]))):
        base = _find(rows, r["T"], r["C"], "tp")
        ch = r["channel"]
        cells = [str(r["T"]), str(r["C"]), METHODS[r["method"]].label, f"{ch['time_s'] * 1e3:.1f}",
                 f"{channel_memory(r) / MB:.1f}",
                 _fmt_ratio(channel_memory(r) / channel_memory(base)) if base else "-",
                 f"{comm_mb(ch, 'backward'):.2f}"]
        if "step" in r:
            st = r["step"]
            cells += [f"{st['time_s'] * 1e3:.1f}",
                      _fmt_ratio(base["step"]["time_s"] / st["time_s"]) + "x" if base else "-",
                      f"{st['memory']['above_lib'] / MB:.1f}",
                      _fmt_ratio(st["memory"]["above_lib"] / base["step"]["memory"]["above_lib"]) if base else "-",
                      f"{st['memory']['peak'] / MB:.0f}",
                      f"{comm_mb(st, 'forward'):.2f} / {comm_mb(st, 'backward'):.2f}"]
        else:
            cells += ["-"] * 6
        lines.append("| " + " | ".join(cells) + " |")
    if tgt:
        lines += ["", f"## Targets (C = {tgt['C']}, T = P = {tgt['T']}, D-CHAG-L vs TP alone)", "",
                  "| target | measured | goal | met |", "|---|---:|---:|---|"]
        names = {"channel_memory_ratio": "channel-stage memory, D-CHAG-L / TP",
                 "stream_channel_memory_ratio": "channel-stage memory, D-CHAG-L streamed / TP",
                 "step_memory_reduction": "whole-step peak memory reduction (above libraries)",
                 "step_speedup": "whole-step speed-up",
                 "channel_backward_comm_ratio": "channel-stage backward communication, TP / D-CHAG-L"}
        for k, label in names.items():
            if k in tgt:
                t = tgt[k]
                val = f"{t['measured']:.2f}" + ("x" if k in ("step_speedup", "channel_backward_comm_ratio") else "")
                if k == "step_memory_reduction":
                    val = f"{100 * t['measured']:.0f}% ({100 * t['including_libraries']:.0f}% incl. libraries)"
                if k in ("channel_memory_ratio", "stream_channel_memory_ratio"):
                    val = f"{100 * t['measured']:.0f}% ({t['dchag_mb']:.1f} / {t['baseline_mb']:.1f} MB)"
                lines.append(f"| {label} | {val} | {t['target']} | {'yes' if t['met'] else 'no'} |")
    costs = tgt.get("stream_time_cost") if tgt else None
    if costs:
        lines += ["", f"Time of the streamed channel stage (K = {m.channel_chunk}) over the unstreamed, at C = {tgt['C']}, "
                  f"T = P = {tgt['T']}: " + "; ".join(
                      f"{METHODS[name].label}: channel stage {c['channel']:.2f}x"
                      + (f", whole step {c['step']:.2f}x" if "step" in c else "") for name, c in costs.items()) + "."]
    lines += ["", "## Planner vs measurement", "",
              "Predicted by `dchag/planner` for the same model and layout. *saved*: activation bytes autograd "
              "saves (counted with saved-tensor hooks); *ch. peak*: channel stage's peak above the pre-step RSS; "
              "*channel*: its parameters + that peak (the table's channel MB); "
              "*static*: parameters + optimizer state + input (RSS before a step minus RSS before the model); "
              "*step peak*: VmHWM above libraries. Collective bytes and calls must match exactly.", "",
              "| T | C | method | params | ch. saved MB | ch. peak MB | channel MB | step saved MB | static MB | step peak MB | collectives |",
              "|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---|"]

    def pm(d):
        return f"{d['pred'] / MB:.1f} / {d['meas'] / MB:.1f} ({100 * d['err']:+.1f}%)"

    for c in sorted(check, key=lambda c: (c["T"], c["C"], list(METHODS).index(c["method"]))):
        exact = c["param_numel"]["pred"] == c["param_numel"]["meas"]
        cells = [str(c["T"]), str(c["C"]), c["method"], "exact" if exact else
                 f"{c['param_numel']['pred']} vs {c['param_numel']['meas']}", pm(c["channel_saved"]), pm(c["channel_peak"]),
                 pm(c["channel_memory"]) if "channel_memory" in c else "-"]
        if "step_saved" in c:
            cells += [pm(c["step_saved"]), pm(c["step_static"]), pm(c["step_peak"]),
                      "exact" if c["channel_comm_exact"] and c["step_comm_exact"] else "MISMATCH"]
        else:
            cells += ["-", "-", "-", "exact" if c["channel_comm_exact"] else "MISMATCH"]
        lines.append("| " + " | ".join(cells) + " |")
    w = worst_errors(check)
    lines += ["", "Worst |error|: " + ", ".join(f"{k} {100 * v['abs_err']:.1f}% (T={v['T']} C={v['C']} {v['method']})"
                                               for k, v in w.items() if isinstance(v, dict))
              + f"; collectives exact: {w['comm_exact']}; parameter counts exact: {w['param_numel_exact']}.", ""]
    return "\n".join(lines)


def plot(path: str, cfg: BenchConfig, rows: list[dict]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    Ts = sorted({r["T"] for r in rows})
    whole = any("step" in r for r in rows)
    panels = [("channel-stage memory (MB/rank)", lambda r: channel_memory(r) / MB)]
    if whole:
        panels += [("whole-step peak above libraries (MB/rank)", lambda r: r["step"]["memory"]["above_lib"] / MB),
                   ("whole-step time (ms)", lambda r: r["step"]["time_s"] * 1e3)]
    else:
        panels += [("channel-stage time (ms)", lambda r: r["channel"]["time_s"] * 1e3)]
    fig, axes = plt.subplots(len(panels), len(Ts), figsize=(4.2 * len(Ts), 3.2 * len(panels)), squeeze=False)
    styles = {"tp": ("black", "o"), "dchag-l": ("tab:blue", "s"), "dchag-c": ("tab:orange", "^"),
              "dchag-l-stream": ("tab:cyan", "D"), "dchag-c-stream": ("tab:red", "v")}
    for j, T in enumerate(Ts):
        for i, (title, fn) in enumerate(panels):
            ax = axes[i][j]
            for method in cfg.methods:
                pts = sorted((r["C"], fn(r)) for r in rows if r["T"] == T and r["method"] == method)
                if pts:
                    color, marker = styles.get(method, (None, "x"))
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, color=color,
                            label=METHODS[method].label)
            ax.set_xlabel("channels C")
            ax.set_title(f"T = {T} (D-CHAG P = {T}): {title}" if i == 0 else title, fontsize=9)
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted({r["C"] for r in rows}))
            ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.grid(alpha=0.3)
            values = [fn(r) for r in rows if r["T"] == T]
            if values and min(values) > 0 and max(values) / min(values) > 10:
                ax.set_yscale("log")  # e.g. from a few MB (streamed) to GBs (TP alone at thousands of channels)
            else:
                ax.set_ylim(bottom=0)
            if i == 0 and j == 0:
                ax.legend(fontsize=8)
    fig.suptitle("D-CHAG vs TP alone (CPU, gloo; per rank)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_all(out_dir: str, cfg: BenchConfig, rows: list[dict], wall_s: float) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    check = planner_check(cfg.model, rows)
    tgt = targets(rows, cfg)
    paths = {"json": os.path.join(out_dir, "benchmark.json"), "md": os.path.join(out_dir, "benchmark.md"),
             "png": os.path.join(out_dir, "benchmark.png")}
    write_json(paths["json"], cfg, rows, check, tgt, wall_s)
    with open(paths["md"], "w") as f:
        f.write(markdown(cfg, rows, check, tgt, wall_s))
    plot(paths["png"], cfg, rows)
    return {"paths": paths, "targets": tgt, "planner_worst": worst_errors(check)}
