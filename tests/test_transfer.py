"""Fine-tuning a pretrained model onto another channel set, tile size and task (dchag/transfer).

Pure functions, in the pytest process: channel matching (name, then wavelength, interpolation,
generated names, an unknown channel), its refusals (a name contradicting its wavelength, wavelengths in
micrometres or angstrom), the group rule (fewer channels than G; a subset keeps whole groups), the
per-row plan, the start-up table, the architecture defaults and conflicts, the position-embedding
interpolation against a bicubic written out in numpy, the wavelength embedding against numpy. One
1-rank model check: a subset of whole groups starts as the pretrained computation.

One job on 2 gloo ranks through the real entry point (pretrain_dchag.py's providers):

* pretrain a tiny D-CHAG-L MAE (16 synthetic bands, 400-900 nm, G = 4, 8 x 8 tiles) at T = P = 2,
  export it (tools/convert_checkpoint.py's consolidated export);
* fine-tune onto 3 bands (400, 650, 900 nm: one interpolated), 12 x 12 tiles, the forecast task:
  a frozen encoder (--freeze-encoder) through 3 iterations, each rank's shards compared with what
  its first forward saw, then its checkpoint exported (ZeRO 1 keeps the frozen encoder only in the
  model-states files) and forecasting in a plain process; T = P = 2 and T = P = 1 from the export
  (the T = P = 1 run's transferred weights checked against the export with numpy), T = P = 1 from the
  DeepSpeed folder, the same first losses; a resume with --load continues the fine-tune exactly; a
  foreign checkpoint refused;
* fine-tune onto the dense tasks (regress, segment) on the pretraining's own bands and tiles at
  T = P = 1: the encoder arrives bit-equal to the export, the dense head is new, the MAE head dropped;
* LoRA (rank 2, dropout 0.1, every target) at T = P = 2: what changes and what the optimizer holds; its
  checkpoint made universal and continued at T = P = 1; exported merged, apart and merged back, against
  the unmerged model, in a plain process.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.distributed import run_distributed
from tests.test_training import REPO, _ds, _refused

PRE_BANDS, FT_BANDS = 16, 3
COMMON = ["--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "1e-3", "--lr-warmup-iters", "1",
          "--seed", "1234", "--log-interval", "1000"]
PRETRAIN = ["--task", "mae", "--data-path", "synthetic:num_images=24", "--num-channels", str(PRE_BANDS),
            "--img-h", "8", "--img-w", "8", "--patch-dim", "2", "--mask-ratio", "0.5", "--num-layers", "1",
            "--hidden-size", "16", "--num-attention-heads", "2", "--ffn-hidden-size", "32",
            "--dchag-aggregation", "linear", "--dchag-groups", "4", "--tensor-model-parallel-size", "2",
            "--channel-parallel-size", "2", "--train-iters", "2"] + COMMON
# The architecture flags are left out: they come from the pretrained model.
FINETUNE = ["--task", "forecast", "--data-path", "synthetic:num_images=24", "--num-channels", str(FT_BANDS),
            "--img-h", "12", "--img-w", "12", "--patch-dim", "2"] + COMMON
# The pretraining's own bands and tiles, the generator's abundances (regress: 4 maps) or their argmax.
DENSE = ["--data-path", "synthetic:num_images=24", "--num-channels", str(PRE_BANDS), "--target-path", "synthetic",
         "--img-h", "8", "--img-w", "8", "--patch-dim", "2"] + COMMON
DENSE_TASKS = {"regress": [], "segment": ["--num-classes", "4"]}
LORA = ["--lora-rank", "2", "--lora-alpha", "4", "--lora-dropout", "0.1", "--lora-targets",
        "qkv,proj,fc1,fc2,final.kv,final.proj"]
TP2, TP1 = ["--tensor-model-parallel-size", "2", "--channel-parallel-size", "2"], \
    ["--tensor-model-parallel-size", "1", "--channel-parallel-size", "1"]


# ----------------------------------------------------------------------------------------------
# pure functions
# ----------------------------------------------------------------------------------------------


def _cfg(names, wavelengths, groups=1, **kw):
    from dchag.model.config import DChagConfig
    kw = {"hidden_size": 8, "num_attention_heads": 2, **kw}
    return DChagConfig(num_channels=len(names), img_h=8, img_w=8, patch_dim=2, groups=groups, channel_names=names,
                       wavelengths=wavelengths, **kw)


def test_channels_match_by_name_then_wavelength():
    from dchag.transfer.channels import match_channels
    pre = _cfg(["B02", "B03", "B04", "B08", "ch004", "2190.00nm"], [490.0, 560.0, 665.0, 842.0, 1610.0, 2190.0])
    new = _cfg(["B04", "ch001", "600.00nm", "water", "X", "B02", "ch004", "B99"],
               [None, 560.0005, 600.0, None, 2500.0, 505.0, None, 2190.0])
    got = [(m.kind, [(i, round(w, 12)) for i, w in m.sources]) for m in match_channels(pre, new)]
    t = (600.0 - 560.0) / (665.0 - 560.0)
    assert got == [
        ("name", [(2, 1.0)]),  # B04, by name (no wavelength needed)
        ("wavelength", [(1, 1.0)]),  # generated name; 560.0005 nm is 560 nm within 1e-3 nm
        ("interpolated", [(1, round(1 - t, 12)), (2, round(t, 12))]),  # between 560 and 665 nm
        ("new", []),  # an unknown name and no wavelength
        ("new", []),  # 2500 nm: beyond the pretrained range
        ("name", [(0, 1.0)]),  # B02 at 505 nm: 15 nm from the pretrained 490, within 20 nm: the name
        ("new", []),  # "ch004" is generated: it never matches by name
        ("wavelength", [(5, 1.0)]),  # an unknown name, an exact wavelength
    ]
    # The pretrained model's own channel list (a new task on the same data): every channel is itself,
    # generated names included.
    unnamed = _cfg(["ch000", "ch001", "ch002"], None)
    assert [(m.kind, m.sources) for m in match_channels(unnamed, unnamed)] == [("same", ((c, 1.0),)) for c in range(3)]
    assert [m.kind for m in match_channels(unnamed, _cfg(["ch000", "ch001"], None))] == ["new", "new"]


def test_a_name_contradicting_its_wavelength_is_refused_unless_chosen():
    """'B05' at 865 nm against the pretrained 'B05' at 705 nm (160 nm apart, more than 20 nm): refused,
    naming both; --match-channels name takes the name, wavelength the wavelength (865 nm interpolated
    between 842 and 945 nm). The same check guards prediction (match_to) and blends (union_of), where
    a known band width replaces the 20 nm."""
    from dchag.data.errors import DataError
    from dchag.data.identity import ChannelId, channel_ids, match_to, union_of
    from dchag.transfer import FinetuneError
    from dchag.transfer.channels import match_channels
    pre = _cfg(["B05", "B08", "B09"], [705.0, 842.0, 945.0])
    new = _cfg(["B05"], [865.0])
    with pytest.raises(FinetuneError) as e:
        match_channels(pre, new)
    for part in ("'B05' at 865 nm (this run's data)", "'B05' at 705 nm (the pretrained model)", "160 nm away",
                 "--match-channels name", "--match-channels wavelength"):
        assert part in str(e.value), str(e.value)
    assert [(m.kind, m.sources) for m in match_channels(pre, new, "name")] == [("name", ((0, 1.0),))]
    t = (865.0 - 842.0) / (945.0 - 842.0)
    [m] = match_channels(pre, new, "wavelength")
    assert m.kind == "interpolated" and [i for i, _ in m.sources] == [1, 2] and abs(m.sources[1][1] - t) < 1e-12
    model, given = channel_ids(["B05", "B08"], [705.0, 842.0]), channel_ids(["B08", "B05"], [842.0, 715.0])
    assert match_to(model, given)[0] == [1, 0]  # 10 nm apart: within 20 nm, the same band
    given = [ChannelId("B08", 842.0), ChannelId("B05", 715.0, width=5.0)]  # a known width is the limit
    with pytest.raises(DataError, match="'B05' at 705 nm \\(the model\\).*'B05' at 715 nm \\(the input\\).*the bands' "
                                        "width, 5 nm"):
        match_to(model, given)
    assert match_to(model, given, prefer="wavelength")[0] == [None, 0]
    with pytest.raises(DataError, match="'B05' at 865 nm \\(source 1\\)"):
        union_of([model, channel_ids(["B05"], [865.0])])
    assert union_of([model, channel_ids(["B05"], [865.0])], prefer="name")[1] == [(0, 1), (0,)]


@pytest.mark.parametrize("wavelengths, unit", [([0.443, 0.49, 2.19], "micrometres: multiply them by 1,000"),
                                               ([4430.0, 4900.0, 21900.0], "ångström: divide them by 10"),
                                               ([0.5, 490.0, 665.0], "a mix of units")])
def test_wavelengths_in_another_unit_are_refused_naming_it(wavelengths, unit):
    from dchag.data.errors import DataError
    from dchag.data.identity import channel_ids, match_to
    from dchag.transfer import FinetuneError
    from dchag.transfer.channels import match_channels
    with pytest.raises(DataError, match=unit):
        channel_ids(["a", "b", "c"], wavelengths, where="s2.npy")
    with pytest.raises(DataError, match=f"the input: wavelengths .* {unit}"):
        match_to(channel_ids(None, [500.0]), _ids_unchecked(wavelengths))
    with pytest.raises(FinetuneError, match=f"this run's data: .*{unit}"):
        match_channels(_cfg(["x", "y"], [400.0, 900.0]), _cfg(["a", "b", "c"], wavelengths))
    assert channel_ids(None, [100.0, 12_500.0])[1].wavelength == 12_500.0  # far UV to thermal IR: nm


def _ids_unchecked(wavelengths):
    from dchag.data.identity import ChannelId
    return [ChannelId(None, w) for w in wavelengths]


def test_groups_by_count_with_fewer_channels_than_g():
    from dchag.transfer.architecture import resolve_groups
    pre = _cfg([f"ch{c:03d}" for c in range(16)], list(np.linspace(400, 900, 16)), groups=4, aggregation="linear")

    def groups(C, P, given=frozenset(), g=1):
        args = argparse.Namespace(num_channels=C, channel_parallel_size=P, given=given, dchag_groups=g)
        resolve_groups(args, pre)
        return args.dchag_groups
    assert groups(5, 2) == 4  # at least G channels: the pretrained G
    assert groups(3, 2) == 2  # fewer than G: the largest multiple of P not above C
    assert groups(3, 1) == 3
    assert groups(2, 2) == 2
    assert groups(3, 2, given=frozenset({"dchag_groups"}), g=3) == 3  # given: used as is


def test_a_subset_of_the_pretrained_channels_keeps_its_groups_whole():
    """16 pretrained bands in G = 4 groups of 4: a subset (matched by name or wavelength) takes the G
    that keeps the most pretrained groups whole (was: the pretrained G, groups of 2 for 8 bands)."""
    from dchag.transfer.architecture import resolve_groups
    names, lams = [f"b{c:02d}" for c in range(16)], [400.0 + 20 * c for c in range(16)]
    pre = _cfg(names, lams, groups=4, aggregation="linear")

    def groups(pick, P=1, by_name=True):
        args = argparse.Namespace(num_channels=len(pick), channel_parallel_size=P, given=frozenset(), dchag_groups=1,
                                  channel_names=[names[c] if by_name else f"ch{i:03d}" for i, c in enumerate(pick)],
                                  wavelengths=[lams[c] for c in pick])
        resolve_groups(args, pre)
        return args.dchag_groups
    assert groups(range(8)) == 2 and groups(range(8), P=2) == 2  # groups 0, 1 whole
    assert groups(range(4, 12), by_name=False) == 2  # groups 1, 2, matched by wavelength
    assert groups([0, 1, 2, 3, 8, 9, 10, 11]) == 2  # groups 0 and 2
    assert groups(range(12)) == 3 and groups(range(12), P=2) == 4  # P = 2: no even G keeps a group: the rule before
    assert groups(range(7)) == 2  # group 0 whole, the rest one group of 3
    assert groups(range(16)) == 4  # the pretrained channels themselves


def _subset_forward_worker(aggregations):
    return {a: _subset_forward(a) for a in aggregations}


def _subset_forward(aggregation):
    """A pretrained model (16 bands, G = 4) and its fine-tune on 8 of its bands (groups 0 and 2 whole,
    G from the default rule): the fine-tune's first forward against the pretrained model's own modules
    on the same bands, its final aggregation over those two groups."""
    import types
    from tests.model_cases import perturb_, setup_layout
    from dchag.model.vit import DChagViT
    from dchag.transfer import plan_transfer
    from dchag.transfer.architecture import resolve_groups
    from dchag.transfer.load import copy_into
    from dchag.transfer.plan import full_shapes
    setup_layout(1, 1)
    names, lams = [f"b{c:02d}" for c in range(16)], [400.0 + 20 * c for c in range(16)]
    kw = dict(hidden_size=16, num_attention_heads=2, num_layers=1, ffn_hidden_size=32, aggregation=aggregation)
    pre = DChagViT(_cfg(names, lams, groups=4, **kw))
    perturb_(pre, 3)
    pick = [0, 1, 2, 3, 8, 9, 10, 11]
    args = argparse.Namespace(num_channels=8, channel_parallel_size=1, given=frozenset(), dchag_groups=1,
                              channel_names=[names[c] for c in pick], wavelengths=[lams[c] for c in pick])
    resolve_groups(args, pre.cfg)
    new = DChagViT(_cfg(args.channel_names, args.wavelengths, groups=args.dchag_groups, **kw))
    shapes = full_shapes(pre)
    plan = plan_transfer(pre.cfg, shapes, new.cfg, full_shapes(new), set(new.task_parameter_names()))
    copy_into(new, plan, {k: v.detach() for k, v in pre.named_parameters()})
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 8, 8, 8, generator=gen)
    mask = torch.rand(2, 16, generator=gen) < 0.5
    full = torch.zeros(2, 16, 8, 8)
    full[:, pick] = x

    def kept_groups(self, images):  # the pretrained channel stage, its final aggregation over groups 0 and 2
        return self.final(self.partial(self.tokenizer(images))[:, [0, 2]])
    pre.aggregate_channels = types.MethodType(kept_groups, pre)
    with torch.no_grad():
        return args.dchag_groups, plan.groups, new(x, mask), pre(full, mask)[:, pick]


def test_a_subset_made_of_whole_groups_starts_as_the_pretrained_computation():
    from tests.model_cases import rel_err
    for aggregation, (G, groups, new, reference) in run_distributed(_subset_forward_worker, 1,
                                                                   ("linear", "cross"))[0].items():
        assert G == 2 and groups == ((0, True), (2, True)), aggregation
        assert rel_err(new, reference) < 1e-6, (aggregation, rel_err(new, reference))


def test_plan_rows_fewer_channels_than_g_and_an_unknown_channel():
    """The plan's rows on a model of 3 channels (G = 3 < the pretrained 4): a channel by name, one
    interpolated, one unknown; D-CHAG-L's coefficients moved relative to the group sizes."""
    from dchag.transfer.plan import plan_transfer
    pre = _cfg(["a", "b", "c", "d", "e", "f", "g", "h"], [400.0 + 50 * i for i in range(8)], groups=4,
               aggregation="linear")
    new = _cfg(["c", "x1", "zz"], [None, 475.0, None], groups=3, aggregation="linear")
    D, pp = 8, 4
    shapes = {"tokenizer.weight": (8, D, 2, 2), "tokenizer.channel_embed": (8, D), "partial.levels.0.weight": (8,),
              "backbone.w": (D, D), "head.weight": (8, pp, D), "mask_token": (1, D)}
    new_shapes = {"tokenizer.weight": (3, D, 2, 2), "tokenizer.channel_embed": (3, D), "partial.levels.0.weight": (3,),
                  "backbone.w": (D, D), "head.linear.weight": (3 * pp, D), "lead_time_embed.weight": (D, 1)}
    plan = plan_transfer(pre, shapes, _cfg(new.channel_names, new.wavelengths, groups=3, aggregation="linear",
                                           task="forecast"),
                         new_shapes, {"head.linear.weight", "lead_time_embed.weight"})
    tok = plan.params["tokenizer.weight"]
    assert tok.category == "interpolated" and tok.per_channel
    assert tok.rows == (((2, 1.0),), ((1, 0.5), (2, 0.5)), ())  # "c" by name; 475 nm between 450 and 500; new
    # Groups of 2 (pretrained) and 1 (here): w = w_old * 2 / 1.
    assert plan.params["partial.levels.0.weight"].rows == (((2, 2.0),), ((1, 1.0), (2, 1.0)), ())
    assert plan.params["backbone.w"].category == "loaded"
    assert plan.names("new") == ["head.linear.weight", "lead_time_embed.weight"]
    assert sorted(plan.dropped) == ["head.weight", "mask_token"]


def test_startup_table_says_when_no_band_falls_in_the_pretrained_range():
    from dchag.transfer.plan import plan_transfer
    from dchag.transfer.report import format_table
    pre, new = _cfg(["a", "b"], [400.0, 900.0]), _cfg(["x", "y"], [1000.0, 2000.0])
    shapes = {"tokenizer.weight": (2, 8, 2, 2), "backbone.w": (8, 8)}
    table = format_table(plan_transfer(pre, shapes, new, shapes, set()), "X", shapes, shapes, False, 1)
    assert ("wavelengths: pretrained 400-900 nm (2 bands); here 1000-2000 nm: none of the 2 bands falls inside the "
            "pretrained range") in table, table
    assert "channels: 2 pretrained -> 2 here: 0 loaded (0 by name, 0 by wavelength), 0 interpolated" in table, table


def test_a_checkpoint_that_shares_nothing_is_refused():
    from dchag.transfer import FinetuneError
    from dchag.transfer.plan import plan_transfer
    cfg = _cfg(["a", "b"], [400.0, 500.0])
    with pytest.raises(FinetuneError, match="shares nothing.*none of its 2 tensors is named like a parameter"):
        plan_transfer(cfg, {"net.blocks.0.w": (4, 4), "net.head": (4,)}, cfg, {"backbone.w": (8, 8)}, set())
    with pytest.raises(FinetuneError, match=r"shares nothing.*backbone.w \[4, 4\] vs \[8, 8\]"):
        plan_transfer(cfg, {"backbone.w": (4, 4)}, cfg, {"backbone.w": (8, 8)}, set())


def _keys_cubic(x: float, a: float = -0.75) -> float:
    x = abs(x)
    if x <= 1:
        return (a + 2) * x ** 3 - (a + 3) * x ** 2 + 1
    if x < 2:
        return a * x ** 3 - 5 * a * x ** 2 + 8 * a * x - 4 * a
    return 0.0


def _bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """Keys' cubic convolution (a = -0.75) with half-pixel centres and clamped edges, as a matrix."""
    m = np.zeros((n_out, n_in))
    for o in range(n_out):
        src = (o + 0.5) * n_in / n_out - 0.5
        base = math.floor(src)
        for k in (-1, 0, 1, 2):
            m[o, min(max(base + k, 0), n_in - 1)] += _keys_cubic(base + k - src)
    return m


def _numpy_pos_embed(pos: np.ndarray, old_grid, new_grid) -> np.ndarray:
    """[L, D] on old_grid -> [L', D]: each feature as an image, resized rows then columns."""
    grid = pos.reshape(old_grid[0], old_grid[1], -1)
    out = np.einsum("ih,hwd,jw->ijd", _bicubic_matrix(old_grid[0], new_grid[0]), grid,
                    _bicubic_matrix(old_grid[1], new_grid[1]))
    return out.reshape(-1, pos.shape[-1])


@pytest.mark.parametrize("old_grid,new_grid", [((4, 4), (6, 6)), ((4, 6), (3, 8)), ((4, 4), (4, 4))])
def test_pos_embed_interpolation_matches_numpy_bicubic(old_grid, new_grid):
    from dchag.transfer.pos_embed import interpolate_pos_embed
    pos = torch.randn(1, old_grid[0] * old_grid[1], 5, generator=torch.Generator().manual_seed(3))
    got = interpolate_pos_embed(pos, old_grid, new_grid)
    assert got.shape == (1, new_grid[0] * new_grid[1], 5)
    np.testing.assert_allclose(got[0].numpy(), _numpy_pos_embed(pos[0].double().numpy(), old_grid, new_grid),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("D", [8, 7])
def test_wavelength_embedding_matches_numpy(D):
    from dchag.model.tokenizer import wavelength_sincos
    lams = [443.0, None, 2190.5, 665.0]
    got = wavelength_sincos(lams, D).numpy()
    k = np.arange(D // 2)
    for row, lam in zip(got, lams):
        want = np.zeros(D)
        if lam is not None:
            want[:D // 2], want[D // 2:2 * (D // 2)] = np.sin(lam / 10000.0 ** (2 * k / D)), np.cos(lam / 10000.0 ** (2 * k / D))
        np.testing.assert_allclose(row, want, rtol=0, atol=1e-12)
    # Close bands get close rows, far bands do not (what lets an unseen band start near its neighbours).
    near = wavelength_sincos([665.0, 666.0, 2190.0], 64).numpy()
    assert np.linalg.norm(near[0] - near[1]) < 0.5 * np.linalg.norm(near[0] - near[2])


def test_architecture_comes_from_the_pretrained_model_and_conflicts_are_listed_at_once():
    from dchag.arguments import parse_args
    from dchag.transfer import FinetuneError
    from dchag.transfer.architecture import take_architecture
    pre = _cfg(["a", "b"], [400.0, 500.0], hidden_size=16, num_layers=3, aggregation="cross", ffn_hidden_size=24)
    base = ["--finetune", "--pretrained-checkpoint", "P", "--img-h", "16", "--img-w", "16", "--train-iters", "1"]
    args = parse_args(base + ["--patch-dim", "2", "--task", "forecast"])
    take_architecture(args, pre, "P")
    assert (args.hidden_size, args.num_layers, args.ffn_hidden_size, args.dchag_aggregation, args.task) == \
        (16, 3, 24, "cross", "forecast")  # not given: the pretrained values; the task may change
    args = parse_args(base)  # --patch-dim, required without --finetune, is the pretrained one's here
    take_architecture(args, pre, "P")
    assert args.patch_dim == 2
    with pytest.raises(SystemExit):
        parse_args(base[3:])
    args = parse_args(base + ["--patch-dim", "4", "--hidden-size", "32", "--num-layers", "3", "--dchag-aggregation",
                              "linear"])
    with pytest.raises(FinetuneError) as e:
        take_architecture(args, pre, "P")
    msg = str(e.value)
    for part in ("--hidden-size 32 (pretrained: 16)", "--dchag-aggregation linear (pretrained: cross)",
                 "--patch-dim 4 (pretrained: 2)"):
        assert part in msg
    assert "--num-layers" not in msg  # given, but equal


def test_finetune_flags_must_agree():
    from dchag.arguments import parse_args
    from dchag.transfer import FinetuneError, prepare
    base = ["--img-h", "8", "--img-w", "8", "--patch-dim", "2", "--train-iters", "1"]
    for extra, words in ((["--finetune"], "--finetune needs --pretrained-checkpoint"),
                         (["--pretrained-checkpoint", "x"], "add --finetune"),
                         (["--freeze-encoder"], "--freeze-encoder applies to a fine-tune"),
                         (["--finetune", "--pretrained-checkpoint", "/nonexistent"], "does not exist")):
        with pytest.raises(FinetuneError, match=words):
            prepare(parse_args(base + extra))
    assert prepare(parse_args(base)) is None


def test_new_params_lr_mult_groups_whole_tensors_and_multiplies_the_partial_mult():
    """--new-params-lr-mult: a tensor marked new (any new or interpolated part) trains at M times the
    rate, times --dchag-partial-lr-mult inside the partial aggregation; frozen tensors are left out."""
    from torch import nn
    from dchag.model.aggregation import PartialAggregation
    from dchag.training.loop import _build_optimizer
    model = nn.Module()
    model.partial = PartialAggregation([nn.Linear(2, 2, bias=False)])
    model.head, model.frozen = nn.Linear(2, 2, bias=False), nn.Linear(2, 2, bias=False)
    model.partial.levels[0].weight.transfer_new = model.head.weight.transfer_new = True
    model.frozen.weight.requires_grad_(False)
    args = argparse.Namespace(weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.99, adam_eps=1e-8, dchag_partial_lr_mult=0.5,
                              new_params_lr_mult=4.0)
    opt = _build_optimizer(model, args)
    by_mult = {g["lr_mult"]: [id(p) for p in g["params"]] for g in opt.param_groups}
    assert by_mult == {2.0: [id(model.partial.levels[0].weight)], 4.0: [id(model.head.weight)]}


# ----------------------------------------------------------------------------------------------
# the real entry point on 2 ranks
# ----------------------------------------------------------------------------------------------


def _train(argv, snapshot=False):
    """One run of the real entry point. ``snapshot``: also this rank's parameters as the first forward
    saw them (after the transfer, before any update) and at the end, what trains and what the
    optimizer holds."""
    import pretrain_dchag
    from dchag.training import pretrain, release
    first = {}

    def keep_first(module, inputs):  # returns None: the inputs pass unchanged
        if not first:
            first.update({n: p.detach().clone() for n, p in module.named_parameters()})

    def model_provider(cfg):
        model = pretrain_dchag.model_provider(cfg)
        if snapshot:
            model.register_forward_pre_hook(keep_first)
        return model
    history = pretrain(model_provider, pretrain_dchag.forward_step, pretrain_dchag.datasets_provider, argv)
    out = {"losses": history["losses"]}
    if snapshot:
        module, opt = history["engine"].module, history["engine"].optimizer
        names = {id(p): n for n, p in module.named_parameters()}
        out["first"] = first
        out["last"] = {n: p.detach().clone() for n, p in module.named_parameters()}
        out["trainable"] = sorted(n for n, p in module.named_parameters() if p.requires_grad)
        out["in_optimizer"] = sorted(names[id(p)] for g in getattr(opt, "bit16_groups", []) for p in g)
    release(history)
    return out


def _foreign_copy(export, out):
    """The export with every tensor renamed, as another code base would name it."""
    import shutil
    from safetensors.torch import load_file, save_file
    shutil.copytree(export, out)
    tensors = load_file(os.path.join(export, "model.safetensors"))
    save_file({"net." + k: v for k, v in tensors.items()}, os.path.join(out, "model.safetensors"))
    os.remove(os.path.join(out, "manifest.json"))


def _job(tmp):
    import torch.distributed as dist
    zero1 = _ds("zero1_fp32.json")
    pre, export = os.path.join(tmp, "pre"), os.path.join(tmp, "export")
    _train(zero1 + PRETRAIN + ["--save", pre])
    if dist.get_rank() == 0:  # the exporter builds a serial model: in a process of its own
        proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "convert_checkpoint.py"), "--load-dir", pre,
                               "--save-dir", export, "--format", "consolidated"], capture_output=True, text=True,
                              env={**os.environ, "DS_ACCELERATOR": "cpu"}, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        _foreign_copy(export, os.path.join(tmp, "foreign"))
    dist.barrier()
    ft = zero1 + FINETUNE + ["--finetune", "--pretrained-checkpoint", export]
    r = {"frozen": _train(ft + TP2 + ["--train-iters", "3", "--freeze-encoder", "--log-file",
                                      os.path.join(tmp, "frozen.log"), "--save", os.path.join(tmp, "probe")],
                          snapshot=True)}
    # The same model on two layouts (G given: the rule for fewer channels than G depends on P). At T = P = 1
    # every rank holds every parameter whole: its snapshot is the transferred model.
    same = ["--dchag-groups", "2", "--new-params-lr-mult", "2", "--train-iters", "3"]
    r["t2"] = _train(ft + TP2 + same + ["--save", os.path.join(tmp, "ft"), "--save-interval", "2"])
    r["t1"] = _train(ft + TP1 + same, snapshot=True)
    from_folder = zero1 + FINETUNE + ["--finetune", "--pretrained-checkpoint", pre]
    r["t1_folder"] = _train(from_folder + TP1 + same[:-1] + ["1"])
    # The auto-resume idiom: --load holds the fine-tune's checkpoint, so PATH's weights are not applied again.
    r["resumed"] = _train(ft + TP2 + same + ["--load", os.path.join(tmp, "ft"), "--ckpt-step", "2",
                                             "--save", os.path.join(tmp, "ft2")])
    # MAE -> the dense tasks on the pretraining's own bands and tiles: every encoder tensor arrives as exported.
    dense = zero1 + DENSE + TP1 + ["--finetune", "--pretrained-checkpoint", export, "--train-iters", "2"]
    for task, extra in DENSE_TASKS.items():
        r[task] = _train(dense + ["--task", task, "--log-file", os.path.join(tmp, f"{task}.log")] + extra,
                         snapshot=True)
    r["foreign"] = _refused(zero1 + FINETUNE + TP2 + ["--finetune", "--pretrained-checkpoint",
                                                      os.path.join(tmp, "foreign"), "--train-iters", "1"])
    # LoRA on every target, with dropout, at T = P = 2 (saved at 2 and 4); its checkpoint of iteration 2 made
    # universal and continued at T = P = 1 (DP 2). (tests/test_lora.py compares the layouts at the model level.)
    lora = ft + LORA + ["--dchag-groups", "2", "--train-iters", "4"]
    r["lora2"] = _train(lora + TP2 + ["--save", os.path.join(tmp, "lora"), "--save-interval", "2", "--log-file",
                                      os.path.join(tmp, "lora.log")], snapshot=True)
    if dist.get_rank() == 0:
        proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "convert_checkpoint.py"), "--load-dir",
                               os.path.join(tmp, "lora", "iter_0000002"), "--save-dir", os.path.join(tmp, "lora-univ"),
                               "--format", "universal"], capture_output=True, text=True,
                              env={**os.environ, "DS_ACCELERATOR": "cpu"}, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    dist.barrier()
    r["lora_resumed"] = _train(lora + TP1 + ["--load", os.path.join(tmp, "lora-univ")])
    return r


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("transfer"))
    ranks = run_distributed(_job, 2, tmp)
    r = ranks[0]
    r["frozen_ranks"] = [x["frozen"] for x in ranks]
    r["lora_ranks"] = [x["lora2"] for x in ranks]
    from safetensors.torch import load_file
    r["export"] = {k: v.double().numpy() for k, v in load_file(os.path.join(tmp, "export", "model.safetensors")).items()}
    with open(os.path.join(tmp, "export", "config.json")) as f:
        r["export_config"] = json.load(f)
    with open(os.path.join(tmp, "frozen.log")) as f:
        r["start_log"] = f.read()
    for task in DENSE_TASKS:
        with open(os.path.join(tmp, f"{task}.log")) as f:
            r[task]["start_log"] = f.read()
    r["probe_export"] = _export_and_forecast(os.path.join(tmp, "probe"), os.path.join(tmp, "probe-export"))
    with open(os.path.join(tmp, "lora.log")) as f:
        r["lora_log"] = f.read()
    r["lora_exports"] = _lora_exports(tmp)
    return r


LORA_EXPORTS = """
import json, os, sys, numpy as np, torch, dchag
from safetensors.torch import load_file
from dchag.checkpointing import consolidated
from dchag.checkpointing.convert import consolidate, export_consolidated
from dchag.inference.runtime import build_serial_model
from dchag.parallel.state_dict import load_full_state_dict
from dchag.transfer import adapters
from dchag.transfer.pretrained import open_pretrained
run, tmp = sys.argv[1], sys.argv[2]
merged, apart, remerged = (os.path.join(tmp, n) for n in ("lora-merged", "lora-apart", "lora-remerged"))
export_consolidated(run, merged)                              # the default: adapters merged
adapters.export_apart(run, apart)                             # adapters.safetensors + the base's reference
adapters.merge_apart(apart, remerged)                         # ... merged back with that base
tensors, config = consolidate(run, merge_adapters=False)      # the unmerged model
cfg = consolidated.config_from_dict(config["model"], bf16=False, sequence_parallel=False, recompute_activations=False)
unmerged = build_serial_model(cfg)
load_full_state_dict(unmerged, tensors)
m = dchag.load_pretrained(merged, device="cpu")
x = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(0))
lead = torch.ones(2)
unmerged.eval()
with torch.no_grad():
    a, b = unmerged(x, lead_time=lead), m.forward_normalized(x, lead_time=lead)
forecast = m.forecast(x.numpy(), lead_time=1)
M, R = load_file(os.path.join(merged, "model.safetensors")), load_file(os.path.join(remerged, "model.safetensors"))
from_run = open_pretrained(run).tensors()                     # --finetune from the LoRA run's folder
out = {"rel": float((a - b).norm() / b.norm()), "merged_lora": json.load(open(os.path.join(merged, "config.json")))["model"]["lora_rank"],
       "remerged": max(float((M[k] - R[k]).abs().max()) for k in M), "same_names": sorted(M) == sorted(R) == sorted(from_run),
       "from_run": max(float((M[k] - from_run[k]).abs().max()) for k in M), "forecast_finite": bool(np.isfinite(forecast).all()),
       "apart_tensors": sorted(load_file(os.path.join(apart, "adapters.safetensors"))),
       "apart_bytes": os.path.getsize(os.path.join(apart, "adapters.safetensors")),
       "merged_bytes": os.path.getsize(os.path.join(merged, "model.safetensors"))}
print("RESULT " + json.dumps(out))
"""


def _lora_exports(tmp):
    """The LoRA run's checkpoint (iteration 4) exported merged, apart and merged back, the unmerged model
    beside the merged export, and the run's folder read as a pretrained model, in one plain process."""
    proc = subprocess.run([sys.executable, "-c", LORA_EXPORTS, os.path.join(tmp, "lora"), tmp], capture_output=True,
                          text=True, cwd=REPO, env={**os.environ, "DS_ACCELERATOR": "cpu"}, timeout=600)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    return json.loads(lines[-1][7:]) if proc.returncode == 0 and lines else proc.stdout[-3000:] + proc.stderr[-3000:]


def _export_and_forecast(run, export):
    """The exporter (tools/convert_checkpoint.py's function) on ``run``, then the export forecasting a
    fixed input, in one plain process: (the export's tensors, the forecast, the process's output)."""
    script = ("import sys, numpy as np, dchag\n"
              "from dchag.checkpointing.convert import export_consolidated\n"
              "export_consolidated(sys.argv[1], sys.argv[2])\n"
              "m = dchag.load_pretrained(sys.argv[2], device='cpu')\n"
              "x = np.random.default_rng(0).normal(size=(2, 3, 12, 12)).astype(np.float32)\n"
              "np.save(sys.argv[3], m.forecast(x, lead_time=1))\n")
    out = export + "-forecast.npy"
    proc = subprocess.run([sys.executable, "-c", script, run, export, out], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "DS_ACCELERATOR": "cpu"}, timeout=600)
    if proc.returncode != 0:
        return None, None, proc.stdout[-2000:] + proc.stderr[-2000:]
    from safetensors.torch import load_file
    tensors = {k: v.double().numpy() for k, v in load_file(os.path.join(export, "model.safetensors")).items()}
    return tensors, np.load(out), proc.stdout[-2000:]


def test_export_records_the_channel_identity(job):
    model = job["export_config"]["model"]
    assert model["channel_names"] == [f"ch{c:03d}" for c in range(PRE_BANDS)]
    np.testing.assert_allclose(model["wavelengths"], np.linspace(400.0, 900.0, PRE_BANDS), rtol=0, atol=1e-9)


def test_transferred_weights_match_the_export(job):
    """Before training (the T = P = 1 run's first forward): 400 and 900 nm copied, 650 nm halfway
    between the pretrained 633.3 and 666.7 nm bands (7 and 8), the coefficients rescaled to the new
    groups (2 + 1 channels vs 4 + 4 + 4 + 4), the position embedding resized bicubically, the
    backbone copied."""
    old, new = job["export"], {k: v.double().numpy() for k, v in job["t1"]["first"].items()}
    rows = lambda a: [a[0], 0.5 * a[7] + 0.5 * a[8], a[15]]  # noqa: E731
    for name in ("tokenizer.weight", "tokenizer.bias", "tokenizer.channel_embed"):
        np.testing.assert_allclose(new[name], np.stack(rows(old[name])), rtol=0, atol=1e-7)
        assert np.array_equal(new[name][[0, 2]], old[name][[0, 15]]), "copied rows must be bit-exact"
    w = old["partial.levels.0.weight"]
    np.testing.assert_allclose(new["partial.levels.0.weight"], [w[0] * 4 / 2, (0.5 * w[7] + 0.5 * w[8]) * 4 / 2,
                                                                w[15] * 4 / 1], rtol=1e-6)
    np.testing.assert_allclose(new["pos_embed"][0], _numpy_pos_embed(old["pos_embed"][0], (4, 4), (6, 6)),
                               rtol=0, atol=1e-6)
    for name in old:
        if name.startswith(("backbone.", "final.")):
            assert np.array_equal(new[name], old[name]), name
    assert "mask_token" not in new and "lead_time_embed.weight" in new


def test_startup_table(job):
    log = job["start_log"]
    for line in ("channels: 16 pretrained -> 3 here: 2 loaded (0 by name, 2 by wavelength), 1 interpolated",
                 "wavelengths: pretrained 400-900 nm (16 bands); here 400-900 nm: 3 of 3 inside the pretrained range",
                 "interpolated: pos_embed, tokenizer.weight (per channel: 2 loaded, 1 interpolated)",
                 "groups: G = 2 by count over 3 channels (pretrained: G = 4 over 16); fewer channels than the "
                 "pretrained G", "tile: 8 x 8 -> 12 x 12 pixels", "task: mae -> forecast"):
        assert line in log, log
    listed = {x.split(":")[0].strip(): set(x.split(": ", 1)[1].split(", ")) for x in log.splitlines()
              if x.startswith(("  new:", "  dropped:"))}
    assert listed == {"new": {"lead_time_embed.weight", "lead_time_embed.bias", "head.linear.weight", "head.linear.bias"},
                      "dropped": {"mask_token", "head.weight", "head.bias"}}, log


def test_frozen_encoder_stays_bit_equal_while_the_head_trains(job):
    head = {"head.linear.weight", "head.linear.bias", "lead_time_embed.weight", "lead_time_embed.bias"}
    for frozen in job["frozen_ranks"]:  # each rank's own shards
        assert set(frozen["trainable"]) == head and set(frozen["in_optimizer"]) == head
        assert len(frozen["losses"]) == 3 and all(math.isfinite(v) for v in frozen["losses"].values())
        for name, last in frozen["last"].items():
            if name in head:
                assert not torch.equal(last, frozen["first"][name]), f"{name} did not train"
            else:
                assert torch.equal(last, frozen["first"][name]), f"{name} changed under --freeze-encoder"
    assert set(job["t1"]["trainable"]) == set(job["t1"]["last"])  # without the flag everything trains


def test_a_frozen_probe_exports_and_predicts(job):
    """A --freeze-encoder run's checkpoint (ZeRO 1: the frozen encoder is in no optimizer shard, only in
    the model-states files) exports whole: the encoder as transferred (the T = P = 1 run's first forward,
    same G), the head and lead-time embedding as trained; the export forecasts."""
    tensors, forecast, log = job["probe_export"]
    assert tensors is not None and forecast is not None, log
    trained = {"head.linear.weight", "head.linear.bias", "lead_time_embed.weight", "lead_time_embed.bias"}
    first = {k: v.double().numpy() for k, v in job["t1"]["first"].items()}
    assert set(tensors) == set(first)
    for name in set(first) - trained:
        assert np.array_equal(tensors[name], first[name]), name
    for name in trained:  # replicated: every rank holds them whole
        assert np.array_equal(tensors[name], job["frozen"]["last"][name].double().numpy()), name
    assert forecast.shape == (2, 3, 12, 12) and np.isfinite(forecast).all()


LORA_TRAINS = {"head.linear.weight", "head.linear.bias", "lead_time_embed.weight", "lead_time_embed.bias",
               "tokenizer.weight", "tokenizer.bias", "tokenizer.channel_embed", "partial.levels.0.weight", "pos_embed"}


def test_lora_trains_only_what_it_should(job):
    """--lora-rank 2 on every target with dropout 0.1 at T = P = 2: on each rank's shards, only the adapters,
    the head and lead-time embedding and the tensors the transfer interpolated (the 650 nm band's rows, the
    coefficients, the resized position embedding) change; every other tensor stays bit-equal to what it
    loaded; the optimizer holds exactly what trains; the start-up table says so."""
    assert list(job["lora2"]["losses"]) == [1, 2, 3, 4]
    assert all(math.isfinite(v) for v in job["lora2"]["losses"].values())
    for run in job["lora_ranks"]:
        adapters = {n for n in run["first"] if ".lora." in n}
        assert len(adapters) == 12  # A, B of qkv, proj, fc1, fc2 (1 layer) and of the final aggregation's kv, proj
        assert set(run["trainable"]) == set(run["in_optimizer"]) == adapters | LORA_TRAINS
        for name, last in run["last"].items():
            moved = not torch.equal(last, run["first"][name])
            assert moved == (name in adapters | LORA_TRAINS), name
    log = job["lora_log"]
    for line in ("LoRA: rank 2, alpha 4 (scale 2), dropout 0.1, on qkv, proj, fc1, fc2, final.kv, final.proj: 6 linears, "
                 "12 adapter tensors", "frozen: 19 tensors loaded from the pretrained model", "(and the 12 LoRA adapter "
                 "tensors)"):
        assert line in log, log


def test_lora_resharded_from_two_ranks_to_one_continues_the_run(job):
    """The T = P = 2 LoRA checkpoint of iteration 2 as a universal checkpoint, continued at T = P = 1 (DP 2):
    iterations 3 and 4 give the uninterrupted T = P = 2 run's losses (adapters, their optimizer state and
    the frozen base all arrive; T = P = 1 trains as T = P = 2, dropout included)."""
    resumed, t2 = job["lora_resumed"]["losses"], job["lora2"]["losses"]
    assert list(resumed) == [3, 4]
    for it in resumed:
        assert abs(resumed[it] - t2[it]) <= 1e-6 * max(1.0, abs(t2[it])), (it, resumed[it], t2[it])


def test_lora_exports_merged_or_apart_and_predicts(job):
    """The LoRA checkpoint's export merges the adapters (a plain model, lora_rank 0) and forecasts as the
    unmerged model does (1e-5); written apart (adapters.safetensors: the adapters and what trained, beside
    a reference to the base) and merged back with its base it is the merged export again; the run's own
    folder read as a pretrained model (--finetune from it) is the merged model too."""
    r = job["lora_exports"]
    assert isinstance(r, dict), r
    assert r["rel"] < 1e-5 and r["merged_lora"] == 0 and r["forecast_finite"] and r["same_names"], r
    assert r["remerged"] < 1e-6 and r["from_run"] < 1e-6, r
    assert set(r["apart_tensors"]) == {n for n in job["lora2"]["first"] if ".lora." in n} | LORA_TRAINS
    assert r["apart_bytes"] < r["merged_bytes"]


def test_finetunes_on_two_layouts_and_from_either_format_give_the_same_losses(job):
    t2, t1 = job["t2"]["losses"], job["t1"]["losses"]
    assert list(t2) == [1, 2, 3]
    for it in t2:
        assert abs(t2[it] - t1[it]) <= 1e-5 * max(1.0, abs(t1[it])), (it, t2[it], t1[it])
    # From the DeepSpeed folder the pretraining wrote (T = P = 2) into T = P = 1: the same start.
    assert abs(job["t1_folder"]["losses"][1] - t1[1]) <= 1e-5 * max(1.0, abs(t1[1]))


def test_resume_of_a_finetune_continues_exactly(job):
    assert list(job["resumed"]["losses"]) == [3]
    assert job["resumed"]["losses"][3] == job["t2"]["losses"][3]


def test_foreign_checkpoint_is_refused(job):
    kind, msg, _ = job["foreign"]
    assert kind == "FinetuneError" and "shares nothing with this model" in msg and "net.backbone" in msg, msg


@pytest.mark.parametrize("task, planes", [("regress", 4), ("segment", 4)])
def test_mae_finetunes_to_a_dense_task(job, task, planes):
    """MAE -> regress / segment (same bands and tiles, T = P = 1): at the first forward every encoder
    tensor equals the export bit for bit, the dense head is new (K planes of p x p pixels), the MAE
    head and mask token are dropped, and the fine-tune trains."""
    run, old = job[task], job["export"]
    new = {k: v.double().numpy() for k, v in run["first"].items()}
    head = {"head.linear.weight", "head.linear.bias"}
    assert set(new) == (set(old) - {"mask_token", "head.weight", "head.bias"}) | head
    for name in set(new) - head:
        assert np.array_equal(new[name], old[name]), name
    assert new["head.linear.weight"].shape == (planes * 2 * 2, 16)
    log = run["start_log"]
    for line in (f"task: mae -> {task}", "channels: the pretrained model's own 16", "  interpolated: -"):
        assert line in log, log
    listed = {x.split(":")[0].strip(): set(x.split(": ", 1)[1].split(", ")) for x in log.splitlines()
              if x.startswith(("  new:", "  dropped:"))}
    assert listed == {"new": head, "dropped": {"mask_token", "head.weight", "head.bias"}}, log
    assert len(run["losses"]) == 2 and all(math.isfinite(v) for v in run["losses"].values())
    for name in head:
        assert not torch.equal(run["last"][name], run["first"][name]), f"{name} did not train"
