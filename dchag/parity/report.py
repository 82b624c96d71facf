"""The parity study's outputs: parity.json, parity.md, parity.png and the pictures."""

from __future__ import annotations

import json
import os

import numpy as np

from dchag.parity import arrays
from dchag.parity.stats import mean_interval, relative_gaps
from dchag.tasks import get_task


def late_change(curve: dict, fraction: float = 0.2) -> float:
    """Relative change of the validation loss over the last ``fraction`` of the iterations: from
    the last evaluation at or before (1 - fraction) x the final iteration to the final one. Near 0:
    the run has stopped moving (it has converged under its schedule)."""
    its, vals = curve["iterations"], curve["val_loss"]
    start = max((k for k, it in enumerate(its) if it <= (1 - fraction) * its[-1]), default=0)
    return (vals[-1] - vals[start]) / vals[start]


def summarize(results: dict) -> dict:
    """Add to every non-baseline method its paired relative gap to flat (per seed and the 95 % interval)
    and, per seed, how much its validation loss still moved over the last 20 % of iterations."""
    methods = results["methods"]
    flat = next((m for m in methods.values() if m["spec"] == "flat"), None)  # None: a shard to --merge
    for m in methods.values():
        m["val_loss_mean"] = mean_interval(m["val_loss"])
        m["late_change"] = [late_change(m["curves"][str(s)]) for s in results["seeds"]]
        m.pop("gap_to_flat", None)
        if flat is not None and m is not flat:
            gaps = relative_gaps(m["val_loss"], flat["val_loss"])
            m["gap_to_flat"] = {"per_seed": gaps, **mean_interval(gaps)}
        if any(m["metrics"]):
            names = sorted(m["metrics"][0])
            m["metrics_mean"] = {n: float(np.mean([s[n] for s in m["metrics"]])) for n in names}
    return results


def baseline_verdicts(results: dict) -> list[str]:
    """Plain sentences: which methods do not beat which baseline (validation loss, mean over seeds
    and per seed), or that every method beats every baseline. A model that does not beat a simple
    predictor is the first thing a reader must know."""
    baselines = results.get("baselines") or {}
    if not baselines:
        return []
    lines, beaten_everywhere = [], True
    for m in results["methods"].values():
        vals = m["val_loss"]
        for name, b in baselines.items():
            below = sum(v < b["val_loss"] for v in vals)
            if below < len(vals):
                beaten_everywhere = False
                mean = sum(vals) / len(vals)
                verdict = "does not beat" if mean >= b["val_loss"] else "beats on average, but not in every seed,"
                lines.append(f"{m['label']} {verdict} the baseline '{name}': val loss {mean:.4g} against "
                             f"{b['val_loss']:.4g} (below it in {below} of {len(vals)} seeds).")
    if beaten_everywhere:
        names = ", ".join(f"'{n}' ({b['val_loss']:.4g})" for n, b in baselines.items())
        lines.append(f"Every method beats every baseline in every seed: {names}.")
    return lines


def _pct(x: float) -> str:
    return "n/a" if x != x else f"{100 * x:+.2f} %"


def markdown(results: dict) -> str:
    setup = results["setup"]
    lines = [f"# Parity study: {setup['task']}", "",
             f"- data: `{setup['data_path']}` ({setup['num_channels']} channels); {setup['split']}",
             f"- {setup['held_out_samples']} held-out samples, {setup['scored_per_evaluation']} scored per evaluation; "
             f"{setup['train_iters']} iterations; seeds {', '.join(map(str, results['seeds']))} (paired: a seed fixes "
             "initial weights, data order and masks for every method)",
             f"- layout: T = {setup['tensor_model_parallel_size']}, P = {setup['channel_parallel_size']} for D-CHAG, "
             "P = 1 for flat"]
    if "merged_from" in setup:  # tools/parity.py --merge: one command per part
        lines += [f"- merged from `{part['directory']}`: `{' '.join(part['argv'])}`" for part in setup["merged_from"]]
    else:
        lines.append(f"- command: `{' '.join(setup['argv'])}`")
    verdicts = baseline_verdicts(results)
    if verdicts:
        lines += ["", "**Against the baselines:** " + " ".join(verdicts)]
    lines += ["",
             "| method | val loss (mean +- 95 % CI) | gap to flat (paired, 95 % CI) | train loss (last 10 %) | "
             "val loss change over the last 20 % (largest over seeds) | s per run |",
             "|---|---:|---:|---:|---:|---:|"]
    for m in results["methods"].values():
        v = m["val_loss_mean"]
        ci = "" if v["half_width"] != v["half_width"] else f" +- {v['half_width']:.2E}"
        gap = m.get("gap_to_flat")
        gap_s = ("(reference)" if m["spec"] == "flat" else "(no flat in this study)") if gap is None else (
            f"{_pct(gap['mean'])} [{_pct(gap['low'])}, {_pct(gap['high'])}]" if gap["n"] > 1 else _pct(gap["mean"]))
        lines.append(f"| {m['label']} | {v['mean']:.4E}{ci} | {gap_s} | {np.mean(m['train_loss']):.4E} | "
                     f"{_pct(max(m['late_change'], key=abs))} | {np.mean(m['seconds']):.0f} |")
    for name, b in results["baselines"].items():
        lines.append(f"| *baseline: {name}* | {b['val_loss']:.4E} | | | | |")
    metric_rows = [(m["label"], m["metrics_mean"]) for m in results["methods"].values() if m.get("metrics_mean")]
    metric_rows += [(f"*{n}*", b["metrics"]) for n, b in results["baselines"].items() if b["metrics"]]
    if metric_rows:
        names = sorted(metric_rows[0][1])
        per_name = [n for n in names if "/" in n]  # "rmse/<variable>", "r2/<target>"; else one figure ("miou")
        things = sorted({n.split("/", 1)[1] for n in per_name})
        if len(things) > 8:  # too wide for a table: the mean over variables (every value is in parity.json)
            kinds = sorted({n.split("/", 1)[0] for n in per_name})
            metric_rows = [(label, {**{n: vals[n] for n in names if "/" not in n and n in vals},
                                    **{f"{k} (mean of {len(things)} variables)": float(np.nanmean(
                                        [vals.get(f"{k}/{v}", float("nan")) for v in things])) for k in kinds}})
                           for label, vals in metric_rows]
            names = sorted(metric_rows[0][1])
        lines += ["", get_task(setup["task"]).metrics_caption, "", "| method | " + " | ".join(names) + " |",
                  "|---|" + "---:|" * len(names)]
        lines += [f"| {label} | " + " | ".join(f"{vals.get(n, float('nan')):.4g}" for n in names) + " |"
                  for label, vals in metric_rows]
    lines += ["", "Per seed (val loss):", ""]
    for m in results["methods"].values():
        lines.append(f"- {m['label']}: " + ", ".join(f"{v:.4E}" for v in m["val_loss"]))
    return "\n".join(lines) + "\n"


def curves_png(results: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for m in results["methods"].values():
        curves = list(m["curves"].values())
        its = curves[0]["iterations"]
        vals = np.array([c["val_loss"] for c in curves])  # [seeds, evals]
        line, = ax.plot(its, vals.mean(0), label=f"{m['label']} ({len(curves)} seeds)")
        if len(curves) > 1:
            ax.fill_between(its, vals.min(0), vals.max(0), color=line.get_color(), alpha=0.2, linewidth=0)
    for name, b in results["baselines"].items():
        ax.axhline(b["val_loss"], linestyle="--", linewidth=1, color="grey")
        ax.annotate(f"baseline: {name}", (ax.get_xlim()[0], b["val_loss"]), fontsize=7, color="grey",
                    xytext=(2, 2), textcoords="offset points")
    ax.set_xlabel("iteration")
    ax.set_ylabel("validation loss")
    ax.set_yscale("log")
    ax.set_title(f"{results['setup']['task']}: validation loss, mean and min-max over seeds", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(results: dict, output_dir: str) -> list[str]:
    results = summarize(results)
    os.makedirs(output_dir, exist_ok=True)
    paths = [os.path.join(output_dir, n) for n in ("parity.json", "parity.md", "parity.png")]
    public = {k: v for k, v in results.items() if k != "pictures"}
    with open(paths[0], "w") as f:
        json.dump(public, f, indent=1)
    with open(paths[1], "w") as f:
        f.write(markdown(results))
    curves_png(results, paths[2])
    if results["pictures"]:
        # The pictures' arrays, so that studies run apart (tools/parity.py --merge) can be reported together.
        paths.append(arrays.save(os.path.join(output_dir, arrays.FILE), results["pictures"]))
        picture = get_task(results["setup"]["task"]).report_picture(results, output_dir)
        if picture:
            paths.append(picture)
    return paths
