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

**Several pretrainings** (``StudyConfig.pretrainings``, :func:`blend_study`): besides the 211-band
pretraining, others (e.g. ``blend``: the 211-band scenes blended with a 13-band Sentinel-2-like
and a 50-band 900-1,700 nm sensor, ``--data-path W1 P1 ...``, the same steps) start their own
fine-tunes and probes, regimes ``finetune-blend`` and ``probe-blend``; the report adds the paired
differences to the 211-band pretraining's (``finetune-blend`` - ``finetune``): does pretraining on
several sensors help on a sensor none of them is, more than pretraining on one?
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


@dataclass(frozen=True)
class Pretraining:
    """A pretraining beside the study's 211-band one: ``sources`` are (weight, the synthetic spec's own
    options, number of images) of a blended --data-path; its fine-tunes are regimes
    ``finetune-NAME`` and ``probe-NAME``."""
    name: str
    title: str
    sources: tuple[tuple[float, str, int], ...]
    files: tuple[tuple[float, str], ...] = ()  # instead of synthetic sources: (weight, path) of data files


def regimes_of(cfg) -> list[str]:
    """Every regime of a downstream: the study's (``cfg.regimes``), plus fine-tuned and probe per other
    pretraining."""
    return list(cfg.regimes) + [f"{r}-{p.name}" for p in cfg.pretrainings for r in ("finetune", "probe")]


def regime_label(regime: str, cfg) -> str:
    base, _, pre = regime.partition("-")
    if not pre:
        return REGIME_LABELS[regime] + (f" ({cfg.base_title})" if cfg.pretrainings and base != "scratch" else "")
    title = next(p.title for p in cfg.pretrainings if p.name == pre)
    return f"{REGIME_LABELS[base]} ({title})"


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
    path: str | None = None  # a data file instead of the synthetic world (data, num_channels, num_images unused)


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
    training: tuple[str, ...] = ("--deepspeed", "--deepspeed_config", "ds_configs/zero1_fp32.json",
                                 "--micro-batch-size", "8", "--global-batch-size", "8", "--lr", "2e-3",
                                 "--weight-decay", "0.05", "--log-interval", "50")
    downstream: tuple[Downstream, ...] = field(default_factory=lambda: (
        Downstream("s2", "(a) 13 Sentinel-2-like bands, MAE", "bands=s2", 13, ("--task", "mae"), 3, 0.5,
                   "val_loss"),
        Downstream("regress", "(b) abundance regression from 8 labelled tiles", "", 211,
                   ("--task", "regress", "--target-path", "synthetic"), 3, 0.834, "r2"),  # 48 tiles: 8 train
    ))
    pretrainings: tuple[Pretraining, ...] = ()  # beside the 211-band one (blend_study)
    base_path: str | None = None  # the base pretraining's data file instead of the 211-band scenes (cube_study)
    base_title: str = "211 bands"
    pretrain_valid_fraction: float = 0.125
    regimes: tuple[str, ...] = REGIMES  # the blend and cube studies ran without LoRA
    lora: tuple[str, ...] = ("--lora-rank", "4", "--lora-alpha", "8")

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


def _synthetic(cfg: StudyConfig, options: str, images: int, offset: int = 0) -> str:
    """A synthetic spec of the study's world (a band set averages its 211-band scene)."""
    spec = f"synthetic:{options + ',' if options else ''}num_images={images},"
    spec += (f"image_offset={offset}," if offset else "") + cfg.world()
    return spec + (f",scene_channels={cfg.scene_channels}" if "bands=" in options else "")


ALL_HELD_OUT = 1000  # --eval-iters for data files: every held-out sample (an evaluation scores each once)


def _pretrain_data(cfg: StudyConfig, pre: Pretraining | None) -> tuple[list[str], int | None]:
    """(--data-path and --num-channels flags, held-out tiles or None when not known here) of a
    pretraining: the 211-band scenes (or ``base_path``), or a blend (synthetic sources each their own
    images: offsets 0, 1000, 2000, ...; or ``files``)."""
    if pre is None and cfg.base_path:
        return ["--data-path", cfg.base_path], None
    if pre is not None and pre.files:
        return ["--data-path", *[t for w, path in pre.files for t in (f"{w:g}", path)]], None
    if pre is None:
        return (["--data-path", _synthetic(cfg, "", cfg.pretrain_images), "--num-channels", str(cfg.scene_channels)],
                valid_count(cfg.tiles(cfg.pretrain_images), 0.125))
    paths = []
    for k, (weight, options, images) in enumerate(pre.sources):  # the scene itself: its channel count given
        options = options or f"num_channels={cfg.scene_channels}"
        paths += [f"{weight:g}", _synthetic(cfg, options, images, 1000 * k)]
    return ["--data-path", *paths], max(valid_count(cfg.tiles(images), 0.125) for _, _, images in pre.sources)


def plan(cfg: StudyConfig, out_dir: str) -> list[RunSpec]:
    """Every run, pretraining first (each fine-tune needs its seed's pretrained model)."""
    runs = []
    pretrained = {}
    for pre in (None, *cfg.pretrainings):
        stage = "pretrain" if pre is None else f"pretrain-{pre.name}"
        data, n_valid = _pretrain_data(cfg, pre)
        for method in cfg.methods_list():
            for seed in cfg.seed_list():
                name = f"{stage}-{_slug(method)}-seed{seed}"
                save = os.path.join(out_dir, "checkpoints", name)
                argv = ["--task", "mae", *data, *cfg.tile_flags(), *cfg.model, *_method_flags(method, cfg.groups),
                        *cfg.training, "--train-iters", str(cfg.pretrain_iters),
                        "--lr-warmup-iters", str(max(1, cfg.pretrain_iters // 15)),
                        "--valid-fraction", f"{cfg.pretrain_valid_fraction:g}", "--eval-interval",
                        str(cfg.pretrain_iters), "--eval-iters",
                        str(ALL_HELD_OUT if n_valid is None else math.ceil(n_valid / 8)),
                        "--seed", str(seed), "--save", save]
                runs.append(RunSpec(name, stage, method, None, seed, tuple(argv), save))
                pretrained[(pre and pre.name, method.spec, seed)] = save
    for ds in cfg.downstream:
        if ds.path:  # a data file: its channels from its metadata, every held-out sample scored
            data, eval_iters = [ds.path], ALL_HELD_OUT
        else:
            n_valid = valid_count(cfg.tiles(ds.num_images), ds.valid_fraction)
            eval_iters = math.ceil(n_valid / 8)
            data = [_synthetic(cfg, ds.data, ds.num_images, cfg.image_offset), "--num-channels", str(ds.num_channels)]
        for method in cfg.methods_list():
            for regime in regimes_of(cfg):
                base, _, pre = regime.partition("-")
                for seed in cfg.seed_list():
                    argv = [*ds.task_flags, "--data-path", *data, *cfg.tile_flags(), *cfg.model,
                            *_method_flags(method, cfg.groups), *cfg.training,
                            "--train-iters", str(cfg.finetune_iters),
                            "--lr-warmup-iters", str(max(1, cfg.finetune_iters // 10)),
                            "--valid-fraction", str(ds.valid_fraction), "--eval-interval", str(cfg.finetune_iters),
                            "--eval-iters", str(eval_iters), "--seed", str(seed)]
                    if base != "scratch":
                        argv += ["--finetune", "--pretrained-checkpoint", pretrained[(pre or None, method.spec, seed)]]
                    if base == "probe":
                        argv += ["--freeze-encoder"]
                    if base == "lora":
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
    out = {"seeds": cfg.seed_list(), "pretrain": {}, "downstream": {}, "regimes": regimes_of(cfg),
           "regime_labels": {reg: regime_label(reg, cfg) for reg in regimes_of(cfg)}}
    for pre in (None, *cfg.pretrainings):
        stage = "pretrain" if pre is None else f"pretrain-{pre.name}"
        for method in cfg.methods_list():
            losses = [by[(stage, method.spec, None, s)]["val_loss"] for s in cfg.seed_list()
                      if (stage, method.spec, None, s) in by]
            if losses:
                label = method.label(cfg.groups, 1) + ("" if pre is None else f", {pre.title}")
                out["pretrain"][method.spec if pre is None else f"{method.spec} {pre.name}"] = {
                    "label": label, "val_loss": mean_interval(losses), "values": losses}

    def paired(values, a, b):
        common = [s for s in cfg.seed_list() if s in values.get(a, {}) and s in values.get(b, {})]
        return mean_interval([values[a][s] - values[b][s] for s in common]) if common else None

    for ds in cfg.downstream:
        rows = {}
        for method in cfg.methods_list():
            values = {reg: {s: metric_value(by[(ds.name, method.spec, reg, s)], ds.metric) for s in cfg.seed_list()
                            if (ds.name, method.spec, reg, s) in by} for reg in regimes_of(cfg)}
            row = {"label": method.label(cfg.groups, 1), "values": values,
                   "regimes": {reg: mean_interval(list(v.values())) for reg, v in values.items() if v}}
            for reg in regimes_of(cfg):
                if reg != "scratch" and paired(values, reg, "scratch"):
                    row[f"{reg}_minus_scratch"] = paired(values, reg, "scratch")
            for pre in cfg.pretrainings:  # several sensors against one: paired by seed
                for reg in ("finetune", "probe"):
                    diff = paired(values, f"{reg}-{pre.name}", reg)
                    if diff:
                        row[f"{reg}-{pre.name}_minus_{reg}"] = diff
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
    regimes = summary.get("regimes", list(REGIMES))
    labels = summary.get("regime_labels", REGIME_LABELS)
    for ds in summary["downstream"].values():
        what = "held-out MAE loss (lower is better)" if ds["metric"] == "val_loss" else \
            "held-out R² (mean over the abundances; higher is better)"
        diffs = [k for k in next(iter(ds["rows"].values()), {}) if "_minus_" in k]
        diffs = sorted(diffs, key=lambda k: (not k.endswith("_minus_scratch"), regimes.index(k.split("_minus_")[0])))
        names = [f"{labels[a]} - {labels[b]}" for a, b in (k.split("_minus_") for k in diffs)]
        lines += ["", f"## {ds['title']}: {what}", "",
                  "| method | " + " | ".join(labels[reg] for reg in regimes) + " | " + " | ".join(names) + " |",
                  "|---|" + "---|" * (len(regimes) + len(diffs))]
        for row in ds["rows"].values():
            r = row["regimes"]
            lines.append(f"| {row['label']} | " + " | ".join(_fmt(r.get(reg)) for reg in regimes) + " | "
                         + " | ".join(f"{_fmt(row.get(k))} ({verdict(row.get(k), ds['metric'])})" for k in diffs)
                         + " |")
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
        regimes = summary.get("regimes", list(REGIMES))
        labels = summary.get("regime_labels", REGIME_LABELS)
        width = 0.8 / len(regimes)
        for j, reg in enumerate(regimes):
            ivs = [row["regimes"].get(reg) for row in rows]
            xs = [i + (j - (len(regimes) - 1) / 2) * width for i in range(len(rows))]
            ax.bar(xs, [iv["mean"] if iv else 0 for iv in ivs], width,
                   yerr=[iv["half_width"] if iv and iv["n"] > 1 else 0 for iv in ivs], capsize=3,
                   label=labels[reg])
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


def blend_study(**overrides) -> StudyConfig:
    """The blend study (docs/TRANSFER.md, "Several sensors"): D-CHAG-L pretrained (i) on the 211-band
    scenes alone and (ii) on them blended 0.5 / 0.25 / 0.25 with a 13-band Sentinel-2-like sensor and
    a 50-band 900-1,700 nm sensor (16 other scenes each), at the same steps; then fine-tuned, probed and
    trained from scratch on 9 Landsat-8-OLI-like bands, a sensor neither pretraining saw."""
    blend = Pretraining("blend", "blend of 3 sensors",
                        ((0.5, "", 16), (0.25, "bands=s2", 16), (0.25, "bands=50x900-1700nm", 16)))
    l8 = Downstream("l8", "9 Landsat-8-OLI-like bands (an unseen sensor), MAE", "bands=l8", 9, ("--task", "mae"), 3,
                    0.5, "val_loss")
    return StudyConfig(**{"methods": "linear", "downstream": (l8,), "pretrainings": (blend,),
                          "regimes": ("finetune", "scratch", "probe"), **overrides})


# The bundled cube as three other sensors (cube_study): band set -> (file stem, channel names kept).
CUBE_SENSORS = {"s2": ("cube_s2", True), "50x900-1700nm": ("cube_50x900-1700nm", False), "l8": ("cube_l8", True)}


def write_cube_sensors(cube_path: str, out_dir: str) -> dict[str, str]:
    """The cube resampled to other sensors' bands, each band the mean of the cube's bands inside its
    width (the band's centre interpolated when none lies inside; no-data left out): OUT/cube_<set>.npy
    [C, H, W] with its sidecar (names and centres; the even set: centres only). Returns set -> path."""
    import numpy as np
    from dchag.data import open_source
    from dchag.data.readers.synthetic import band_table
    cube = open_source(cube_path)
    x = cube.read(0).astype(np.float64)  # [450, H, W], no-data NaN
    wl = np.asarray(cube.wavelengths, np.float64)
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    for bands, (stem, named) in CUBE_SENSORS.items():
        table = band_table(bands)
        planes = []
        for _, centre, width in table:
            inside = np.flatnonzero(np.abs(wl - centre) <= width / 2)
            if inside.size:
                with np.errstate(invalid="ignore"):
                    planes.append(np.nanmean(x[inside], axis=0))
            else:
                planes.append(np.apply_along_axis(lambda s: np.interp(centre, wl, s), 0, x))
        path = os.path.join(out_dir, f"{stem}.npy")
        np.save(path, np.stack(planes).astype(np.float32))
        side = {"wavelengths": [c for _, c, _ in table]}
        if named:
            side["channel_names"] = [n for n, _, _ in table]
        with open(os.path.join(out_dir, f"{stem}.channels.json"), "w") as f:
            json.dump(side, f)
        paths[bands] = path
    return paths


def cube_study(cube_path: str, sensors: dict[str, str], **overrides) -> StudyConfig:
    """The blend study on the bundled 450-band cube (docs/TRANSFER.md): D-CHAG-L pretrained (i) on the
    cube alone and (ii) on it blended 0.5 / 0.25 / 0.25 with its Sentinel-2-like and 50-band
    900-1,700 nm resamplings (``write_cube_sensors``), then fine-tuned, probed and trained from scratch
    on its 9 Landsat-8-OLI-like bands. Every source holds out the same last 20 % of the tiles, so no
    held-out pixel is seen in pretraining in any band set. The demo's model and flags."""
    blend = Pretraining("blend", "cube + S2-like + 50 bands", (),
                        ((0.5, cube_path), (0.25, sensors["s2"]), (0.25, sensors["50x900-1700nm"])))
    l8 = Downstream("l8", "the cube's 9 Landsat-8-OLI-like bands (an unseen sensor), MAE", "", 9, ("--task", "mae"), 0,
                    0.2, "val_loss", path=sensors["l8"])
    return StudyConfig(**{"methods": "linear", "downstream": (l8,), "pretrainings": (blend,), "base_path": cube_path,
                          "base_title": "the 450-band cube", "regimes": ("finetune", "scratch", "probe"),
                          "pretrain_valid_fraction": 0.2, "tile": 4,
                          "model": ("--patch-dim", "1", "--num-layers", "2", "--hidden-size", "64",
                                    "--num-attention-heads", "4"),
                          "training": ("--deepspeed", "--deepspeed_config", "ds_configs/zero1_fp32.json",
                                       "--mask-ratio", "0.5", "--micro-batch-size", "3", "--global-batch-size", "9",
                                       "--lr", "1e-3", "--weight-decay", "0.05", "--log-interval", "100"),
                          "pretrain_iters": 400, "finetune_iters": 200, **overrides})
