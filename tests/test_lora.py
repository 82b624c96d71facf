"""LoRA on the tensor-parallel linears (dchag/model/lora.py) against its serial twin.

One job on 2 gloo ranks, model level (no DeepSpeed): the same D-CHAG-L model with adapters on every
target (the backbone's qkv, proj, fc1, fc2 and the final aggregation's kv, proj; rank 2, dropout 0.2)
at T = P = 1, at T = P = 2 and at T = P = 2 with sequence parallelism, the same full weights (B
non-zero), the same batch and dropout keys: the output and every adapter gradient agree to float32
rounding, and dropout really drew masks (the output differs from evaluation mode). At the start (B =
0) the model is its base. The merge (W + alpha/r B A) gives the unmerged model's output. The
training runs (T = P = 2 equal to T = P = 1, what trains, the exports, the resharded continuation)
are in tests/test_transfer.py's job.
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed import run_distributed

TARGETS = ("qkv", "proj", "fc1", "fc2", "final.kv", "final.proj")


def _cfg(**kw):
    from tests.model_cases import tiny_config
    return tiny_config(num_channels=8, groups=4, num_layers=2, lora_rank=2, lora_alpha=4.0, lora_dropout=0.2,
                       lora_targets=TARGETS, **kw)


def _full_weights(cfg):
    """Whole weights of the serial model, adapters' B non-zero (every rank draws the same)."""
    from dchag.model.vit import DChagViT
    from tests.model_cases import perturb_, setup_layout
    setup_layout(1, 1)
    model = DChagViT(cfg)
    perturb_(model, 11)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _run(model, cfg, keys):
    from dchag.model.lora import dropout_keys
    from dchag.parallel.state_dict import full_state_dict
    from tests.model_cases import random_batch
    from megatron.core import parallel_state as ps
    images, mask, _, weights = random_batch(cfg, batch=2)
    channels = model.channels
    model.train()
    with dropout_keys(keys, 5):
        out = model(images[:, channels.start:channels.stop], mask)
        (out * weights[:, channels.start:channels.stop]).sum().backward()
    model.eval()
    with torch.no_grad():
        eval_out = model(images[:, channels.start:channels.stop], mask)
    grads = full_state_dict(model, grads=True)
    group = ps.get_channel_parallel_group()
    outs = [torch.empty_like(out) for _ in range(ps.get_channel_parallel_world_size())]
    torch.distributed.all_gather(outs, out.detach().contiguous(), group=group)
    evals = [torch.empty_like(eval_out) for _ in outs]
    torch.distributed.all_gather(evals, eval_out.contiguous(), group=group)
    return torch.cat(outs, 1), torch.cat(evals, 1), grads


def _worker():
    import dataclasses
    from dchag.model.lora import merge, spec_of
    from dchag.model.vit import DChagViT
    from dchag.parallel.state_dict import load_full_state_dict
    from tests.model_cases import setup_layout
    cfg = _cfg()
    full = _full_weights(cfg)
    keys = torch.tensor([3, 17])
    out = {}
    for name, (t, p, sp) in {"t1": (1, 1, False), "t2": (2, 2, False), "t2sp": (2, 2, True)}.items():
        setup_layout(t, p)
        c = dataclasses.replace(cfg, sequence_parallel=sp)
        model = DChagViT(c)
        load_full_state_dict(model, full)
        out[name] = _run(model, c, keys)
    setup_layout(1, 1)
    plain = dataclasses.replace(cfg, lora_rank=0, lora_alpha=None, lora_dropout=0.0, lora_targets=None)
    merged = DChagViT(plain)
    load_full_state_dict(merged, merge(full, spec_of(cfg)))
    fresh = DChagViT(dataclasses.replace(cfg, lora_dropout=0.0))  # B = 0: the base model
    base = DChagViT(plain)
    load_full_state_dict(base, {n: v for n, v in dict(fresh.named_parameters()).items() if ".lora." not in n})
    from tests.model_cases import random_batch
    images, mask, _, _ = random_batch(cfg, batch=2)
    with torch.no_grad():
        merged.eval(), fresh.eval(), base.eval()
        out["merged"] = merged(images, mask)
        out["fresh"], out["base"] = fresh(images, mask), base(images, mask)
    return out


@pytest.fixture(scope="module")
def ranks():
    return run_distributed(_worker, 2)


def test_tensor_parallel_lora_equals_the_serial_one(ranks):
    from tests.model_cases import rel_err
    r = ranks[0]
    ref_out, ref_eval, ref_grads = r["t1"]
    adapters = [n for n in ref_grads if ".lora." in n]
    assert len(adapters) == 2 * (4 * 2 + 2)  # A and B of 4 linears x 2 layers + the final aggregation's 2
    assert rel_err(ref_out, ref_eval) > 1e-3  # dropout drew masks in training mode
    for name in ("t2", "t2sp"):
        for rank in ranks:
            out, eval_out, grads = rank[name]
            assert rel_err(out, ref_out) < 1e-5, (name, rel_err(out, ref_out))
            assert rel_err(eval_out, ref_eval) < 1e-5, name
            for n in adapters:
                assert rel_err(grads[n], ref_grads[n]) < 1e-5, (name, n, rel_err(grads[n], ref_grads[n]))
            assert all(ref_grads[n].abs().sum() > 0 for n in adapters)


def test_merged_weights_give_the_adapted_model_and_b_zero_is_the_base(ranks):
    from tests.model_cases import rel_err
    r = ranks[0]
    assert rel_err(r["merged"], r["t1"][1]) < 1e-5
    assert torch.equal(r["fresh"], r["base"])
