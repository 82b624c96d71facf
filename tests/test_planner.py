"""The planner's arithmetic on cases small enough to check by hand, and against a real model.

One 2-rank job builds tiny DChagViTs on several layouts and returns each rank's parameter
count and the collectives counted during a channel-stage pass and a whole MAE step; the planner
must reproduce the counts exactly. The rest is pure arithmetic (no processes).
"""

from __future__ import annotations

import pytest
import torch

from dchag.planner.cli import main as planner_main
from dchag.planner.comm import collectives, ring_bytes_sent, summarize
from dchag.planner.memory import estimate_memory
from dchag.planner.params import param_counts
from dchag.planner.plan import GB, Hardware, make_plan
from dchag.planner.recommend import recommend
from dchag.planner.spec import LayoutSpec, ModelSpec, PlanError
from tests.distributed import run_distributed

TINY = dict(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64, img_h=8, img_w=8, patch_dim=2)
B = 2
# (model overrides, T, P): uneven groups (C=13, G=4), a tree, cross, flat (TP alone), forecast
CASES = [
    (dict(num_channels=13, aggregation="linear", groups=4), 2, 2),
    (dict(num_channels=13, aggregation="linear", groups=4), 2, 1),
    (dict(num_channels=16, aggregation="linear", groups=4, tree_levels=2), 2, 2),
    (dict(num_channels=12, aggregation="cross", groups=4, tree_levels=2), 2, 2),
    (dict(num_channels=12, aggregation="flat"), 2, 1),
    (dict(num_channels=12, aggregation="cross", groups=4, task="forecast"), 1, 1),
    # the streamed channel stage: same parameters and collectives
    (dict(num_channels=13, aggregation="linear", groups=4, channel_chunk=3), 2, 2),
    (dict(num_channels=12, aggregation="cross", groups=4, tree_levels=2, channel_chunk=2), 2, 2),
]


def spec_of(overrides, **extra) -> ModelSpec:
    return ModelSpec(**TINY, **overrides, **extra)


def _measure_worker(cases):
    from dchag.bench.measure import CommCounter, phase
    from dchag.bench.worker import setup_layout
    from dchag.model.config import DChagConfig
    from dchag.model.vit import DChagViT
    from dchag.tasks.mae import mae_loss, patch_mask
    out = []
    for overrides, T, P in cases:
        setup_layout(T, P, 1234)
        cfg = DChagConfig(**TINY, **overrides)
        model = DChagViT(cfg)
        images = torch.randn(B, len(model.channels), cfg.img_h, cfg.img_w, generator=torch.Generator().manual_seed(0))
        with CommCounter() as counter:
            with phase("forward"):
                loss = model.aggregate_channels(images).sum()
            with phase("backward"):
                loss.backward()
            channel = counter.summary()
            counter.reset()
            model.zero_grad(set_to_none=True)
            step = None
            if cfg.task == "mae":
                mask = patch_mask(torch.arange(B), cfg.num_patches, 0.5, 0, 0)
                valid = torch.ones_like(images, dtype=torch.bool)
                with phase("forward"):
                    loss = mae_loss(model(images, patch_mask=mask), images, valid, mask, cfg.grid, cfg.patch_dim)
                with phase("backward"):
                    loss.backward()
                step = counter.summary()
        out.append({"numel": sum(p.numel() for p in model.parameters()), "channel": channel, "step": step,
                    "components": {k: sum(p.numel() for p in getattr(model, k).parameters())
                                   for k in ("tokenizer", "partial", "final", "backbone", "head")}})
    return out


@pytest.fixture(scope="module")
def measured():
    return run_distributed(_measure_worker, 2, CASES)


def _strip(summary: dict) -> dict:
    return {ph: {k: v[k] for k in ("calls", "payload_bytes", "sent_bytes")} for ph, v in summary.items()}


@pytest.mark.parametrize("index", range(len(CASES)))
def test_param_counts_equal_model_numel(measured, index):
    overrides, T, P = CASES[index]
    counts = param_counts(spec_of(overrides), LayoutSpec(T, P))
    for rank in measured:  # rank 0 holds the largest channel share; every component must match there
        got = rank[index]
        if rank is measured[0]:
            assert sum(counts.values()) == got["numel"], (counts, got["components"])
            for k, v in got["components"].items():
                assert counts[k] == v, (k, counts[k], v)
        else:
            assert sum(counts.values()) >= got["numel"]


@pytest.mark.parametrize("index", range(len(CASES)))
def test_collective_bytes_equal_counted(measured, index):
    overrides, T, P = CASES[index]
    model, layout = spec_of(overrides), LayoutSpec(T, P, micro_batch_size=B)
    colls = collectives(model, layout)
    for rank in measured:
        got = rank[index]
        assert _strip(summarize(colls, channel_stage_only=True)) == _strip(got["channel"])
        if got["step"] is not None:
            assert _strip(summarize(colls)) == _strip(got["step"])


def test_collective_bytes_by_hand():
    # C=8, G=4, T=P=2, B=2, L=16, D=32, fp32: one token per position = B*L*D*4 = 4096 bytes
    m = ModelSpec(**TINY, num_channels=8, aggregation="linear", groups=4)
    c = {x.what: x for x in collectives(m, LayoutSpec(2, 2, micro_batch_size=2))}
    gather = c["gather partial tokens"]
    assert (gather.payload_bytes, gather.sent_bytes) == (2 * 4096, 8192)  # G/P = 2 tokens, (n-1) x payload
    kv = c["final aggregation kv input grad"]
    assert (kv.payload_bytes, kv.sent_bytes) == (4 * 4096, 16384)  # G tokens; 2 (n-1)/n x payload
    tp = collectives(m.with_(aggregation="flat"), LayoutSpec(2, 1, micro_batch_size=2))
    flat_kv = next(x for x in tp if x.what == "final aggregation kv input grad")
    assert flat_kv.payload_bytes == 8 * 4096  # C tokens: C/G = 2 times D-CHAG's
    assert ring_bytes_sent("reduce_scatter", 1000, 4) == 750 and ring_bytes_sent("all_reduce", 1000, 1) == 0


def test_zero_sharding_divides_model_states():
    m = ModelSpec(**TINY, num_channels=8, aggregation="linear", groups=4)
    n = sum(param_counts(m, LayoutSpec()).values())
    layer = (param_counts(m, LayoutSpec())["backbone"] - 2 * 32) // 2

    def states(z, precision, dp=4):
        e = estimate_memory(m, LayoutSpec(1, 1, dp, z, precision))
        return e.params, e.grads, e.optimizer

    assert states(0, "fp32") == (4 * n, 4 * n, 8 * n)
    assert states(1, "fp32") == (4 * n, 4 * n, 12 * n / 4)  # DeepSpeed clones the fp32 partition
    assert states(2, "bf16") == (2 * n, 2 * n / 4, 12 * n / 4)
    assert states(3, "bf16") == (2 * n / 4 + 2 * layer * 2, 2 * n / 4, 12 * n / 4)
    assert states(3, "bf16", dp=1) == (2 * n, 2 * n, 12 * n)  # nothing to shard over


def test_activation_formulas_by_hand():
    # flat, T=1, B=1, C=4, L=16, D=32 -> X = 4*16*32*4 = 8192 bytes; unfused, the final saves
    # X(1+3/T) + probs + proj input; sdpa X(1+2/T) + the query and output rows + their fp32 log-sum-exp
    m = ModelSpec(**TINY, num_channels=4, aggregation="flat", attention_backend="unfused")
    e = estimate_memory(m, LayoutSpec(1, 1, micro_batch_size=1))
    X, probs, proj_in = 8192, 16 * 4 * 4 * 4, 16 * 32 * 4
    assert e.activations["channel_stage"] == 4 * X + probs + proj_in
    e = estimate_memory(m.with_(attention_backend="sdpa"), LayoutSpec(1, 1, micro_batch_size=1))
    assert e.activations["channel_stage"] == 3 * X + 2 * proj_in + 16 * 4 * 4
    # a backbone layer (fp32, T=1): unfused saves the probabilities [b, h, s, s], sdpa their log-sum-exp [b, h, s]
    E = 16 * 32 * 4
    layer = {k: estimate_memory(m.with_(attention_backend=k), LayoutSpec(1, 1, micro_batch_size=1)).activations["backbone"]
             for k in ("unfused", "sdpa")}
    assert layer["unfused"] - layer["sdpa"] == 2 * (4 * 16 * 16 * 4 - 4 * 16 * 4) and layer["sdpa"] > 2 * 12 * E  # (4 + 4/T) E + 2 s b F, F = 2 D
    # linear, P=2: the rank's tokens (C/P = 2 channels) saved, final over G=2 tokens
    m = ModelSpec(**TINY, num_channels=4, aggregation="linear", groups=2, attention_backend="unfused")
    e2 = estimate_memory(m, LayoutSpec(2, 2, micro_batch_size=1))
    X_r, X_G = 2 * 2048, 2 * 2048
    assert e2.activations["channel_stage"] == X_r + X_G * (1 + 3 / 2) + 16 * 2 * 2 * 4 + 16 * 16 * 4
    # D-CHAG's channel stage shrinks with P, TP alone's does not
    big = ModelSpec(**TINY, num_channels=512, aggregation="linear", groups=8)
    tp = [estimate_memory(big.with_(aggregation="flat"), LayoutSpec(T, 1)).activations["channel_stage"] for T in (1, 4)]
    dc = [estimate_memory(big, LayoutSpec(T, T)).activations["channel_stage"] for T in (1, 4)]
    assert tp[1] > 0.4 * tp[0] and dc[1] < 0.3 * dc[0]


def test_streamed_channel_stage_model():
    """Streamed: the channel stage's saved activations do not grow with C, its peak grows only with
    the parameter-sized gradients, the step costs one more forward of tokenizer + first level."""
    from dchag.planner.flops import forward_flops, step_flops
    paper = dict(num_layers=24, hidden_size=128, num_attention_heads=4, ffn_hidden_size=512, img_h=32, img_w=32,
                 patch_dim=4, groups=8)
    for agg in ("linear", "cross"):
        est = {(C, K): estimate_memory(ModelSpec(**paper, num_channels=C, aggregation=agg, channel_chunk=K),
                                       LayoutSpec(4, 4, micro_batch_size=2)) for C in (512, 4096) for K in (0, 16)}
        saved = {k: e.activations["channel_stage"] for k, e in est.items()}
        assert saved[(512, 16)] == saved[(4096, 16)] < saved[(512, 0)] < saved[(4096, 0)]
        assert est[(4096, 16)].channel_stage_peak < est[(512, 0)].channel_stage_peak
        m = ModelSpec(**paper, num_channels=512, aggregation=agg)
        f = forward_flops(m, LayoutSpec(4, 4))
        extra = step_flops(m.with_(channel_chunk=16), LayoutSpec(4, 4)) - step_flops(m, LayoutSpec(4, 4))
        assert f["tokenizer"] < extra <= f["tokenizer"] + f["partial"]
    with pytest.raises(PlanError, match="streaming needs linear or cross"):
        ModelSpec(**TINY, num_channels=8, aggregation="flat", channel_chunk=4)


def test_impossible_inputs_have_clear_errors(capsys):
    m = ModelSpec(**TINY, num_channels=8, aggregation="linear", groups=4)
    with pytest.raises(PlanError, match="does not divide T"):
        estimate_memory(m, LayoutSpec(2, 4))
    with pytest.raises(PlanError, match="does not divide G"):
        estimate_memory(m.with_(groups=6), LayoutSpec(4, 4))
    with pytest.raises(PlanError, match="heads"):
        estimate_memory(m, LayoutSpec(8, 1))
    with pytest.raises(PlanError, match="patch"):
        ModelSpec(**dict(TINY, patch_dim=3), num_channels=8)
    with pytest.raises(PlanError, match="groups"):
        ModelSpec(**TINY, num_channels=4, groups=8)
    args = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--img-h", "8", "--img-w", "8",
            "--patch-dim", "2", "--num-channels", "8", "--dchag-groups", "4"]
    assert planner_main(args + ["--tensor-model-parallel-size", "2", "--channel-parallel-size", "4"]) == 2
    assert "does not divide T" in capsys.readouterr().err


def test_cli_table_is_readable(capsys):
    args = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--img-h", "8", "--img-w", "8",
            "--patch-dim", "2", "--num-channels", "64", "--dchag-groups", "4", "--dchag-aggregation", "flat,linear",
            "--tensor-model-parallel-size", "1,2,4"]
    assert planner_main(args) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["method", "T", "P"] and len(out) == 2 + 6
    # D-CHAG-L streams by default, as pretrain_dchag.py does; --dchag-channel-chunk 0 plans it unstreamed
    assert any(line.strip().startswith("D-CHAG-L (G=4, streamed K=64)") for line in out)
    assert planner_main(args + ["--dchag-channel-chunk", "0"]) == 0
    assert any(line.strip().startswith("D-CHAG-L (G=4) ") for line in capsys.readouterr().out.splitlines())


def test_recommendation_fits_and_is_fastest():
    m = ModelSpec(num_layers=8, hidden_size=1024, num_attention_heads=16, img_h=128, img_w=128, patch_dim=8,
                  num_channels=256, aggregation="linear", groups=16)
    hw = Hardware(memory_gb=16.0, reserve_gb=1.0)
    rec = recommend(m, 32, hw, micro_batch_size=4)
    assert rec.best is not None and rec.best.fits
    assert rec.best.memory.total <= (16.0 - 1.0) * GB
    assert all(p.memory.total <= hw.usable_bytes for p in rec.fitting)
    assert rec.best.samples_per_s == max(p.samples_per_s for p in rec.fitting)
    lay = rec.best.layout
    assert lay.tensor_parallel * lay.data_parallel == 32 and lay.tensor_parallel % lay.channel_parallel == 0
    # the recommended layout is re-derivable and fits; a budget nothing fits says so
    assert make_plan(rec.best.model, lay, hw).fits
    tiny_hw = Hardware(memory_gb=1.01, reserve_gb=1.0)
    none = recommend(m, 32, tiny_hw, micro_batch_size=4)
    assert none.best is None and none.smallest is not None and not none.smallest.fits


def test_cluster_scale_recommendation_cli(capsys):
    args = ["--num-layers", "32", "--hidden-size", "8192", "--num-attention-heads", "64", "--img-h", "256",
            "--img-w", "256", "--patch-dim", "16", "--num-channels", "512", "--bf16", "--recommend",
            "--num-gpus", "1024", "--gpu-memory-gb", "64", "--dchag-aggregation", "flat,linear,cross", "--top", "3"]
    assert planner_main(args) == 0
    out = capsys.readouterr().out
    assert "Recommended:" in out and "1024 GPUs x 64 GB" in out
    assert planner_main(args[:-6] + ["--gpu-memory-gb", "4.5"]) == 1  # 0.5 GB usable
    assert "No layout fits" in capsys.readouterr().out
