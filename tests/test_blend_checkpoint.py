"""Checkpoints of a model over a blend of data sources: per-identity rows sharded by home rank.

One 2-rank job (T = P = 2) builds the blended D-CHAG-L MAE of tests/test_blend_model.py (13 union
channels, four sources; rank 0 holds rows 0-4, 9, 10 and 12 of every per-identity parameter, rank 1
rows 5-8 and 11: three runs and two) with the serial model's weights, and saves it as training does (DeepSpeed,
ZeRO 1, ``dchag.checkpointing.engine.save``). Then, in this process:

* the consolidated export equals the serial model's tensors exactly and records the sources;
* export -> DeepSpeed at T = P = 1 -> export -> DeepSpeed at T = P = 2: each rank's shards equal
  what the original T = P = 2 model held;
* DeepSpeed's ds_to_universal merges every parameter (its fp32 copy) into the serial tensor.
"""

from __future__ import annotations

import glob
import os

import pytest
import torch

from tests.distributed import run_distributed
from tests.model_cases import perturb_, setup_layout
from tests.test_blend_model import SOURCES, _batch

NAMES = ("a", "b", "c", "d")
UNION_NAMES = tuple(f"u{u}" for u in range(13))
ARGV = ["--task", "mae", "--num-channels", "13", "--img-h", "8", "--img-w", "8", "--patch-dim", "2",
        "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--ffn-hidden-size", "64",
        "--dchag-aggregation", "linear", "--dchag-groups", "4", "--tensor-model-parallel-size", "2",
        "--channel-parallel-size", "2", "--micro-batch-size", "1", "--lr", "1e-3", "--seed", "1234", "--train-iters", "5"]


class _Schedule:
    def state_dict(self):
        return {"iteration": 5}


def _save_worker(folder: str) -> dict:
    import deepspeed
    from dchag.arguments import model_config, parse_args
    from dchag.checkpointing.engine import save
    from dchag.checkpointing.universal import prepare_module
    from dchag.model.vit import DChagViT
    from dchag.parallel.comm import reduce_from_channel_parallel_region
    from dchag.parallel.state_dict import load_full_state_dict
    from megatron_patches.deepspeed_mpu import mpu
    args = parse_args(ARGV + ["--save", folder])
    args.sources, args.source_names = SOURCES, NAMES  # as the data side records a blend
    args.channel_names = UNION_NAMES
    cfg = model_config(args)
    setup_layout(1, 1)
    serial = DChagViT(cfg)
    perturb_(serial, seed=11)
    full = {n: p.detach().clone() for n, p in serial.named_parameters()}
    setup_layout(2, 2)
    model = DChagViT(cfg)
    load_full_state_dict(model, full)
    prepare_module(model)
    ds_config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                 "zero_optimization": {"stage": 1}, "steps_per_print": 10**9}
    # lr 0: one step fills AdamW's moments (ds_to_universal converts them too) and moves no weight
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=0.0),
                                      config=ds_config, mpu=mpu, dist_init_required=False)
    images, mask, _ = _batch(cfg, 1)  # source B: both ranks borrow
    out = engine(images[:, list(model.input_channels(1))], patch_mask=mask, source=1)
    engine.backward(reduce_from_channel_parallel_region(out.square().sum()))
    engine.step()
    save(engine, args, 5, 20, _Schedule())
    shards = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = {n: tuple(p.channel_ids) for n, p in model.named_parameters() if getattr(p, "channel_identity", False)}
    return {"full": full, "shards": shards, "ids": ids}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("blend_ckpt")
    per_rank = run_distributed(_save_worker, 2, str(tmp / "run"))
    return tmp, per_rank


def test_blend_checkpoint_holds_home_rows_in_runs(saved):
    _, per_rank = saved
    # A: 0-4 | 5-8 (groups 3, 2 | 2, 2); B: 9, 10, 7, 2 | 11, 0; C: 5, 5 | 5, 5; D: 12, 12 | 8, 1
    assert per_rank[0]["ids"]["tokenizer.weight"] == (0, 1, 2, 3, 4, 9, 10, 12)
    assert per_rank[1]["ids"]["tokenizer.weight"] == (5, 6, 7, 8, 11)


def test_blend_export_equals_the_serial_model(saved):
    from safetensors.torch import load_file
    from dchag.checkpointing.consolidated import read_config
    from dchag.checkpointing.convert import export_consolidated
    tmp, per_rank = saved
    export_consolidated(str(tmp / "run"), str(tmp / "export"))
    tensors = load_file(str(tmp / "export" / "model.safetensors"))
    full = per_rank[0]["full"]
    assert sorted(tensors) == sorted(full)
    differ = [n for n in full if not torch.equal(tensors[n], full[n])]
    assert not differ, differ
    model = read_config(str(tmp / "export"))["model"]
    assert model["sources"] == [list(ids) for ids in SOURCES] and model["source_names"] == list(NAMES)


def test_blend_layout_round_trip_loads_equal(saved):
    from dchag.checkpointing.convert import export_consolidated, to_deepspeed
    tmp, per_rank = saved
    if not (tmp / "export").exists():
        export_consolidated(str(tmp / "run"), str(tmp / "export"))
    to_deepspeed(str(tmp / "export"), str(tmp / "t1"), 1, 1)
    export_consolidated(str(tmp / "t1"), str(tmp / "export1"))
    folder = to_deepspeed(str(tmp / "export1"), str(tmp / "t2"), 2, 2)
    for r, result in enumerate(per_rank):
        module = torch.load(os.path.join(folder, f"mp_rank_{r:02d}_model_states.pt"), weights_only=False)["module"]
        differ = [n for n, t in result["shards"].items() if not torch.equal(module[n], t)]
        assert not differ, f"rank {r}: {differ}"


def test_blend_universal_conversion_merges_home_rows(saved):
    from dchag.checkpointing.convert import to_universal
    tmp, per_rank = saved
    folder = to_universal(str(tmp / "run"), str(tmp / "universal"))
    full = per_rank[0]["full"]
    for name in ("tokenizer.weight", "partial.levels.0.weight", "head.bias", "final.kv.weight"):
        merged = torch.load(glob.glob(os.path.join(folder, "zero", name, "fp32.pt"))[0], weights_only=False)
        merged = merged["param"] if isinstance(merged, dict) else merged
        assert torch.equal(merged.reshape(full[name].shape), full[name]), name


def test_finetune_from_a_blend_matches_the_union(saved):
    """A one-source model of channels u7 (A and B), u12 (D), u5 (A, C) and a new one, fine-tuned from
    the blended export: per-channel rows come from the union's rows of those names; D-CHAG-L's
    coefficients keep w n_old / n_new, n_old the size of the segment of the channel's first slot
    in its first source (u7: A's group 7-8 of 2; u12: D's slot of 1; u5: A's group 5-6 of 2)."""
    from dchag.checkpointing.convert import export_consolidated
    from dchag.inference.runtime import build_serial_model
    from dchag.model.config import DChagConfig
    from dchag.transfer import plan_for
    from dchag.transfer.load import copy_into
    from dchag.transfer.pretrained import open_pretrained
    tmp, per_rank = saved
    if not (tmp / "export").exists():
        export_consolidated(str(tmp / "run"), str(tmp / "export"))
    pretrained = open_pretrained(str(tmp / "export"))
    assert pretrained.cfg.sources == SOURCES
    cfg = DChagConfig(num_channels=4, img_h=8, img_w=8, patch_dim=2, hidden_size=32, num_layers=2,
                      num_attention_heads=4, ffn_hidden_size=64, aggregation="linear", groups=2,
                      channel_names=("u7", "u12", "u5", "new"))
    model = build_serial_model(cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    plan = plan_for(model, pretrained)
    copy_into(model, plan, pretrained.tensors())
    full = per_rank[0]["full"]
    torch.testing.assert_close(model.tokenizer.weight[:3], full["tokenizer.weight"][[7, 12, 5]], rtol=0, atol=0)
    torch.testing.assert_close(model.tokenizer.weight[3], before["tokenizer.weight"][3], rtol=0, atol=0)
    torch.testing.assert_close(model.head.weight[:3], full["head.weight"][[7, 12, 5]], rtol=0, atol=0)
    coef = full["partial.levels.0.weight"]
    want = torch.stack([coef[7] * 2 / 2, coef[12] * 1 / 2, coef[5] * 2 / 2])  # new groups: (u7, u12), (u5, new)
    torch.testing.assert_close(model.partial.levels[0].weight[:3].detach(), want)
