"""Each rank tokenizes exactly its own channels and holds weights for no other channel
(DESIGN.md, Must hold #2)."""

from __future__ import annotations

import torch

from tests.distributed import run_distributed
from tests.model_cases import perturb_, rel_err, setup_layout, tiny_config

CHANNEL_PREFIXES = ("tokenizer.", "head.")


def _permute_channels(full: dict, perm: torch.Tensor) -> dict:
    """The model whose per-channel weights are permuted by ``perm`` (new channel i = old perm[i])."""
    out = dict(full)
    for name, t in full.items():
        if name.startswith(CHANNEL_PREFIXES) or name == "partial.levels.0.weight":
            out[name] = t[perm]
    return out


def _ownership_worker(aggregation, num_channels, groups, tp, cp):
    from dchag.model.vit import DChagViT
    from dchag.parallel.state_dict import full_state_dict, load_full_state_dict
    cfg = tiny_config(aggregation=aggregation, num_channels=num_channels, groups=groups)
    setup_layout(tp, cp)
    model = DChagViT(cfg)
    perturb_(model, seed=3)  # per-rank noise is fine: we compare the model with itself
    full = full_state_dict(model)

    # 1. Parameters: channel-sharded tensors hold exactly this rank's channel rows.
    rows = {n: (tuple(p.channel_rows), p.shape[0]) for n, p in model.named_parameters()
            if getattr(p, "channel_parallel", False)}

    # 2. Permutation: permute input channels and per-channel weights the same way; the output
    #    must be the original output permuted. A permutation inside each group keeps the group
    #    structure (linear/cross); flat aggregation is invariant to any permutation.
    C = cfg.num_channels
    gen = torch.Generator().manual_seed(5)
    if aggregation == "flat":
        perm = torch.randperm(C, generator=gen)
    else:
        part = cfg.partition(1)
        perm = torch.cat([s + torch.randperm(n, generator=gen) for s, n in zip(part.group_starts, part.group_sizes)])
    images = torch.randn(2, C, cfg.img_h, cfg.img_w, generator=gen)
    mask = torch.rand(2, cfg.num_patches, generator=gen) < 0.5
    with torch.no_grad():
        out = model(images[:, model.channels], patch_mask=mask)
        out_full = torch.cat(_gather(out, cp), dim=1)
        load_full_state_dict(model, _permute_channels(full, perm))
        out_perm = model(images[:, perm][:, model.channels], patch_mask=mask)
        out_perm_full = torch.cat(_gather(out_perm, cp), dim=1)
    return {"rows": rows, "channels": (model.channels.start, model.channels.stop),
            "perm_err": rel_err(out_perm_full, out_full[:, perm]),
            "unpermuted_err": rel_err(out_perm_full, out_full)}


def _gather(t, cp):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    if cp == 1:
        return [t]
    parts = [None] * cp
    dist.all_gather_object(parts, t, group=ps.get_channel_parallel_group())
    return parts


def _check(results, num_channels, groups, cp):
    from dchag.parallel.partition import ChannelPartition
    part = ChannelPartition(num_channels, groups, cp)
    for rank, r in enumerate(results):
        own = part.rank_channels(rank % cp)
        assert r["channels"] == (own.start, own.stop)
        tokenizer_rows = {n: v for n, v in r["rows"].items() if n.startswith(CHANNEL_PREFIXES)}
        assert tokenizer_rows, "no channel-sharded parameters found"
        for name, (rows, local) in tokenizer_rows.items():
            assert rows == (own.start, own.stop), f"rank {rank} {name} holds rows {rows}, owns {own}"
            assert local == len(own), f"rank {rank} {name} has {local} rows for {len(own)} channels"
        assert r["perm_err"] < 1e-5, r
        assert r["unpermuted_err"] > 1e-3, "permutation had no effect: the test would not catch a bug"


def test_each_rank_owns_its_channels_linear_uneven():
    _check(run_distributed(_ownership_worker, 2, "linear", 13, 4, 2, 2), 13, 4, 2)


def test_each_rank_owns_its_channels_flat():
    _check(run_distributed(_ownership_worker, 2, "flat", 12, 12, 2, 2), 12, 12, 2)
