"""tools/parity.py: the statistics, the method specs, the baselines, and one small study end to end."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from dchag.parallel.partition import LayoutError
from dchag.parity.methods import parse_methods
from dchag.parity.stats import mean_interval, relative_gaps, t975

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("df", [1, 2, 4, 9, 29, 60])
def test_t_quantile_is_the_97_5_percent_point(df):
    """Integrate Student's t density numerically up to t975(df): the mass must be 0.975."""
    x = np.linspace(0.0, t975(df), 200_001)
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    pdf = np.exp(log_c) * (1 + x ** 2 / df) ** (-(df + 1) / 2)
    mass = 0.5 + np.trapezoid(pdf, x)
    assert abs(mass - 0.975) < 2e-4, (df, mass)


def test_mean_interval_and_paired_gaps():
    vals = [1.0, 1.2, 0.9, 1.1]
    r = mean_interval(vals)
    sd = np.std(vals, ddof=1)
    assert r["mean"] == pytest.approx(np.mean(vals))
    assert r["half_width"] == pytest.approx(3.182 * sd / 2)
    assert math.isnan(mean_interval([2.0])["half_width"])
    assert relative_gaps([1.1, 2.2], [1.0, 2.0]) == pytest.approx([0.1, 0.1])
    with pytest.raises(ValueError):
        relative_gaps([1.0], [1.0, 2.0])


def test_method_specs():
    m = parse_methods("flat,linear,cross:k=2,linear:g=32")
    assert [x.aggregation for x in m] == ["flat", "linear", "cross", "linear"]
    assert (m[2].groups, m[2].tree_levels, m[3].groups) == (None, 2, 32)
    args = type("A", (), {"dchag_groups": 8, "dchag_tree_levels": 1})()
    assert m[0].overrides(args)["channel_parallel_size"] == 1
    assert m[2].overrides(args) == {"dchag_aggregation": "cross", "dchag_groups": 8, "dchag_tree_levels": 2}
    assert m[3].label(8, 1) == "D-CHAG-L G=32"
    assert [x.spec for x in parse_methods("cross,linear:g=2")] == ["cross", "linear:g=2"]  # a part to --merge
    slow = parse_methods("flat,cross:lrm=0.1:k=2")[1]
    assert slow.overrides(args) == {"dchag_aggregation": "cross", "dchag_groups": 8, "dchag_tree_levels": 2,
                                    "dchag_partial_lr_mult": 0.1}
    assert slow.label(8, 1) == "D-CHAG-C G=8 k=2 partial lr x0.1"
    light = parse_methods("flat,cross:proj=none")[1]
    assert light.overrides(args)["dchag_cross_projections"] == "none"
    assert light.label(8, 1) == "D-CHAG-C G=8 projections none"
    both = parse_methods("flat,linear:clr=size:gn=layernorm")[1]
    assert both.overrides(args) == {"dchag_aggregation": "linear", "dchag_groups": 8, "dchag_tree_levels": 1,
                                    "dchag_coefficient_lr_scale": "size", "dchag_group_norm": "layernorm"}
    assert both.label(8, 1) == "D-CHAG-L G=8 coefficient lr size group norm layernorm"
    for bad in ("linear,flat", "flat,mean", "flat,cross:q=2", "flat:g=2", "flat,linear,linear", "flat,flat", "",
                "flat,cross:lrm=-1", "flat,cross:lrm=x", "flat:lrm=0.1", "flat,linear:proj=none",
                "flat,cross:proj=identity", "flat,cross:clr=size", "flat,linear:clr=x", "flat:gn=layernorm"):
        with pytest.raises(LayoutError):
            parse_methods(bad)


def test_baselines_against_direct_formulas():
    """Channel-mean and visible-mean MAE baselines, computed again with numpy from their definitions,
    pooled over the hidden pixels of each of the 6 held-out tiles once (micro-batches of 4: the
    second is half padding)."""
    from types import SimpleNamespace

    from dchag.data import build_datasets, build_eval_loader
    from dchag.model.config import DChagConfig
    from dchag.tasks import get_task, patch_mask
    _, valid = build_datasets("synthetic:num_images=12,seed=3", task="mae", img_h=8, img_w=8, num_channels=6,
                              valid_fraction=0.5)
    cfg = DChagConfig(num_channels=6, img_h=8, img_w=8, patch_dim=2, groups=2)
    got = get_task("mae").baselines(build_eval_loader(valid, 4), cfg, SimpleNamespace(mask_ratio=0.5, seed=9))
    errors = {"channel mean": [], "visible-pixel mean": []}
    for i in range(len(valid)):
        item = valid[i]
        x = item["images"].numpy().astype(np.float64)  # no invalid values in synthetic data
        m = patch_mask(item["index"][None], cfg.num_patches, 0.5, 9, 0).numpy().reshape(4, 4)
        hidden = np.broadcast_to(m.repeat(2, 0).repeat(2, 1), x.shape)  # [C, H, W]
        errors["channel mean"].append(x[hidden] ** 2)
        pred = np.nanmean(np.where(hidden, np.nan, x), axis=(1, 2), keepdims=True) + 0 * x
        errors["visible-pixel mean"].append((pred - x)[hidden] ** 2)
    for name, vals in errors.items():
        assert got[name]["val_loss"] == pytest.approx(np.concatenate(vals).mean(), rel=1e-5), name


def test_small_study_end_to_end(tmp_path):
    """2 ranks, flat and D-CHAG-L, 2 seeds: the report's numbers are the runs' logged validation losses,
    and the gaps are the paired relative differences."""
    out = tmp_path / "parity"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), "tools/parity.py", "--methods", "flat,linear", "--seeds", "2", "--output-dir", str(out),
           "--deepspeed", "--deepspeed_config", "ds_configs/zero1_fp32.json", "--task", "mae",
           "--data-path", "synthetic:num_images=24", "--num-channels", "8", "--img-h", "8", "--img-w", "8",
           "--patch-dim", "2", "--num-layers", "1", "--hidden-size", "32", "--num-attention-heads", "4",
           "--dchag-groups", "2", "--tensor-model-parallel-size", "2", "--channel-parallel-size", "2",
           "--micro-batch-size", "2", "--global-batch-size", "2", "--train-iters", "6", "--lr", "1e-3",
           "--eval-interval", "3", "--log-interval", "3"]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("parity.json", "parity.md", "parity.png", "reconstructions.png"):
        assert (out / name).stat().st_size > 0, name
    r = json.loads((out / "parity.json").read_text())
    assert r["seeds"] == [1234, 1235]
    assert r["setup"]["held_out_samples"] == 2 and "spatial" in r["setup"]["split"]
    for spec, m in r["methods"].items():
        for seed, val in zip(r["seeds"], m["val_loss"]):
            log = (out / "logs" / f"{spec}-seed{seed}.log").read_text()
            logged = float(re.findall(r"validation loss at iteration 6 \| val loss: (\S+) \|", log)[-1])
            assert val == pytest.approx(logged, rel=1e-6)
    flat, lin = r["methods"]["flat"]["val_loss"], r["methods"]["linear"]["val_loss"]
    gaps = [(a - b) / b for a, b in zip(lin, flat)]
    assert r["methods"]["linear"]["gap_to_flat"]["per_seed"] == pytest.approx(gaps)
    assert r["methods"]["linear"]["gap_to_flat"]["mean"] == pytest.approx(np.mean(gaps))
    assert set(r["baselines"]) == {"channel mean", "visible-pixel mean"}
    md = (out / "parity.md").read_text()
    assert "D-CHAG-L G=2" in md and "baseline: channel mean" in md
    assert torch.isfinite(torch.tensor(flat + lin)).all()


def test_study_refuses_checkpoints_and_bad_methods(tmp_path):
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    base = [sys.executable, "tools/parity.py", "--output-dir", str(tmp_path), "--task", "mae",
            "--img-h", "8", "--img-w", "8", "--patch-dim", "2", "--train-iters", "4"]
    proc = subprocess.run(base + ["--methods", "linear,flat"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1 and "not first" in proc.stderr


def _fake_study(methods: dict[str, list[float]], seeds: list[int], data_path="synthetic:num_images=40,seed=1") -> dict:
    """What run_study returns, with the given final val losses (forecast task: its picture is a map)."""
    from dchag.parity.methods import NAMES
    rng = np.random.default_rng(len(methods))
    return {"seeds": seeds, "baselines": {"persistence": {"val_loss": 1.5, "metrics": {}}},
            "setup": {"argv": ["--methods", ",".join(methods)], "task": "forecast", "data_path": data_path,
                      "split": "held-out split", "held_out_samples": 8, "scored_per_evaluation": 8,
                      "train_iters": 20, "num_channels": 4, "tensor_model_parallel_size": 1,
                      "channel_parallel_size": 1},
            "methods": {spec: {"label": NAMES[spec.split(":")[0]], "spec": spec, "val_loss": vals, "train_loss": vals,
                               "metrics": [{}] * len(vals), "seconds": [1.0] * len(vals),
                               "curves": {str(s): {"iterations": [10, 20], "val_loss": [2 * v, v]}
                                          for s, v in zip(seeds, vals)}}
                        for spec, vals in methods.items()},
            "pictures": {spec: {"variable": "t2m", "target": rng.normal(size=(4, 8)),
                                "prediction": rng.normal(size=(4, 8)), "index": 3} for spec in methods}}


def test_merge_pairs_studies_split_by_method_and_by_seed(tmp_path):
    """Parts written by write_report merge into the report one study would give: the same paired gaps."""
    from dchag.parity.merge import merge_studies
    from dchag.parity.report import write_report
    write_report(_fake_study({"flat": [1.0, 2.0], "linear": [1.1, 1.8]}, [1, 2]), str(tmp_path / "a"))
    write_report(_fake_study({"cross": [1.3, 2.2]}, [1, 2]), str(tmp_path / "b"))
    write_report(_fake_study({"flat": [4.0], "linear": [3.0], "cross": [5.0]}, [3]), str(tmp_path / "c"))
    assert "(no flat in this study)" in (tmp_path / "b" / "parity.md").read_text()
    merged = merge_studies([str(tmp_path / d) for d in "abc"])
    assert list(merged["methods"]) == ["flat", "linear", "cross"] and merged["seeds"] == [1, 2, 3]
    assert set(merged["pictures"]) == {"flat", "linear", "cross"}
    paths = write_report(merged, str(tmp_path / "all"))
    assert {os.path.basename(p) for p in paths} >= {"parity.json", "parity.md", "forecast_maps.png"}
    r = json.loads((tmp_path / "all" / "parity.json").read_text())
    assert r["methods"]["cross"]["val_loss"] == [1.3, 2.2, 5.0]
    assert r["methods"]["cross"]["gap_to_flat"]["per_seed"] == pytest.approx([0.3, 0.1, 0.25])
    assert r["methods"]["linear"]["gap_to_flat"]["mean"] == pytest.approx(np.mean([0.1, -0.1, -0.25]))
    assert r["methods"]["linear"]["curves"]["3"]["val_loss"] == [6.0, 3.0]
    md = (tmp_path / "all" / "parity.md").read_text()
    assert md.count("- merged from") == 3


def test_merge_keeps_only_the_methods_asked_for(tmp_path):
    """--merge with --methods drops a variant that ran on fewer seeds instead of refusing the merge."""
    from dchag.parity.merge import merge_studies
    from dchag.parity.report import write_report
    write_report(_fake_study({"flat": [1.0, 2.0], "cross": [1.1, 1.8], "cross:lrm=0.1": [0.9, 2.1]}, [1, 2]),
                 str(tmp_path / "a"))
    write_report(_fake_study({"flat": [4.0], "cross": [5.0]}, [3]), str(tmp_path / "b"))
    parts = [str(tmp_path / "a"), str(tmp_path / "b")]
    with pytest.raises(LayoutError, match=re.escape("cross:lrm=0.1 has no run for seed(s) [3]")):
        merge_studies(parts)
    merged = merge_studies(parts, ["flat", "cross"])
    assert list(merged["methods"]) == ["flat", "cross"] and merged["methods"]["cross"]["val_loss"] == [1.1, 1.8, 5.0]
    # --common-seeds: the variant is paired with flat on the seeds it has (1, 2); seed 3 is left out for all.
    common = merge_studies(parts, common_seeds=True)
    assert common["seeds"] == [1, 2] and common["methods"]["flat"]["val_loss"] == [1.0, 2.0]
    assert common["methods"]["cross:lrm=0.1"]["val_loss"] == [0.9, 2.1]
    assert list(common["methods"]["cross"]["curves"]) == ["1", "2"]
    write_report(_fake_study({"linear": [1.0]}, [7]), str(tmp_path / "c"))
    with pytest.raises(LayoutError, match="no seed has a run of every method"):
        merge_studies(parts + [str(tmp_path / "c")], common_seeds=True)
    with pytest.raises(LayoutError, match="linear is in none of the directories"):
        merge_studies(parts, ["flat", "linear"])
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "tools/parity.py", "--merge", *parts, "--methods", "flat,cross",
                           "--output-dir", str(tmp_path / "out")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert list(json.loads((tmp_path / "out" / "parity.json").read_text())["methods"]) == ["flat", "cross"]


def test_merge_refuses_parts_that_do_not_pair(tmp_path):
    from dchag.parity.merge import merge_studies
    from dchag.parity.report import write_report
    write_report(_fake_study({"flat": [1.0, 2.0]}, [1, 2]), str(tmp_path / "a"))
    write_report(_fake_study({"linear": [1.0]}, [1]), str(tmp_path / "seed1"))
    write_report(_fake_study({"linear": [1.0, 2.0]}, [1, 2], data_path="other"), str(tmp_path / "other"))
    write_report(_fake_study({"flat": [1.0]}, [2]), str(tmp_path / "again"))
    for parts, message in ((["a", "seed1"], "no run for seed(s) [2]"), (["a", "other"], "differ in data_path"),
                           (["a", "again"], "seed 2 is in two"), (["a", "missing"], "does not exist")):
        with pytest.raises(LayoutError, match=re.escape(message)):
            merge_studies([str(tmp_path / d) for d in parts])
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "tools/parity.py", "--merge", str(tmp_path / "a"), str(tmp_path / "seed1"),
                           "--output-dir", str(tmp_path / "a")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1 and "would be overwritten" in proc.stderr
    assert json.loads((tmp_path / "a" / "parity.json").read_text())["methods"]["flat"]["val_loss"] == [1.0, 2.0]


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_aggregation_diagnostics_runs_and_starts_uniform():
    """tools/aggregation_diagnostics.py (docs/PARITY.md, "Init"): at iteration 0 every attention of
    D-CHAG-C is uniform (entropy 1) and the image is a visible part of the backbone's input."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", MASTER_PORT=str(_free_port()))
    proc = subprocess.run([sys.executable, "tools/aggregation_diagnostics.py", "--methods", "cross", "--iters", "2",
                           "--every", "1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = [line.split() for line in proc.stdout.splitlines() if re.match(r"^\s+\d+\s", line)]
    assert [r[0] for r in rows] == ["0", "1", "2"], proc.stdout
    it0 = dict(zip(("iter", "loss", "content", "ratio", "h_part", "h_final"), rows[0]))
    assert float(it0["h_part"]) == pytest.approx(1.0, abs=1e-6) and float(it0["h_final"]) == pytest.approx(1.0, abs=1e-6)
    assert float(it0["ratio"]) > 0.1


def test_report_says_plainly_when_a_method_does_not_beat_a_baseline(tmp_path, capsys):
    """The issue's Sentinel-2 case: flat 0.545 and D-CHAG-L 0.554 against a visible-pixel mean of
    0.507. parity.md and the merge's log line both say it; a study where every run is below every
    baseline says that instead."""
    from dchag.parity.report import write_report
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import parity as parity_tool
    study = _fake_study({"flat": [0.545, 0.54], "linear": [0.554, 0.50]}, [1, 2])
    study["baselines"] = {"visible-pixel mean": {"val_loss": 0.507, "metrics": {}}}
    write_report(study, str(tmp_path / "a"))
    md = (tmp_path / "a" / "parity.md").read_text()
    assert "flat (baseline) does not beat the baseline 'visible-pixel mean': val loss 0.5425 against 0.507 " \
           "(below it in 0 of 2 seeds)" in md
    assert "D-CHAG-L does not beat the baseline 'visible-pixel mean': val loss 0.527 against 0.507 " \
           "(below it in 1 of 2 seeds)" in md
    write_report(_fake_study({"flat": [1.0], "linear": [1.4]}, [3]), str(tmp_path / "b"))
    assert "Every method beats every baseline in every seed: 'persistence' (1.5)" in \
           (tmp_path / "b" / "parity.md").read_text()
    assert parity_tool.merge([str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "ab")) == 0
    assert "[parity] flat (baseline) does not beat the baseline 'visible-pixel mean'" in capsys.readouterr().out


def test_late_change_is_the_last_fifth_of_the_curve():
    from dchag.parity.report import late_change
    curve = {"iterations": [100, 200, 300, 400, 500], "val_loss": [2.0, 1.0, 0.8, 0.5, 0.4]}
    assert late_change(curve) == pytest.approx((0.4 - 0.5) / 0.5)  # from iteration 400 (= 0.8 x 500) on
    assert late_change({"iterations": [3, 6], "val_loss": [2.0, 1.5]}) == pytest.approx(-0.25)
