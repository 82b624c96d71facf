"""A smoke run of tools/benchmark.py on one tiny configuration (C=8, T=P=2, 2 measured steps).

Checks that the JSON, Markdown and PNG are written with sane fields and that the collective
bytes counted in the run equal the planner's (no timing is asserted).
"""

from __future__ import annotations

import json

import pytest

from dchag.bench.cli import main as bench_main
from dchag.bench.config import BenchConfig
from dchag.bench.report import planner_specs
from dchag.planner.comm import collectives, summarize

ARGS = ["--channels", "8", "--tp", "2", "--steps", "2", "--warmup", "1", "--num-layers", "2", "--hidden-size", "32",
        "--num-attention-heads", "4", "--ffn-hidden-size", "64", "--img-h", "8", "--img-w", "8", "--patch-dim", "2",
        "--dchag-groups", "4", "--quiet"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    assert bench_main(ARGS + ["--output-dir", str(out)]) == 0
    with open(out / "benchmark.json") as f:
        return out, json.load(f)


def test_outputs_written(run):
    out, data = run
    png = (out / "benchmark.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    md = (out / "benchmark.md").read_text()
    assert "| T=P | C | method |" in md and "## Targets" in md and "## Planner vs measurement" in md
    for label in ("TP alone (flat)", "D-CHAG-L (linear)", "D-CHAG-C (cross)"):
        assert label in md


def test_rows_have_sane_fields(run):
    _, data = run
    rows = data["rows"]
    assert sorted((r["T"], r["P"], r["method"]) for r in rows) == [(2, 1, "tp"), (2, 2, "dchag-c"), (2, 2, "dchag-l")]
    for r in rows:
        for part in ("channel", "step"):
            p = r[part]
            assert len(p["times_s"]) == 2 and all(t > 0 for t in p["times_s"])
            mem = p["memory"]
            assert mem["peak"] > 100 * 2**20  # the process holds torch + megatron
            assert 0 < mem["above_step"] <= mem["above_lib"] < mem["peak"]
            assert p["saved_bytes"] > 0
            assert p["comm"]["forward"]["calls"] >= 1 and p["comm"]["backward"]["calls"] >= 1
        # AdamW: exp_avg + exp_avg_sq (fp32) per parameter, plus one scalar step tensor per tensor
        assert 8 * r["param_numel"] < r["opt_state_bytes"] < 8 * r["param_numel"] + 4096
    # D-CHAG moves G tokens, TP alone C tokens, in the channel stage's backward all-reduce
    bwd = {r["method"]: r["channel"]["comm"]["backward"]["payload_bytes"] for r in rows}
    assert bwd["tp"] == 2 * bwd["dchag-l"] == 2 * bwd["dchag-c"]  # C / G = 8 / 4
    assert set(data["targets"]) >= {"channel_memory_ratio", "step_memory_reduction", "step_speedup",
                                    "channel_backward_comm_ratio"}


def test_counted_bytes_match_planner(run):
    _, data = run
    cfg = BenchConfig.from_dict(data["config"])
    for r in data["rows"]:
        spec, layout = planner_specs(cfg.model, r)
        colls = collectives(spec, layout)
        for part, pred in (("channel", summarize(colls, channel_stage_only=True)), ("step", summarize(colls))):
            meas = r[part]["comm"]
            assert set(pred) == set(meas), (r["method"], part, pred, meas)
            for ph in pred:
                assert pred[ph]["calls"] == meas[ph]["calls"]
                assert pred[ph]["payload_bytes"] == meas[ph]["payload_bytes"]
                assert pred[ph]["sent_bytes"] == pytest.approx(meas[ph]["sent_bytes"], rel=1e-12)
    worst = data["planner_worst"]
    assert worst["comm_exact"] and worst["param_numel_exact"]
    assert worst["channel_saved"]["abs_err"] < 0.05 and worst["step_saved"]["abs_err"] < 0.05
