"""The transfer study's data and figures: Sentinel-2-like bands are box averages of the scene, the
fine-tune images are other images of the same world, and the report's intervals follow the formula."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dchag.data import DataError, open_source
from dchag.data.readers.synthetic import S2_BANDS, SyntheticSource
from dchag.parity.transfer_study import StudyConfig, plan, summarize, verdict

REPO = __import__("os").path.dirname(__import__("os").path.dirname(__import__("os").path.abspath(__file__)))
WORLD = dict(height=6, width=5, num_images=3, seed=4, wavelength_min=400.0, wavelength_max=2500.0)


def test_s2_bands_are_box_averages_of_the_scene():
    scene = SyntheticSource(num_channels=211, **WORLD)
    s2 = open_source("synthetic:bands=s2,scene_channels=211,wavelength_min=400,wavelength_max=2500", num_channels=13,
                     height=6, width=5, num_images=3, seed=4)
    wl = 400.0 + 10.0 * np.arange(211)  # 400-2,500 nm every 10 nm
    np.testing.assert_allclose(scene.wavelengths, wl)
    assert s2.channel_names == [b[0] for b in S2_BANDS]
    np.testing.assert_array_equal(s2.wavelengths, [b[1] for b in S2_BANDS])
    for n in range(3):
        x = scene.read(n).astype(np.float64)
        want = np.stack([x[(wl >= c - w / 2) & (wl <= c + w / 2)].mean(axis=0) for _, c, w in S2_BANDS])
        np.testing.assert_allclose(s2.read(n), want, rtol=0, atol=2e-6)
        np.testing.assert_allclose(s2.read(n, range(4, 9), slice(1, 4)), want[4:9, 1:4], rtol=0, atol=2e-6)
    # B06 (740 +- 7.5 nm) holds the single scene band at 740 nm; B12 (2190 +- 90 nm) 19 of them
    np.testing.assert_allclose(s2.read(0)[5], scene.read(0)[34], atol=1e-7)


def test_band_set_errors_name_the_fix():
    with pytest.raises(DataError, match=r"band B09 \(945 \+- 10 nm\) holds no scene channel.*raise scene_channels"):
        SyntheticSource(num_channels=13, bands="s2", scene_channels=50, **WORLD)
    with pytest.raises(DataError, match="--num-channels 13"):
        SyntheticSource(num_channels=12, bands="s2", scene_channels=211, **WORLD)
    with pytest.raises(DataError, match="unknown synthetic band set"):
        SyntheticSource(num_channels=13, bands="landsat", scene_channels=211, **WORLD)
    with pytest.raises(DataError, match="not a number"):
        open_source("synthetic:wavelength_min=blue", num_channels=4, height=4, width=4)


def test_image_offset_gives_later_images_of_the_same_world():
    full = SyntheticSource(num_channels=7, **{**WORLD, "num_images": 5})
    later = SyntheticSource(num_channels=7, **{**WORLD, "num_images": 2}, image_offset=3)
    for n in range(2):
        np.testing.assert_array_equal(later.read(n), full.read(n + 3))
        np.testing.assert_array_equal(later.abundances(n, np.arange(6), np.arange(5)),
                                      full.abundances(n + 3, np.arange(6), np.arange(5)))
    assert not np.allclose(later.read(0), full.read(0))
    np.testing.assert_array_equal(later.spectra(np.arange(7)), full.spectra(np.arange(7)))  # same endmembers


def _result(stage, method, regime, seed, val_loss, r2=None):
    metrics = {} if r2 is None else {"r2/abundance0": r2 - 0.1, "r2/abundance1": r2 + 0.1}
    return {"name": f"{stage}-{method}-{regime}-{seed}", "stage": stage, "method": method, "regime": regime,
            "seed": seed, "val_loss": val_loss, "metrics": metrics}


def test_report_intervals_follow_the_student_t_formula(tmp_path):
    cfg = StudyConfig(seeds=5, methods="flat,linear")
    runs = plan(cfg, str(tmp_path))
    assert len(runs) == 2 * 5 + 2 * 2 * 4 * 5  # pretraining; 2 downstreams x 2 methods x 4 regimes x 5 seeds
    lora = [r for r in runs if r.regime == "lora"]
    assert len(lora) == 20 and all("--finetune" in r.argv and "--lora-rank" in r.argv for r in lora)
    rng = np.random.default_rng(0)
    results = []
    for m in ("flat", "linear"):
        for s in cfg.seed_list():
            results.append(_result("pretrain", m, None, s, 1.0 + rng.normal()))
            for reg in ("finetune", "scratch", "probe", "lora"):
                results.append(_result("s2", m, reg, s, 1.0 + rng.normal(0, 0.1)))
                results.append(_result("regress", m, reg, s, 1.0, r2=0.5 + rng.normal(0, 0.1)))
    summary = summarize(results, cfg)
    by = {(r["stage"], r["method"], r["regime"], r["seed"]): r for r in results}
    for stage, value in (("s2", lambda r: r["val_loss"]), ("regress", lambda r: np.mean(list(r["metrics"].values())))):
        row = summary["downstream"][stage]["rows"]["linear"]
        d = np.array([value(by[(stage, "linear", "finetune", s)]) - value(by[(stage, "linear", "scratch", s)])
                      for s in cfg.seed_list()])
        half = 2.776445 * d.std(ddof=1) / math.sqrt(5)  # t_{0.975, 4}
        got = row["finetune_minus_scratch"]
        assert got["mean"] == pytest.approx(d.mean(), abs=1e-12)
        assert got["half_width"] == pytest.approx(half, rel=5e-4)
        lora = np.array([value(by[(stage, "linear", "lora", s)]) - value(by[(stage, "linear", "scratch", s)])
                         for s in cfg.seed_list()])
        assert row["lora_minus_scratch"]["mean"] == pytest.approx(lora.mean(), abs=1e-12)
        probe = np.array([value(by[(stage, "linear", "probe", s)]) for s in cfg.seed_list()])
        assert row["regimes"]["probe"]["half_width"] == pytest.approx(2.776445 * probe.std(ddof=1) / math.sqrt(5),
                                                                      rel=5e-4)
    # the words follow the interval and the metric's direction
    assert verdict({"n": 5, "low": -0.3, "high": -0.1}, "val_loss") == "helps"
    assert verdict({"n": 5, "low": -0.3, "high": -0.1}, "r2") == "hurts"
    assert verdict({"n": 5, "low": -0.3, "high": 0.1}, "r2") == "no measurable difference"


def test_landsat_and_even_band_sets_are_box_averages_of_the_scene():
    from dchag.data.readers.synthetic import L8_BANDS, band_table
    scene = SyntheticSource(num_channels=211, **WORLD)
    wl = scene.wavelengths
    even = band_table("50x900-1700nm")
    assert len(even) == 50 and even[0][1:] == (908.0, 16.0) and even[0][0] == "908.00nm"  # a generated name
    for bands, table in (("l8", L8_BANDS), ("50x900-1700nm", even)):
        src = SyntheticSource(num_channels=len(table), bands=bands, scene_channels=211, **WORLD)
        x = scene.read(1).astype(np.float64)
        want = np.stack([x[(wl >= c - w / 2) & (wl <= c + w / 2)].mean(axis=0) for _, c, w in table])
        np.testing.assert_allclose(src.read(1), want, rtol=0, atol=2e-6)
    with pytest.raises(DataError, match="NxLO-HInm"):
        band_table("50x1700-900")


def test_the_blend_study_pairs_each_pretraining_by_seed(tmp_path, monkeypatch):
    from dchag.arguments import parse_args
    from dchag.parity.transfer_study import blend_study, report_markdown
    from dchag.training import preflight
    cfg = blend_study(seeds=3)
    runs = plan(cfg, str(tmp_path))
    assert len(runs) == 3 + 3 + 5 * 3
    blend = next(r for r in runs if r.stage == "pretrain-blend")
    argv = list(blend.argv)
    paths = argv[argv.index("--data-path") + 1:argv.index("--img-h")]
    assert paths[0::2] == ["0.5", "0.25", "0.25"] and "--num-channels" not in argv
    assert "bands=s2" in paths[3] and "image_offset=1000" in paths[3] and "bands=50x900-1700nm" in paths[5]
    # the blend pretraining passes the pre-flight: 211 + 8 + 40 channels (5 of S2's and 10 of the 50 lie on the grid)
    monkeypatch.chdir(REPO)
    found = preflight.run(parse_args(argv), world=1, late_checks=[])
    assert found.num_channels == 211 + 8 + 40 and found.cfg.source_names[1] == "synthetic-s2"
    ft = next(r for r in runs if r.regime == "finetune-blend" and r.seed == blend.seed)
    assert list(ft.argv)[list(ft.argv).index("--pretrained-checkpoint") + 1] == blend.save
    assert "bands=l8" in " ".join(ft.argv)
    rng = np.random.default_rng(1)
    results = [_result(r.stage, r.method.spec, r.regime, r.seed, 1.0 + rng.normal(0, 0.1)) for r in runs]
    summary = summarize(results, cfg)
    row = summary["downstream"]["l8"]["rows"]["linear"]
    by = {(r["regime"], r["seed"]): r["val_loss"] for r in results if r["stage"] == "l8"}
    d = [by[("finetune-blend", s)] - by[("finetune", s)] for s in cfg.seed_list()]
    assert row["finetune-blend_minus_finetune"]["mean"] == pytest.approx(np.mean(d), abs=1e-12)
    md = report_markdown(summary, {})
    assert "fine-tuned (blend of 3 sensors) - fine-tuned (211 bands)" in md and "D-CHAG-L G=8, blend of 3" in md
