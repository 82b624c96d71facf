"""The distributed model equals the serial one (DESIGN.md, Must hold #1).

One 4-rank job per case runs the serial model (T = P = 1) and then every layout with
T, P in {1, 2, 4}, P | T, P | G, loading the serial weights into each layout and comparing the
forward output and every parameter gradient (gathered to full tensors) with the serial ones.
Every D-CHAG case also runs streamed (--dchag-channel-chunk 3) on every layout, compared with the
serial model and, within 1e-6, with the unstreamed model of the same layout.
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed import run_distributed
from tests.model_cases import layouts, perturb_, random_batch, rel_err, setup_layout, tiny_config

TOLERANCE = 1e-5
STREAM_TOLERANCE = 1e-6  # streamed vs unstreamed on the same layout
STREAM_CHUNK = 3
WORLD = 4


def _forward_backward(model, images, mask, lead, weights):
    """A loss that depends on every output element: sum(out * weights), summed over the
    channel group for the channel-sharded MAE output."""
    from dchag.parallel.comm import reduce_from_channel_parallel_region
    out = model(images, patch_mask=mask, lead_time=lead)
    if model.cfg.task == "mae":
        loss = reduce_from_channel_parallel_region((out * weights[:, model.channels]).sum())
    else:
        loss = (out * weights).sum()
    loss.backward()
    return out.detach(), loss.detach()


def _equivalence_worker(cfg_kwargs, sequence_parallel):
    from dchag.model.vit import DChagViT
    from dchag.parallel.state_dict import full_state_dict, load_full_state_dict
    cfg = tiny_config(**cfg_kwargs)
    images, mask, lead, weights = random_batch(cfg)

    setup_layout(1, 1)
    serial = DChagViT(cfg)
    perturb_(serial, seed=11)
    ref_out, ref_loss = _forward_backward(serial, images, mask, lead, weights)
    ref_params = {n: p.detach().clone() for n, p in serial.named_parameters()}
    ref_grads = {n: p.grad.detach().clone() for n, p in serial.named_parameters()}

    def errors(out, loss, grads, ref_out, ref_loss, ref_grads):
        return {"out": rel_err(out, ref_out), "loss": rel_err(loss, ref_loss),
                "grads": {n: rel_err(grads[n], ref_grads[n]) for n in ref_grads},
                "missing": sorted(set(ref_grads) ^ set(grads))}

    # The streamed channel stage (--dchag-channel-chunk) on every layout too: K = 3 cuts the
    # uneven groups (4, 3, 3, 3 channels) and the rank's channel slices mid-segment.
    chunks = (0,) if cfg.aggregation == "flat" else (0, STREAM_CHUNK)
    results = {}
    for tp, cp in layouts(WORLD, cfg.num_groups):
        setup_layout(tp, cp)
        runs = {}
        for chunk in chunks:
            model = DChagViT(tiny_config(**cfg_kwargs, sequence_parallel=sequence_parallel, channel_chunk=chunk))
            load_full_state_dict(model, ref_params)
            out, loss = _forward_backward(model, images[:, model.channels], mask, lead, weights)
            runs[chunk] = (out, loss, full_state_dict(model, grads=True))
        expected = ref_out[:, model.channels] if cfg.task == "mae" else ref_out
        results[(tp, cp)] = errors(*runs[0], expected, ref_loss, ref_grads)
        if STREAM_CHUNK in runs:
            # against the serial model, and against the unstreamed model of the same layout
            results[(tp, cp)]["streamed"] = errors(*runs[STREAM_CHUNK], expected, ref_loss, ref_grads)
            results[(tp, cp)]["streamed_vs_unstreamed"] = errors(*runs[STREAM_CHUNK], *runs[0])
    return results


CASES = {
    "flat": dict(aggregation="flat", num_channels=12),
    "linear": dict(aggregation="linear"),
    "cross": dict(aggregation="cross"),
    "linear-tree2": dict(aggregation="linear", tree_levels=2),
    "cross-tree2": dict(aggregation="cross", tree_levels=2),
    "linear-even-G8": dict(aggregation="linear", num_channels=16, groups=8),
    "cross-forecast": dict(aggregation="cross", task="forecast", out_channels=(0, 3, 5)),
    "cross-noproj-tree2": dict(aggregation="cross", cross_projections="none", tree_levels=2),
    "linear-groupnorm": dict(aggregation="linear", group_norm="layernorm"),
}


SP_CASES = ("linear", "cross-tree2")


def _all_cases_worker():
    """All cases in one 4-rank job (process start-up dominates the cost of a case)."""
    out = {(name, False): _equivalence_worker(kwargs, False) for name, kwargs in CASES.items()}
    out.update({(name, True): _equivalence_worker(CASES[name], True) for name in SP_CASES})
    return out


@pytest.fixture(scope="module")
def all_results():
    per_rank = run_distributed(_all_cases_worker, WORLD)
    return {key: [rank[key] for rank in per_rank] for key in per_rank[0]}


def _check_errors(r, what, tolerance) -> float:
    assert not r["missing"], f"{what}: parameter sets differ: {r['missing']}"
    assert r["out"] <= tolerance, f"{what}: output rel. error {r['out']:.2e}"
    assert r["loss"] <= tolerance, f"{what}: loss rel. error {r['loss']:.2e}"
    bad = {n: e for n, e in r["grads"].items() if e > tolerance}
    assert not bad, f"{what}: gradient rel. errors above {tolerance}: {bad}"
    return max(r["out"], r["loss"], *r["grads"].values())


def _check(results, expected_layouts, streamed: bool):
    worst = worst_streamed = 0.0
    for rank_results in results:
        assert sorted(rank_results) == sorted(expected_layouts)
        for layout, r in rank_results.items():
            worst = max(worst, _check_errors(r, f"{layout}", TOLERANCE))
            assert ("streamed" in r) == streamed
            if streamed:
                worst = max(worst, _check_errors(r["streamed"], f"{layout} streamed K={STREAM_CHUNK}", TOLERANCE))
                worst_streamed = max(worst_streamed, _check_errors(
                    r["streamed_vs_unstreamed"], f"{layout} streamed vs unstreamed", STREAM_TOLERANCE))
    print(f"largest relative error: {worst:.3e} over layouts {sorted(expected_layouts)}"
          + (f"; streamed vs unstreamed {worst_streamed:.3e}" if streamed else ""))


@pytest.mark.parametrize("case", list(CASES))
def test_distributed_equals_serial(all_results, case):
    cfg = tiny_config(**CASES[case])
    _check(all_results[(case, False)], layouts(WORLD, cfg.num_groups), streamed=cfg.aggregation != "flat")


@pytest.mark.parametrize("case", SP_CASES)
def test_distributed_equals_serial_with_sequence_parallel(all_results, case):
    _check(all_results[(case, True)], layouts(WORLD, tiny_config(**CASES[case]).num_groups), streamed=True)
