"""The transfer study (docs/TRANSFER.md): does MAE pretraining on a many-band scene help downstream?

One synthetic world (``seed=0``: the same endmember spectra everywhere), three data sets of it:

- pretrain: MAE on ``scene_channels`` bands over 400-2,500 nm (images 0 .. N-1);
- ``s2``: MAE on the same kind of scenes resampled to 13 Sentinel-2-like bands (box averages;
  images from ``image_offset`` on, so none was seen in pretraining): the channel set changes;
- ``regress``: abundance regression (``--task regress --target-path synthetic``) on the full band
  set, from a few labelled tiles: the task changes.

Each downstream data set is trained in four regimes at equal steps and the same flags: ``finetune``
(``--finetune --pretrained-checkpoint``), ``scratch`` (no pretrained weights), ``probe``
(``--finetune --freeze-encoder``) and ``lora`` (``--finetune`` with ``--lora-rank 4 --lora-alpha 8``:
adapters on the backbone's qkv, proj, fc1, fc2; the loaded tensors frozen), for each architecture
(flat and D-CHAG-L) and seed. The seed sets
the initial weights, data order and masks; the pretrained model of seed s starts the fine-tunes of
seed s, so every comparison is paired by seed. Each run is ``dchag.training.run`` in-process and
leaves ``results/NAME.json`` (a run whose JSON exists is skipped: the study resumes) and
``logs/NAME.log``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

from dchag.data.tiles import valid_count
from dchag.parity.methods import Method, parse_methods
from dchag.parity.stats import mean_interval

REGIMES = ("finetune", "scratch", "probe", "lora")
REGIME_LABELS = {"finetune": "fine-tuned", "scratch": "from scratch", "probe": "frozen probe", "lora": "LoRA r4"}
COMPARED = ("finetune", "probe", "lora")  # each against scratch, paired by seed


@dataclass(frozen=True)
class Downstream:
    name: str
    title: str
    data: str  # the synthetic spec's own options (the world's are added)
    num_channels: int
    task_flags: tuple[str, ...]
    num_images: int  # of scene_size x scene_size px
    valid_fraction: float  # of the tiles (the last ones held out)
    metric: str  # "val_loss" (lower is better) or "r2" (mean R^2 over the targets, higher is better)


@dataclass
class StudyConfig:
    seeds: int = 5
    first_seed: int = 1
    methods: str = "flat,linear"
    scene_channels: int = 211  # 400-2,500 nm every 10 nm
    wavelength_min: float = 400.0
    wavelength_max: float = 2500.0
    world_seed: int = 0
    scene_size: int = 64  # px: each image is 4 x 4 tiles, so the abundance fields are smooth at the tile's scale
    tile: int = 16
    pretrain_images: int = 16
    pretrain_iters: int = 300
    finetune_iters: int = 100
    image_offset: int = 100_000
    model: tuple[str, ...] = ("--patch-dim", "4", "--num-layers", "2", "--hidden-size", "32",
                              "--num-attention-heads", "2")
    groups: int = 8
    lora: tuple[str, ...] = ("--lora-rank", "4", "--lora-alpha", "8")
    training: tuple[str, ...] = ("--deepspeed", "--deepspeed_config", "ds_configs/zero1_fp32.json",
                                 "--micro-batch-size", "8", "--global-batch-size", "8", "--lr", "2e-3",
                                 "--weight-decay", "0.05", "--log-interval", "50")
    downstream: tuple[Downstream, ...] = field(default_factory=lambda: (
        Downstream("s2", "(a) 13 Sentinel-2-like bands, MAE", "bands=s2", 13, ("--task", "mae"), 3, 0.5,
                   "val_loss"),
        Downstream("regress", "(b) abundance regression from 8 labelled tiles", "", 211,
                   ("--task", "regress", "--target-path", "synthetic"), 3, 0.834, "r2"),  # 48 tiles: 8 train
    ))

    def world(self) -> str:
        return (f"height={self.scene_size},width={self.scene_size},wavelength_min={self.wavelength_min:g},"
                f"wavelength_max={self.wavelength_max:g},seed={self.world_seed}")

    def tiles(self, images: int) -> int:
        return images * (self.scene_size // self.tile) ** 2

    def tile_flags(self) -> list[str]:
        return ["--img-h", str(self.tile), "--img-w", str(self.tile)]

    def seed_list(self) -> list[int]:
        return [self.first_seed + i for i in range(self.seeds)]

    def methods_list(self) -> list[Method]:
        return parse_methods(self.methods)


@dataclass(frozen=True)
class RunSpec:
    name: str  # results/NAME.json, logs/NAME.log
    stage: str  # "pretrain" or a downstream name
    method: Method
    regime: str | None  # None for pretraining
    seed: int
    argv: tuple[str, ...]
    save: str | None = None  # pretraining: the checkpoint folder the fine-tunes start from


def _method_flags(method: Method, groups: int) -> list[str]:
    """The method's aggregation flags, on the command line (a fine-tune checks given flags against the
    pretrained model's)."""
    o = method.overrides(SimpleNamespace(dchag_groups=groups, dchag_tree_levels=1))
    return ["--dchag-aggregation", o["dchag_aggregation"], "--dchag-groups", str(o["dchag_groups"]),
            "--dchag-tree-levels", str(o["dchag_tree_levels"])]


def _slug(method: Method) -> str:
    return method.spec.replace(":", "_")


def plan(cfg: StudyConfig, out_dir: str) -> list[RunSpec]:
    """Every run, pretraining first (each fine-tune needs its seed's pretrained model)."""
    runs = []
    pretrained = {}
    for method in cfg.methods_list():
        for seed in cfg.seed_list():
            name = f"pretrain-{_slug(method)}-seed{seed}"
            save = os.path.join(out_dir, "checkpoints", name)
            n_valid = valid_count(cfg.tiles(cfg.pretrain_images), 0.125)
            argv = ["--task", "mae", "--data-path",
                    f"synthetic:num_images={cfg.pretrain_images},{cfg.world()}",
                    "--num-channels", str(cfg.scene_channels), *cfg.tile_flags(), *cfg.model, *_method_flags(method, cfg.groups),
                    *cfg.training, "--train-iters", str(cfg.pretrain_iters),
                    "--lr-warmup-iters", str(max(1, cfg.pretrain_iters // 15)), "--valid-fraction", "0.125",
                    "--eval-interval", str(cfg.pretrain_iters), "--eval-iters", str(math.ceil(n_valid / 8)),
                    "--seed", str(seed), "--save", save]
            runs.append(RunSpec(name, "pretrain", method, None, seed, tuple(argv), save))
            pretrained[(method.spec, seed)] = save
    for ds in cfg.downstream:
        n_valid = valid_count(cfg.tiles(ds.num_images), ds.valid_fraction)
        data = f"synthetic:{ds.data + ',' if ds.data else ''}num_images={ds.num_images},image_offset={cfg.image_offset}," \
               f"{cfg.world()}"
        if "bands=" in ds.data:
            data += f",scene_channels={cfg.scene_channels}"
        for method in cfg.methods_list():
            for regime in REGIMES:
                for seed in cfg.seed_list():
                    argv = [*ds.task_flags, "--data-path", data, "--num-channels", str(ds.num_channels),
                            *cfg.tile_flags(), *cfg.model,
                            *_method_flags(method, cfg.groups), *cfg.training,
                            "--train-iters", str(cfg.finetune_iters),
                            "--lr-warmup-iters", str(max(1, cfg.finetune_iters // 10)),
                            "--valid-fraction", str(ds.valid_fraction), "--eval-interval", str(cfg.finetune_iters),
                            "--eval-iters", str(math.ceil(n_valid / 8)), "--seed", str(seed)]
                    if regime != "scratch":
                        argv += ["--finetune", "--pretrained-checkpoint", pretrained[(method.spec, seed)]]
                    if regime == "probe":
                        argv += ["--freeze-encoder"]
                    if regime == "lora":
                        argv += list(cfg.lora)
                    runs.append(RunSpec(f"{ds.name}-{_slug(method)}-{regime}-seed{seed}", ds.name, method, regime,
                                        seed, tuple(argv)))
    return runs


def result_path(out_dir: str, spec: RunSpec) -> str:
    return os.path.join(out_dir, "results", f"{spec.name}.json")


def run_one(spec: RunSpec, out_dir: str, *, model_provider, forward_step, datasets_provider, eval_metrics_func=None,
            loss_weight_func=None) -> dict:
    """Train one run in this process (or read its result when it finished before); returns its result."""
    from dchag.arguments import parse_args
    from dchag.training import release, run
    path = result_path(out_dir, spec)
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    if spec.save and os.path.exists(spec.save):
        shutil.rmtree(spec.save)  # an interrupted pretraining of this study: train it again from the start
    os.makedirs(os.path.join(out_dir, "logs"), exist_ok=True)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    args = parse_args(list(spec.argv))
    args.log_file = os.path.join(out_dir, "logs", f"{spec.name}.log")
    open(args.log_file, "w").close()
    t0 = time.time()
    history = run(args, model_provider, forward_step, datasets_provider, eval_metrics_func=eval_metrics_func,
                  loss_weight_func=loss_weight_func)
    seconds = time.time() - t0
    last = max(history["val_losses"])
    result = {"name": spec.name, "stage": spec.stage, "method": spec.method.spec, "regime": spec.regime,
              "seed": spec.seed, "argv": list(spec.argv), "iteration": last, "val_loss": history["val_losses"][last],
              "metrics": history["val_metrics"].get(last, {}), "seconds": seconds}
    release(history)
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(path + ".tmp", path)  # the JSON exists only for a finished run
    return result


def metric_value(result: dict, metric: str) -> float:
    """The held-out figure of one run: its validation loss, or its mean R^2 over the targets."""
    if metric == "val_loss":
        return float(result["val_loss"])
    r2 = [v for k, v in result["metrics"].items() if k.startswith("r2/")]
    if not r2:
        raise ValueError(f"run {result['name']} reports no R^2 (metrics: {sorted(result['metrics'])})")
    return sum(r2) / len(r2)


def summarize(results: list[dict], cfg: StudyConfig) -> dict:
    """Per downstream x method x regime: the 95 % interval of the held-out metric over seeds, and the
    paired (by seed) differences fine-tuned - scratch and probe - scratch with their intervals."""
    by = {(r["stage"], r["method"], r["regime"], r["seed"]): r for r in results}
    out = {"seeds": cfg.seed_list(), "pretrain": {}, "downstream": {}}
    for method in cfg.methods_list():
        losses = [by[("pretrain", method.spec, None, s)]["val_loss"] for s in cfg.seed_list()
                  if ("pretrain", method.spec, None, s) in by]
        if losses:
            out["pretrain"][method.spec] = {"label": method.label(cfg.groups, 1), "val_loss": mean_interval(losses),
                                            "values": losses}
    for ds in cfg.downstream:
        rows = {}
        for method in cfg.methods_list():
            values = {reg: {s: metric_value(by[(ds.name, method.spec, reg, s)], ds.metric) for s in cfg.seed_list()
                            if (ds.name, method.spec, reg, s) in by} for reg in REGIMES}
            row = {"label": method.label(cfg.groups, 1), "values": values,
                   "regimes": {reg: mean_interval(list(v.values())) for reg, v in values.items() if v}}
            for reg in COMPARED:
                common = [s for s in cfg.seed_list() if s in values[reg] and s in values["scratch"]]
                if common:
                    row[f"{reg}_minus_scratch"] = mean_interval([values[reg][s] - values["scratch"][s]
                                                                 for s in common])
            rows[method.spec] = row
        out["downstream"][ds.name] = {"title": ds.title, "metric": ds.metric, "rows": rows}
    return out


def _fmt(iv: dict, digits: int = 4) -> str:
    if iv is None:
        return "-"
    if iv["n"] < 2:
        return f"{iv['mean']:.{digits}f} (n = 1)"
    return f"{iv['mean']:.{digits}f} ± {iv['half_width']:.{digits}f}"


def verdict(diff: dict | None, metric: str) -> str:
    """Plain words for a paired difference (regime - scratch) and its 95 % interval."""
    if diff is None or diff["n"] < 2:
        return "not measured"
    better = (diff["high"] < 0) if metric == "val_loss" else (diff["low"] > 0)
    worse = (diff["low"] > 0) if metric == "val_loss" else (diff["high"] < 0)
    return "helps" if better else "hurts" if worse else "no measurable difference"


def report_markdown(summary: dict, commands: dict[str, str]) -> str:
    lines = ["# Transfer study", "", f"Seeds {summary['seeds']}; mean ± half width of the 95 % Student-t interval "
             "over seeds; differences are paired by seed.", ""]
    lines += ["## Pretraining (MAE, held-out loss)", "", "| method | val loss |", "|---|---|"]
    for row in summary["pretrain"].values():
        lines.append(f"| {row['label']} | {_fmt(row['val_loss'])} |")
    for ds in summary["downstream"].values():
        what = "held-out MAE loss (lower is better)" if ds["metric"] == "val_loss" else \
            "held-out R² (mean over the abundances; higher is better)"
        short = {"finetune": "fine-tuned", "probe": "probe", "lora": "LoRA"}
        lines += ["", f"## {ds['title']}: {what}", "",
                  "| method | " + " | ".join(REGIME_LABELS[reg] for reg in REGIMES) + " | "
                  + " | ".join(f"{short[reg]} - scratch" for reg in COMPARED) + " |",
                  "|---|" + "---|" * (len(REGIMES) + len(COMPARED))]
        for row in ds["rows"].values():
            r = row["regimes"]
            diffs = [row.get(f"{reg}_minus_scratch") for reg in COMPARED]
            lines.append(f"| {row['label']} | " + " | ".join(_fmt(r.get(reg)) for reg in REGIMES) + " | "
                         + " | ".join(f"{_fmt(d)} ({verdict(d, ds['metric'])})" for d in diffs) + " |")
    lines += ["", "## Commands (seed 1; the study runs each in-process)", ""]
    for what, cmd in commands.items():
        lines += [f"{what}:", "", f"    {cmd}", ""]
    return "\n".join(lines) + "\n"


def example_commands(runs: list[RunSpec], seed: int) -> dict[str, str]:
    """One pretrain_dchag.py command per kind of run (the first seed's)."""
    out = {}
    for spec in runs:
        if spec.seed != seed:
            continue
        key = spec.name.rsplit("-seed", 1)[0]
        out[key] = "python pretrain_dchag.py " + " ".join(spec.argv)
    return out


def save_picture(summary: dict, path: str) -> str:
    """Bars: each downstream's metric per method and regime, with the 95 % intervals."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = list(summary["downstream"].values())
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6))
    axes = [axes] if len(panels) == 1 else list(axes)
    for ax, ds in zip(axes, panels):
        rows = list(ds["rows"].values())
        width = 0.8 / len(REGIMES)
        for j, reg in enumerate(REGIMES):
            ivs = [row["regimes"].get(reg) for row in rows]
            xs = [i + (j - (len(REGIMES) - 1) / 2) * width for i in range(len(rows))]
            ax.bar(xs, [iv["mean"] if iv else 0 for iv in ivs], width,
                   yerr=[iv["half_width"] if iv and iv["n"] > 1 else 0 for iv in ivs], capsize=3,
                   label=REGIME_LABELS[reg])
        ax.set_xticks(range(len(rows)), [row["label"] for row in rows])
        ax.set_title(ds["title"], fontsize=9)
        ax.set_ylabel("held-out MAE loss" if ds["metric"] == "val_loss" else "held-out R²")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(results: list[dict], cfg: StudyConfig, runs: list[RunSpec], out_dir: str) -> list[str]:
    summary = summarize(results, cfg)
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, "transfer.json"), os.path.join(out_dir, "transfer.md")]
    with open(paths[0], "w") as f:
        json.dump({"summary": summary, "runs": results}, f, indent=1)
    with open(paths[1], "w") as f:
        f.write(report_markdown(summary, example_commands(runs, cfg.first_seed)))
    paths.append(save_picture(summary, os.path.join(out_dir, "transfer.png")))
    return paths
