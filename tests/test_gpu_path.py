"""The GPU path, checked on CPU: ``--attention-backend sdpa`` equals the ``unfused`` reference
(dchag/model/attention.py), and the coalesced sequence-parallel gradient reduction equals the
per-parameter one (dchag/parallel/grads.py).

One 2-rank gloo job (process start-up dominates on CPU) records, and the tests below check:

* model: for flat, D-CHAG-L, D-CHAG-C and a D-CHAG-C tree (k = 2, uneven groups: a padded
  segment mask), on every layout T, P in {1, 2} (P | T; sequence parallel on when T = 2), the
  sdpa model loaded with the unfused model's weights gives the same output and every gathered
  parameter gradient within 1e-5 (fp32, dropout off);
* backbone core attention (``SDPADotProductAttention``) against a plain float64 formula that
  shares no code with either backend, with a causal mask and grouped-query attention too;
* its dropout is drawn inside megatron's model-parallel RNG stream (not the default one) when
  sequence parallel is off, and from the default stream when it is on, as ``DotProductAttention``;
* training through ``pretrain()`` (D-CHAG-C MAE, T = P = 2, sequence parallel, ZeRO 1): the sdpa
  losses of 3 iterations equal the unfused ones within 1e-5, and a bf16 sdpa run follows the
  fp32 sdpa loss curve within 1e-2 over 20 iterations; ZeRO-3 (partitioned parameters: the SP
  reduction falls back to per-parameter hooks) gives the ZeRO-1 losses;
* SP gradients (T = 2): the coalesced reduction (one flattened all-reduce per layer and one for
  the final norm) gives the per-parameter hooks' gradients, plain, with activation recompute and
  over two accumulated micro-batches, with 3 collectives per backward instead of 14;
* ``tools/gpu_check.py``: its refusals, and its ``--smoke`` run on the CPU writes the JSON and
  Markdown report (kernels per shape, start-up, training figures, a falling loss).
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.distributed import run_distributed
from tests.model_cases import perturb_, rel_err, setup_layout, tiny_config

TOL = 1e-5
BF16_TOL = 1e-2
LAYOUTS = ((1, 1), (2, 1), (2, 2))  # (T, P)
CASES = {
    "flat": dict(aggregation="flat", num_channels=12),
    "linear": dict(aggregation="linear"),
    "cross": dict(aggregation="cross"),
    "cross-tree2": dict(aggregation="cross", tree_levels=2),  # 13 channels, G = 4: uneven sub-groups
}


# ----------------------------------------------------------------------------------------------
# worker side (runs in each spawned gloo rank)
# ----------------------------------------------------------------------------------------------


def _model_case(cfg_kwargs, tp, cp):
    from dchag.model.vit import DChagViT
    from dchag.parallel.comm import reduce_from_channel_parallel_region
    from dchag.parallel.state_dict import full_state_dict, load_full_state_dict
    gen = torch.Generator().manual_seed(5)
    base = tiny_config(**cfg_kwargs)
    images = torch.randn(2, base.num_channels, base.img_h, base.img_w, generator=gen)
    mask = torch.rand(2, base.num_patches, generator=gen) < 0.5
    weights = torch.randn(2, base.num_channels, base.img_h, base.img_w, generator=gen)
    out = {}
    weights_full = None
    for backend in ("unfused", "sdpa"):
        setup_layout(tp, cp)
        model = DChagViT(tiny_config(**cfg_kwargs, sequence_parallel=tp > 1, attention_backend=backend))
        if weights_full is None:
            perturb_(model, seed=3)
            weights_full = full_state_dict(model)
        else:
            load_full_state_dict(model, weights_full)
        y = model(images[:, model.channels], patch_mask=mask)
        reduce_from_channel_parallel_region((y * weights[:, model.channels]).sum()).backward()
        core = type(model.backbone.layers[0].self_attention.core_attention).__name__
        out[backend] = (y.detach(), full_state_dict(model, grads=True), core)
    (y_u, g_u, core_u), (y_s, g_s, core_s) = out["unfused"], out["sdpa"]
    return {"out": rel_err(y_s, y_u), "grads": {n: rel_err(g_s[n], g_u[n]) for n in g_u},
            "same_names": sorted(g_u) == sorted(g_s), "cores": (core_u, core_s)}


def _core_attention_cases():
    """SDPADotProductAttention vs softmax(q k^T / sqrt(d)) v in float64, on this rank's heads."""
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron_patches.cpu import cpu_transformer_config_overrides
    from dchag.model.core_attention import SDPADotProductAttention
    setup_layout(1, 1)
    gen = torch.Generator().manual_seed(2)
    out = {}
    for name, groups, mask_type in (("no_mask", 4, AttnMaskType.no_mask), ("causal", 4, AttnMaskType.causal),
                                    ("gqa", 2, AttnMaskType.no_mask)):
        cfg = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4, num_query_groups=groups,
                                attention_dropout=0.0,
                                **cpu_transformer_config_overrides())
        attn = SDPADotProductAttention(cfg, 1, mask_type, "self")
        sq, b, hd = 6, 2, 8
        q = torch.randn(sq, b, 4, hd, generator=gen)
        k, v = torch.randn(sq, b, groups, hd, generator=gen), torch.randn(sq, b, groups, hd, generator=gen)
        got = attn(q, k, v, None)
        kk, vv = (t.double().repeat_interleave(4 // groups, dim=2) for t in (k, v))
        scores = torch.einsum("qbhd,kbhd->bhqk", q.double(), kk) / math.sqrt(hd)
        if mask_type == AttnMaskType.causal:
            scores = scores.masked_fill(torch.ones(sq, sq).triu(1).bool(), float("-inf"))
        want = torch.einsum("bhqk,kbhd->qbhd", scores.softmax(-1), vv).reshape(sq, b, 4 * hd)
        out[name] = rel_err(got, want)
    return out


def _dropout_streams():
    """Which RNG stream the core attention's dropout draws from, without and with SP."""
    from megatron.core import tensor_parallel
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron_patches.cpu import cpu_transformer_config_overrides
    from dchag.model.core_attention import SDPADotProductAttention
    out = {}
    for sp in (False, True):
        setup_layout(2, 2, seed=11)
        cfg = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4, attention_dropout=0.5,
                                tensor_model_parallel_size=2, sequence_parallel=sp,
                                **cpu_transformer_config_overrides())
        attn = SDPADotProductAttention(cfg, 1, AttnMaskType.no_mask, "self")
        q = torch.ones(4, 2, 2, 8)  # this rank's 2 heads; identical inputs on both ranks
        tracker = tensor_parallel.get_cuda_rng_tracker()
        mp_before = tracker.get_states()["model-parallel-rng"].clone()
        default_before = torch.get_rng_state()
        y = attn(q, q, q, None)
        attn.eval()
        y_eval = attn(q, q, q, None)
        out[sp] = {"mp_advanced": not torch.equal(mp_before, tracker.get_states()["model-parallel-rng"]),
                   "default_advanced": not torch.equal(default_before, torch.get_rng_state()),
                   "dropped": not torch.allclose(y, y_eval), "y": y}
    return out


def _training_runs(tmp):
    from tests.test_training import MAE, _ds, _train
    argv = [a if a != "linear" else "cross" for a in MAE] + ["--channel-parallel-size", "2", "--sequence-parallel",
                                                             "--lr-decay-iters", "20"]  # one LR schedule for all
    fp32 = _ds("zero1_fp32.json") + argv
    return {
        "unfused": _train(fp32 + ["--attention-backend", "unfused", "--train-iters", "3"])["losses"],
        "sdpa": _train(fp32 + ["--attention-backend", "sdpa", "--train-iters", "20"])["losses"],
        "sdpa_bf16": _train(_ds("zero1_bf16.json") + argv + ["--attention-backend", "sdpa",
                                                             "--train-iters", "20"])["losses"],
        # ZeRO-3 partitions the parameters: the SP reduction falls back to per-parameter hooks
        "sdpa_zero3": _train(_ds("zero3_fp32.json") + argv + ["--attention-backend", "sdpa",
                                                              "--train-iters", "3"])["losses"],
    }


def _sp_grads_cases():
    import functools
    import types
    import dchag.model.vit as vit
    from dchag.parallel import grads as grads_mod
    from dchag.model.vit import DChagViT
    from dchag.parallel.state_dict import full_state_dict, load_full_state_dict
    calls = {"n": 0}

    def counting_all_reduce(*args, **kwargs):
        calls["n"] += 1
        return torch.distributed.all_reduce(*args, **kwargs)

    gen = torch.Generator().manual_seed(9)
    images = torch.randn(2, 13, 8, 8, generator=gen)
    out, ref_weights = {}, None
    real = vit.allreduce_sequence_parallel_grads
    grads_mod.dist = types.SimpleNamespace(all_reduce=counting_all_reduce)
    try:
        for recompute in (False, True):
            for mode in ("per_parameter", "coalesced"):
                setup_layout(2, 2)
                vit.allreduce_sequence_parallel_grads = functools.partial(real, mode=mode)
                model = DChagViT(tiny_config(aggregation="cross", sequence_parallel=True,
                                             recompute_activations=recompute))
                if ref_weights is None:
                    perturb_(model, seed=4)
                    ref_weights = full_state_dict(model)
                load_full_state_dict(model, ref_weights)
                calls["n"] = 0
                for micro in range(2):  # two micro-batches accumulate into .grad
                    x = images[micro:micro + 1, model.channels]
                    (model(x) * (micro + 1)).square().mean().backward()
                out[(recompute, mode)] = {"grads": full_state_dict(model, grads=True), "calls": calls["n"]}
    finally:
        vit.allreduce_sequence_parallel_grads = real
        grads_mod.dist = torch.distributed
    result = {}
    for recompute in (False, True):
        a, b = out[(recompute, "per_parameter")], out[(recompute, "coalesced")]
        result[recompute] = {"err": max(rel_err(b["grads"][n], a["grads"][n]) for n in a["grads"]),
                             "calls": (a["calls"], b["calls"])}
    return result


def _job(tmp):
    r = {"models": {(name, t, p): _model_case(kw, t, p) for name, kw in CASES.items() for t, p in LAYOUTS}}
    r["core"] = _core_attention_cases()
    r["dropout"] = _dropout_streams()
    r["sp_grads"] = _sp_grads_cases()
    r["training"] = _training_runs(tmp)
    return r


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    return run_distributed(_job, 2, str(tmp_path_factory.mktemp("attn")))


# ----------------------------------------------------------------------------------------------
# tests
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_sdpa_equals_unfused_output_and_gradients(job, case):
    for rank in job:
        for (name, t, p), r in rank["models"].items():
            if name != case:
                continue
            assert r["cores"] == ("DotProductAttention", "SDPADotProductAttention"), r["cores"]
            assert r["same_names"]
            assert r["out"] <= TOL, f"T={t} P={p}: output rel. error {r['out']:.2e}"
            bad = {n: e for n, e in r["grads"].items() if e > TOL}
            assert not bad, f"T={t} P={p}: gradient rel. errors above {TOL}: {bad}"


def test_sdpa_core_attention_matches_the_formula(job):
    for name, err in job[0]["core"].items():
        assert err <= 1e-6, f"{name}: rel. error {err:.2e} against float64 softmax(q k^T / sqrt(d)) v"


def test_sdpa_dropout_uses_megatrons_rng_streams(job):
    for rank in job:
        no_sp, sp = rank["dropout"][False], rank["dropout"][True]
        assert no_sp["dropped"] and sp["dropped"]
        # without SP: the model-parallel (per TP rank) stream, the default stream untouched
        assert no_sp["mp_advanced"] and not no_sp["default_advanced"]
        # with SP: the default stream, as megatron's DotProductAttention
        assert sp["default_advanced"] and not sp["mp_advanced"]
    # different heads on the two TP ranks get different masks (seed + 2718 + tp_rank)
    assert not torch.equal(job[0]["dropout"][False]["y"], job[1]["dropout"][False]["y"])


def test_training_sdpa_equals_unfused_and_bf16_follows_fp32(job):
    tr = job[0]["training"]
    assert sorted(tr["unfused"]) == [1, 2, 3] and sorted(tr["sdpa"]) == list(range(1, 21))
    for it, ref in tr["unfused"].items():
        assert abs(tr["sdpa"][it] - ref) <= TOL * abs(ref), (it, tr["sdpa"][it], ref)
    for it, ref in tr["sdpa_zero3"].items():
        assert abs(ref - tr["sdpa"][it]) <= TOL * abs(ref), (it, ref, tr["sdpa"][it])
    for it, ref in tr["sdpa"].items():
        assert math.isfinite(tr["sdpa_bf16"][it])
        assert abs(tr["sdpa_bf16"][it] - ref) <= BF16_TOL * abs(ref), (it, tr["sdpa_bf16"][it], ref)
    assert job[1]["training"] == tr


def test_coalesced_sp_grad_reduction_equals_per_parameter(job):
    for rank in job:
        for recompute, r in rank["sp_grads"].items():
            assert r["err"] <= 1e-7, f"recompute={recompute}: rel. error {r['err']:.2e}"
            # per backward: 2 layers x 6 SP params + the final norm's 2, vs one per layer + one
            assert r["calls"] == (2 * 14, 2 * 3), r["calls"]


# ----------------------------------------------------------------------------------------------
# tools/gpu_check.py: argument parsing and the tiny --smoke run on the CPU
# ----------------------------------------------------------------------------------------------


def _gpu_check(args, tmp_path):
    import os
    import subprocess
    import sys
    from tests.distributed import free_port
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port()),
           "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
    return subprocess.run([sys.executable, os.path.join(repo, "tools", "gpu_check.py"), *args], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)


def test_gpu_check_arguments(tmp_path):
    assert _gpu_check(["--help"], tmp_path).returncode == 0
    bad = _gpu_check(["--output-dir", str(tmp_path / "o"), "--methods", "cross"], tmp_path)
    assert bad.returncode == 2 and "--methods" in bad.stderr
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "gpu_check.json").write_text("{}")
    used = _gpu_check(["--output-dir", str(tmp_path / "used"), "--smoke"], tmp_path)
    assert used.returncode == 2 and "nothing is overwritten" in used.stderr
    assert (tmp_path / "used" / "gpu_check.json").read_text() == "{}"


def test_gpu_check_smoke_on_cpu(tmp_path):
    import json
    out = tmp_path / "gc"
    proc = _gpu_check(["--smoke", "--methods", "linear", "--output-dir", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    md = (out / "gpu_check.md").read_text()
    assert report["device"] == "cpu" and report["mode"] == "smoke"
    assert set(report["kernels"]) == {"backbone self-attention", "final aggregation, flat (C tokens)",
                                      "final aggregation, D-CHAG (G tokens)", "CrossReduce, D-CHAG-C (C/G tokens)"}
    for entry in report["kernels"].values():
        assert entry["runs"]["math"] == "ok"  # the math kernel runs everywhere
    assert report["startup_s"]["use_cpu_initialization"] > 0
    (r,) = report["training"]
    assert r["method"] == "D-CHAG-L" and r["steps"] == 8 and all(math.isfinite(v) for v in r["losses"])
    assert r["loss_falls"] and r["model_tflops_per_gpu"] > 0 and r["planner_total_gib"] > 0
    assert "| D-CHAG-L |" in md and "## SDPA kernels" in md


# ----------------------------------------------------------------------------------------------
# flags: parsing and refusals (in-process)
# ----------------------------------------------------------------------------------------------


def test_flags_reach_the_model_config():
    from dchag.arguments import model_config, parse_args
    base = ["--img-h", "8", "--img-w", "8", "--patch-dim", "2", "--num-channels", "4", "--train-iters", "1"]
    cfg = model_config(parse_args(base))
    assert (cfg.attention_backend, cfg.transformer_impl, cfg.use_cpu_initialization) == ("auto", "local", None)
    cfg = model_config(parse_args(base + ["--attention-backend", "unfused", "--no-use-cpu-initialization"]))
    assert (cfg.attention_backend, cfg.use_cpu_initialization) == ("unfused", False)
    with pytest.raises(SystemExit):
        parse_args(base + ["--attention-backend", "flash"])


def test_refusals_name_the_fix(monkeypatch):
    from dchag.model.backbone import transformer_config
    from dchag.parallel.partition import LayoutError
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    with pytest.raises(LayoutError, match="GPU option"):
        transformer_config(tiny_config(use_cpu_initialization=False), 1)
    assert transformer_config(tiny_config(), 1).use_cpu_initialization is True
    import sys
    monkeypatch.setitem(sys.modules, "transformer_engine", None)  # not importable (as here)
    with pytest.raises(LayoutError, match="Transformer Engine.*--transformer-impl local"):
        tiny_config(transformer_impl="transformer_engine")
