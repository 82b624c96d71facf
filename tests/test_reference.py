"""DChagViT at T = P = 1 against the independent reference (tests/reference_model.py), in float64.

The equivalence suite (tests/test_equivalence.py) ties every layout to T = P = 1; this file ties
T = P = 1 to something that shares no code with it, so a bug present in every layout is seen.
Each case compares the output, the loss and every parameter's gradient. Also here: properties
any correct masked autoencoder has, and which parameters take weight decay.
"""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch

from tests.distributed import run_distributed
from tests.model_cases import perturb_, rel_err, setup_layout, tiny_config
from tests.reference_model import (ReferenceConfig, ReferenceDChag, latitude_weights, reference_forecast_loss,
                                   reference_mae_loss)

TOLERANCE = 1e-10  # float64 throughout; observed errors are ~1e-15 (see the note in the worker's output)

WAVELENGTHS = tuple(None if c == 5 else 400.0 + 37.5 * c for c in range(13))  # nm; channel 5 has none
CASES = {
    "flat": dict(aggregation="flat"),
    "linear": dict(aggregation="linear"),
    "cross": dict(aggregation="cross"),
    "linear-tree2": dict(aggregation="linear", tree_levels=2),
    "cross-tree2": dict(aggregation="cross", tree_levels=2),
    # k = 3 needs groups of >= 4 channels: 13 channels over 2 groups (7, 6), sub-groups (2,2,2,1), (2,2,1,1).
    "linear-tree3": dict(aggregation="linear", groups=2, tree_levels=3),
    "cross-tree3": dict(aggregation="cross", groups=2, tree_levels=3),
    "flat-forecast": dict(aggregation="flat", task="forecast", out_channels=(0, 3, 5)),
    "linear-forecast": dict(aggregation="linear", task="forecast", out_channels=(0, 3, 5)),
    "cross-tree2-forecast": dict(aggregation="cross", tree_levels=2, task="forecast", out_channels=(1, 12)),
    # The streamed channel stage (--dchag-channel-chunk 3: chunks that cut groups and sub-groups)
    # against the same, unstreamed reference: its online softmax and chunk merges in float64.
    "linear-streamed": dict(aggregation="linear", channel_chunk=3),
    "cross-streamed": dict(aggregation="cross", channel_chunk=3),
    "cross-tree3-streamed": dict(aggregation="cross", groups=2, tree_levels=3, channel_chunk=3),
    # --channel-embedding wavelength (a channel without a wavelength included), unstreamed and streamed.
    "linear-wavelength": dict(aggregation="linear", channel_embedding="wavelength", wavelengths=WAVELENGTHS),
    # D-CHAG-C without projections (--dchag-cross-projections none), a tree, unstreamed and streamed.
    "cross-noproj-tree2": dict(aggregation="cross", cross_projections="none", tree_levels=2),
    "cross-noproj-streamed": dict(aggregation="cross", cross_projections="none", channel_chunk=3),
    # --dchag-group-norm layernorm after the (streamed) linear stage and after a cross tree.
    "linear-groupnorm-streamed": dict(aggregation="linear", group_norm="layernorm", channel_chunk=3),
    "cross-tree2-groupnorm": dict(aggregation="cross", tree_levels=2, group_norm="layernorm"),
    "cross-streamed-wavelength": dict(aggregation="cross", channel_chunk=3, channel_embedding="wavelength",
                                      wavelengths=WAVELENGTHS),
}


def reference_config(cfg) -> ReferenceConfig:
    return ReferenceConfig(num_channels=cfg.num_channels, img_h=cfg.img_h, img_w=cfg.img_w, patch=cfg.patch_dim,
                           dim=cfg.hidden_size, depth=cfg.num_layers, heads=cfg.num_attention_heads,
                           mlp_dim=cfg.ffn_size, aggregation=cfg.aggregation, groups=cfg.num_groups,
                           tree_levels=cfg.tree_levels, task=cfg.task, out_vars=cfg.predicted_channels,
                           eps=cfg.layernorm_epsilon,
                           wavelengths=cfg.wavelengths if cfg.channel_embedding == "wavelength" else None,
                           cross_projections=cfg.cross_projections, group_norm=cfg.group_norm)


def _batch(cfg, gen):
    """A float64 batch with invalid pixels (zero-filled, as forward_step does) and a 50 % mask."""
    B, C = 2, cfg.num_channels
    images = torch.randn(B, C, cfg.img_h, cfg.img_w, generator=gen, dtype=torch.float64)
    valid = torch.rand(B, C, cfg.img_h, cfg.img_w, generator=gen) > 0.1
    images = torch.where(valid, images, torch.zeros_like(images))
    mask = torch.rand(B, cfg.num_patches, generator=gen) < 0.5
    V = len(cfg.predicted_channels)
    target = torch.randn(B, V, cfg.img_h, cfg.img_w, generator=gen, dtype=torch.float64)
    target_valid = torch.rand(B, V, cfg.img_h, cfg.img_w, generator=gen) > 0.1
    lats = torch.linspace(-70.0, 70.0, cfg.img_h, dtype=torch.float64)
    lat_weights = latitude_weights(lats)[None].repeat(B, 1)
    lead = torch.tensor([6.0, 24.0], dtype=torch.float64)
    return dict(images=images, valid=valid, mask=mask, target=target, target_valid=target_valid,
                lat_weights=lat_weights, lead=lead)


def _compare_case(kwargs) -> dict:
    from dchag.model.vit import DChagViT
    from dchag.tasks import forecast_loss, mae_loss
    cfg = tiny_config(**kwargs)
    setup_layout(1, 1)
    model = DChagViT(cfg)
    perturb_(model, seed=11)  # non-trivial biases, mask token, proj_bias, ...
    model.double()
    b = _batch(cfg, torch.Generator().manual_seed(5))

    if cfg.task == "mae":
        out = model(b["images"], patch_mask=b["mask"])
        loss = mae_loss(out, b["images"], b["valid"], b["mask"], cfg.grid, cfg.patch_dim)
    else:
        out = model(b["images"], lead_time=b["lead"])
        loss = forecast_loss(out, b["target"], b["target_valid"], b["lat_weights"])
    loss.backward()

    ref = ReferenceDChag(reference_config(cfg))
    ref.load(dict(model.named_parameters()))
    if cfg.task == "mae":
        ref_out = ref(b["images"], patch_mask=b["mask"])
        ref_loss = reference_mae_loss(ref_out, b["images"], b["valid"], b["mask"], cfg.patch_dim)
    else:
        ref_out = ref(b["images"], lead_time=b["lead"])
        ref_loss = reference_forecast_loss(ref_out, b["target"], b["target_valid"], b["lat_weights"])
    ref_loss.backward()
    ref_grads = ref.grads_by_dchag_name()
    grads = {n: p.grad for n, p in model.named_parameters()}
    return {
        "dtypes": sorted({str(out.dtype), str(loss.dtype)}),
        "unmapped": sorted(set(grads) ^ set(ref_grads)),
        "out": rel_err(out, ref_out),
        "loss": rel_err(loss, ref_loss),
        "grads": {n: rel_err(grads[n], ref_grads[n]) for n in grads if n in ref_grads},
        "grad_norms": {n: float(ref_grads[n].norm()) for n in ref_grads},
    }


def _mae_properties() -> dict:
    """Properties that hold for any correct MAE (float32, as trained)."""
    from dchag.model.vit import DChagViT
    from dchag.tasks import mae_loss
    out = {}
    for agg in ("flat", "linear", "cross"):
        cfg = tiny_config(aggregation=agg)
        setup_layout(1, 1)
        model = DChagViT(cfg)
        gen = torch.Generator().manual_seed(3)
        images = torch.randn(2, cfg.num_channels, cfg.img_h, cfg.img_w, generator=gen)
        mask = torch.rand(2, cfg.num_patches, generator=gen) < 0.6
        with torch.no_grad():
            pred = model(images, patch_mask=mask)  # [B, C, H, W]
        p = cfg.patch_dim
        patches = pred.reshape(2, cfg.num_channels, cfg.grid[0], p, cfg.grid[1], p).permute(0, 2, 4, 1, 3, 5)
        patches = patches.reshape(2, cfg.num_patches, -1)  # [B, L, C*p*p]
        # The smallest distance between the predictions of two masked patches of one sample:
        # 0 if masked tokens carried no position (every masked patch predicted alike).
        closest = min(torch.pdist(patches[b][mask[b]]).min().item() for b in range(2))
        out[agg] = {"closest_masked_pair": closest, "scale": patches.std().item()}

    # The loss sees only masked, valid target pixels.
    cfg = tiny_config()
    gen = torch.Generator().manual_seed(4)
    shape = (2, cfg.num_channels, cfg.img_h, cfg.img_w)
    pred, images = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    valid = torch.rand(shape, generator=gen) > 0.2
    mask = torch.rand(2, cfg.num_patches, generator=gen) < 0.5
    from dchag.tasks.mae import pixel_mask
    hidden = pixel_mask(mask, cfg.grid, cfg.patch_dim).expand(shape)
    noise = 10 * torch.randn(shape, generator=gen)

    def loss_with(changed_where):
        return mae_loss(pred, torch.where(changed_where, images + noise, images), valid, mask, cfg.grid,
                        cfg.patch_dim).item()
    base = loss_with(torch.zeros(shape, dtype=torch.bool))
    out["loss"] = {"base": base, "unmasked_changed": loss_with(~hidden), "invalid_changed": loss_with(~valid),
                   "masked_valid_changed": loss_with(hidden & valid)}
    return out


def _forward_step_ignores_invalid_inputs() -> dict:
    """pretrain_dchag.forward_step: the values behind invalid pixels never reach the loss."""
    import pretrain_dchag
    from dchag.model.vit import DChagViT
    setup_layout(1, 1)
    out = {}
    for task in ("mae", "forecast"):
        cfg = tiny_config(task=task, out_channels=(0, 2) if task == "forecast" else None)
        model = DChagViT(cfg)
        b = _batch(cfg, torch.Generator().manual_seed(6))
        batch = {"images": b["images"].float(), "valid": b["valid"], "index": torch.tensor([3, 8]),
                 "target": b["target"].float(), "target_valid": b["target_valid"],
                 "lat_weights": b["lat_weights"].float()}
        args = SimpleNamespace(task=task, mask_ratio=0.5, seed=1, lead_time=6)
        garbage = dict(batch, images=torch.where(batch["valid"], batch["images"], torch.full_like(batch["images"], 1e6)),
                       target=torch.where(batch["target_valid"], batch["target"], torch.full_like(batch["target"], -1e6)))
        with torch.no_grad():
            out[task] = (pretrain_dchag.forward_step(model, batch, args, cfg, 2).item(),
                         pretrain_dchag.forward_step(model, garbage, args, cfg, 2).item())
    return out


def _decayed_parameters() -> dict:
    from dchag.model.vit import DChagViT
    from dchag.training.loop import _build_optimizer
    setup_layout(1, 1)
    args = SimpleNamespace(weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8, dchag_partial_lr_mult=0.5)
    out = {}
    for name, kwargs in (("cross-tree2", dict(aggregation="cross", tree_levels=2)),
                         ("linear-forecast", dict(aggregation="linear", task="forecast")),
                         ("linear-tree2-size", dict(aggregation="linear", tree_levels=2))):
        model = DChagViT(tiny_config(**kwargs))
        opt = _build_optimizer(model, SimpleNamespace(**vars(args), dchag_coefficient_lr_scale=name.split("-")[-1]))
        names = {id(p): n for n, p in model.named_parameters()}
        by_decay, by_lr_mult = {}, {}
        for g in opt.param_groups:
            by_decay.setdefault(g["weight_decay"], []).extend(names[id(p)] for p in g["params"])
            by_lr_mult.setdefault(g["lr_mult"], []).extend(names[id(p)] for p in g["params"])
        out[name] = {"decay": by_decay, "lr_mult": by_lr_mult}
    return out


def _init_properties() -> dict:
    """At initialization every aggregation is the (projected) mean of its tokens, and the image
    is a visible part of the backbone's input beside the position embedding (docs/PARITY.md, "Init")."""
    from dchag.model.vit import DChagViT
    setup_layout(1, 1)
    out = {}
    for name, kwargs in (("flat", dict(aggregation="flat")), ("linear", dict(aggregation="linear")),
                         ("cross", dict(aggregation="cross")), ("cross-tree2", dict(aggregation="cross", tree_levels=2)),
                         ("cross-noproj", dict(aggregation="cross", cross_projections="none"))):
        cfg = tiny_config(**kwargs)
        model = DChagViT(cfg)
        images = torch.randn(8, cfg.num_channels, cfg.img_h, cfg.img_w, generator=torch.Generator().manual_seed(9))
        with torch.no_grad():
            tokens = model.tokenizer(images)  # [B, C, L, D]
            # The mean the aggregation should reduce to, level by level, written out from the parameters.
            x = tokens
            for level in getattr(model.partial, "levels", []):
                m = torch.stack([s.mean(1) for s in x.split(list(level.level.sizes), dim=1)], 1)  # [B, n, L, D]
                if hasattr(level, "value"):
                    m = torch.einsum("bnld,nde->bnle", torch.einsum("bnld,nde->bnle", m, level.value), level.proj)
                    m = m + level.proj_bias[None, :, None, :]
                x = m
            kv = model.final.kv(x.mean(1).reshape(-1, cfg.hidden_size)[None])[0]  # [1, B L, 2D], heads [H, 2, hd]
            v = kv.reshape(-1, cfg.num_attention_heads, 2, cfg.hidden_size // cfg.num_attention_heads)[:, :, 1]
            expected = model.final.proj(v.reshape(1, -1, cfg.hidden_size))[0].reshape(8, cfg.num_patches, -1)
            content = model.aggregate_channels(images)
            dev = content - content.mean(0, keepdim=True)  # the image-dependent part
        out[name] = {"mean_err": rel_err(content, expected),
                     "content_over_pos": (dev.pow(2).mean().sqrt() / model.pos_embed.detach().pow(2).mean().sqrt()).item()}
    # With equal groups (and sub-groups) the mean of group means is the mean of all channels: every method starts
    # as exactly flat's function (the same tokenizer and final aggregation draws, the partial
    # stage the plain mean), so any gap to flat comes from training (docs/PARITY.md, "Init").
    images = torch.randn(4, 16, 8, 8, generator=torch.Generator().manual_seed(5))  # 4 groups of 4 (tree: 2 + 2)
    content = {}
    for name, kwargs in (("flat", dict(aggregation="flat")), ("linear", dict(aggregation="linear")),
                         ("cross", dict(aggregation="cross")), ("cross-tree2", dict(aggregation="cross", tree_levels=2)),
                         ("cross-noproj", dict(aggregation="cross", cross_projections="none"))):
        setup_layout(1, 1)  # the same seed for every model, as every run of a study gets
        with torch.no_grad():
            content[name] = DChagViT(tiny_config(num_channels=16, groups=4, **kwargs)).aggregate_channels(images)
    for name in out:
        out[name]["err_to_flat"] = rel_err(content[name], content["flat"])
    return out


def _worker():
    return {"cases": {name: _compare_case(kwargs) for name, kwargs in CASES.items()},
            "properties": _mae_properties(), "forward_step": _forward_step_ignores_invalid_inputs(),
            "decay": _decayed_parameters(), "init": _init_properties()}


@pytest.fixture(scope="module")
def results():
    return run_distributed(_worker, 1)[0]


@pytest.mark.parametrize("case", list(CASES))
def test_serial_model_equals_independent_reference(results, case):
    r = results["cases"][case]
    assert r["dtypes"] == ["torch.float64"], "the comparison must run in float64 end to end"
    assert not r["unmapped"], f"parameters without a counterpart in the reference: {r['unmapped']}"
    assert r["out"] <= TOLERANCE, f"output rel. error {r['out']:.2e}"
    assert r["loss"] <= TOLERANCE, f"loss rel. error {r['loss']:.2e}"
    dead = [n for n, v in r["grad_norms"].items() if v == 0.0]
    assert not dead, f"parameters with an all-zero reference gradient (the comparison would be vacuous): {dead}"
    bad = {n: f"{e:.2e}" for n, e in r["grads"].items() if e > TOLERANCE}
    assert not bad, f"gradient rel. errors above {TOLERANCE}: {bad}"
    print(f"{case}: largest relative error {max(r['out'], r['loss'], *r['grads'].values()):.2e}")


@pytest.mark.parametrize("agg", ["flat", "linear", "cross"])
def test_masked_patches_get_different_predictions(results, agg):
    r = results["properties"][agg]
    assert r["closest_masked_pair"] > 1e-4 * r["scale"], r


def test_mae_loss_sees_only_masked_valid_targets(results):
    r = results["properties"]["loss"]
    assert r["unmasked_changed"] == r["base"]
    assert r["invalid_changed"] == r["base"]
    assert r["masked_valid_changed"] != r["base"], "changing scored pixels must change the loss"


@pytest.mark.parametrize("task", ["mae", "forecast"])
def test_forward_step_ignores_values_behind_invalid_pixels(results, task):
    clean, garbage = results["forward_step"][task]
    assert clean == garbage


# Weight matrices of linear maps (and stacks of them) decay; nothing else does.
DECAYED = re.compile(r"^(tokenizer\.weight|partial\.levels\.\d+\.(key|value|proj)|final\.(kv|proj)\.weight"
                     r"|backbone\.layers\.\d+\.(self_attention\.linear_(qkv|proj)|mlp\.linear_fc[12])\.weight"
                     r"|head\.weight|head\.linear\.weight|lead_time_embed\.weight)$")


@pytest.mark.parametrize("agg", ["flat", "linear", "cross", "cross-tree2", "cross-noproj"])
def test_untrained_aggregation_is_the_mean_and_the_image_is_visible(results, agg):
    """Zero queries: uniform attention, so the channel stage starts as the projected mean of the
    tokens (as LinearReduce starts from the group mean). Unit-gain final projections: the image
    part of the backbone's input is a sizeable fraction of the position embedding (megatron's
    residual-branch init made it ~0.4 % and left models on the MAE plateau, docs/PARITY.md)."""
    r = results["init"][agg]
    assert r["mean_err"] < 1e-5, r
    assert r["content_over_pos"] > 0.1, r


@pytest.mark.parametrize("agg", ["linear", "cross", "cross-tree2", "cross-noproj"])
def test_untrained_dchag_is_flats_function(results, agg):
    """Equal groups: D-CHAG-L and D-CHAG-C start as exactly the flat model (D-CHAG-L: the group mean;
    D-CHAG-C: zero query, identity value and output projections in CrossReduce). Fails with random
    partial projections."""
    assert results["init"][agg]["err_to_flat"] < 1e-6, results["init"][agg]


@pytest.mark.parametrize("case", ["cross-tree2", "linear-forecast"])
def test_weight_decay_only_for_weight_matrices(results, case):
    groups = results["decay"][case]["decay"]
    assert groups[0.0] and groups[0.1]
    assert [n for n in groups[0.1] if not DECAYED.match(n)] == []
    assert [n for n in groups[0.0] if DECAYED.match(n)] == []
    for role in ("pos_embed", "tokenizer.channel_embed", "tokenizer.bias", "final.query",
                 "backbone.final_layernorm.weight"):
        assert role in groups[0.0]


@pytest.mark.parametrize("case", ["cross-tree2", "linear-forecast"])
def test_partial_lr_mult_reaches_exactly_the_partial_stage(results, case):
    """--dchag-partial-lr-mult 0.5 puts every partial-aggregation parameter (all tree levels), and
    nothing else, in groups with lr_mult 0.5."""
    groups = results["decay"][case]["lr_mult"]
    assert sorted(groups) == [0.5, 1.0]
    assert groups[0.5] and all(n.startswith("partial.") for n in groups[0.5])
    assert not [n for n in groups[1.0] if n.startswith("partial.")]
    if case == "cross-tree2":
        assert {n.split(".")[2] for n in groups[0.5]} == {"0", "1"}  # both levels of the tree


def test_coefficient_lr_scale_is_one_over_the_segment_size(results):
    """--dchag-coefficient-lr-scale size (13 channels, G = 4, k = 2: 8 sub-groups of 13/8 channels,
    then pairs): level 1's coefficients at 8/13, level 2's at 1/2, times --dchag-partial-lr-mult 0.5;
    nothing else moves."""
    groups = results["decay"]["linear-tree2-size"]["lr_mult"]
    assert sorted(groups) == pytest.approx(sorted([0.5 * 8 / 13, 0.25, 1.0]))
    by_name = {n: m for m, names in groups.items() for n in names}
    assert by_name["partial.levels.0.weight"] == pytest.approx(0.5 * 8 / 13)
    assert by_name["partial.levels.1.weight"] == pytest.approx(0.25)
    assert all(m == 1.0 for n, m in by_name.items() if not n.startswith("partial."))
