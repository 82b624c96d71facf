"""The distributed model equals the serial one (DESIGN.md, Must hold #1).

One 4-rank job per case runs the serial model (T = P = 1) and then every layout with
T, P in {1, 2, 4}, P | T, P | G, loading the serial weights into each layout and comparing the
forward output and every parameter gradient (gathered to full tensors) with the serial ones.
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed import run_distributed
from tests.model_cases import layouts, perturb_, rel_err, setup_layout, tiny_config

TOLERANCE = 1e-5
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
    gen = torch.Generator().manual_seed(7)
    B, C = 2, cfg.num_channels
    images = torch.randn(B, C, cfg.img_h, cfg.img_w, generator=gen)
    mask = (torch.rand(B, cfg.num_patches, generator=gen) < 0.5) if cfg.task == "mae" else None
    lead = torch.tensor([1.0, 6.0]) if cfg.task == "forecast" else None
    n_out = C if cfg.task == "mae" else len(cfg.predicted_channels)
    weights = torch.randn(B, n_out, cfg.img_h, cfg.img_w, generator=gen)

    setup_layout(1, 1)
    serial = DChagViT(cfg)
    perturb_(serial, seed=11)
    ref_out, ref_loss = _forward_backward(serial, images, mask, lead, weights)
    ref_params = {n: p.detach().clone() for n, p in serial.named_parameters()}
    ref_grads = {n: p.grad.detach().clone() for n, p in serial.named_parameters()}

    results = {}
    for tp, cp in layouts(WORLD, cfg.num_groups):
        setup_layout(tp, cp)
        dist_cfg = tiny_config(**cfg_kwargs, sequence_parallel=sequence_parallel)
        model = DChagViT(dist_cfg)
        load_full_state_dict(model, ref_params)
        out, loss = _forward_backward(model, images[:, model.channels], mask, lead, weights)
        expected = ref_out[:, model.channels] if cfg.task == "mae" else ref_out
        grads = full_state_dict(model, grads=True)
        results[(tp, cp)] = {
            "out": rel_err(out, expected),
            "loss": rel_err(loss, ref_loss),
            "grads": {n: rel_err(grads[n], ref_grads[n]) for n in ref_grads},
            "missing": sorted(set(ref_grads) ^ set(grads)),
        }
    return results


CASES = {
    "flat": dict(aggregation="flat", num_channels=12),
    "linear": dict(aggregation="linear"),
    "cross": dict(aggregation="cross"),
    "linear-tree2": dict(aggregation="linear", tree_levels=2),
    "cross-tree2": dict(aggregation="cross", tree_levels=2),
    "linear-even-G8": dict(aggregation="linear", num_channels=16, groups=8),
    "cross-forecast": dict(aggregation="cross", task="forecast", out_channels=(0, 3, 5)),
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


def _check(results, expected_layouts):
    worst = 0.0
    for rank_results in results:
        assert sorted(rank_results) == sorted(expected_layouts)
        for layout, r in rank_results.items():
            assert not r["missing"], f"{layout}: parameter sets differ: {r['missing']}"
            assert r["out"] <= TOLERANCE, f"{layout}: output rel. error {r['out']:.2e}"
            assert r["loss"] <= TOLERANCE, f"{layout}: loss rel. error {r['loss']:.2e}"
            bad = {n: e for n, e in r["grads"].items() if e > TOLERANCE}
            assert not bad, f"{layout}: gradient rel. errors above {TOLERANCE}: {bad}"
            worst = max(worst, r["out"], r["loss"], *r["grads"].values())
    print(f"largest relative error: {worst:.3e} over layouts {sorted(expected_layouts)}")


@pytest.mark.parametrize("case", list(CASES))
def test_distributed_equals_serial(all_results, case):
    _check(all_results[(case, False)], layouts(WORLD, tiny_config(**CASES[case]).num_groups))


@pytest.mark.parametrize("case", SP_CASES)
def test_distributed_equals_serial_with_sequence_parallel(all_results, case):
    _check(all_results[(case, True)], layouts(WORLD, tiny_config(**CASES[case]).num_groups))
