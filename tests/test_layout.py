"""Channel partition arithmetic and clear errors for bad layouts (raised before any group or
weight is built)."""

from __future__ import annotations

import pytest

from dchag.model.config import DChagConfig
from dchag.parallel.partition import ChannelPartition, LayoutError
from megatron_patches.channel_parallel import validate_layout
from tests.model_cases import tiny_config


def test_uneven_groups_differ_by_at_most_one_and_cover_all_channels():
    part = ChannelPartition(13, 4, 2)
    assert part.group_sizes == (4, 3, 3, 3)
    assert list(part.rank_channels(0)) == list(range(0, 7))
    assert list(part.rank_channels(1)) == list(range(7, 13))
    assert part.group_of_channel() == (0,) * 4 + (1,) * 3 + (2,) * 3 + (3,) * 3


@pytest.mark.parametrize("C,G,P", [(13, 4, 1), (13, 4, 2), (13, 4, 4), (450, 8, 4), (7, 7, 7)])
def test_rank_channel_ranges_tile_the_channels(C, G, P):
    part = ChannelPartition(C, G, P)
    covered = [c for r in range(P) for c in part.rank_channels(r)]
    assert covered == list(range(C))


@pytest.mark.parametrize("call,needle", [
    (lambda: ChannelPartition(16, 6, 4), "--channel-parallel-size 4 must divide --dchag-groups 6"),
    (lambda: ChannelPartition(4, 8, 1), "--dchag-groups 8 must be between 1 and --num-channels 4"),
    (lambda: validate_layout(6, 4, 4), "world size 6 is not divisible by --tensor-model-parallel-size 4"),
    (lambda: validate_layout(4, 2, 4), "--channel-parallel-size 4 must divide --tensor-model-parallel-size 2"),
    (lambda: tiny_config(num_attention_heads=3, hidden_size=33).validate_layout(2, 2),
     "--num-attention-heads 3 is not divisible by --tensor-model-parallel-size 2"),
    (lambda: tiny_config(img_h=9), "--img-h 9 is not divisible by --patch-dim 2"),
    (lambda: tiny_config(groups=4).validate_layout(4, 4) or tiny_config(groups=6).validate_layout(4, 4),
     "--channel-parallel-size 4 must divide --dchag-groups 6"),
    (lambda: tiny_config(tree_levels=3), "--dchag-tree-levels 3"),
    (lambda: tiny_config(aggregation="mean"), "--dchag-aggregation must be one of"),
    (lambda: tiny_config(sequence_parallel=True, img_h=6, img_w=6).validate_layout(2, 2),
     "patch count must be divisible by T"),
])
def test_bad_layouts_raise_clear_errors(call, needle):
    with pytest.raises(LayoutError) as err:
        call()
    assert needle in str(err.value)


def test_flat_uses_one_group_per_channel():
    cfg = DChagConfig(num_channels=12, img_h=8, img_w=8, patch_dim=2, aggregation="flat", groups=3)
    assert cfg.num_groups == 12
    with pytest.raises(LayoutError):
        DChagConfig(num_channels=13, img_h=8, img_w=8, patch_dim=2, aggregation="flat").validate_layout(2, 2)


def _reinit_worker(rounds):
    """Thread count after each of several init/destroy rounds of the T=P=2 layout."""
    import threading

    from tests.model_cases import setup_layout
    counts = []
    for _ in range(rounds):
        setup_layout(2, 2)
        from megatron.core import parallel_state as ps
        ps.destroy_model_parallel()
        counts.append(threading.active_count() + _native_threads())
    return counts


def _native_threads() -> int:
    import os
    return len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else 0


def test_destroy_model_parallel_releases_process_groups():
    """Re-initializing layouts in one process must not pile up process groups (each gloo group
    owns polling threads; 60 layouts once made a 4-rank test run for half an hour)."""
    from tests.distributed import run_distributed
    for counts in run_distributed(_reinit_worker, 2, 4):
        assert counts[-1] <= counts[0], f"threads grew over init/destroy rounds: {counts}"


@pytest.mark.parametrize("C,G", [(12, 4), (13, 4)])  # uniform and uneven segments
def test_linear_reduce_is_the_weighted_segment_sum(C, G):
    """D-CHAG-L against its definition out_n = sum_{i in n} w_i x_i, output and gradients."""
    import torch

    from dchag.model.aggregation import LinearReduce, tree_levels
    level = tree_levels(ChannelPartition(C, G, 1), 0, 1)[0]
    reduce = LinearReduce(level, owner=True)
    with torch.no_grad():
        reduce.weight.copy_(torch.linspace(0.5, 1.5, C))
    x = torch.randn(2, C, 3, 5, requires_grad=True)
    out = reduce(x)
    starts = [sum(level.sizes[:n]) for n in range(len(level.sizes))]
    expected = torch.stack([sum(reduce.weight[i] * x[:, i] for i in range(s, s + k))
                            for s, k in zip(starts, level.sizes)], dim=1)
    torch.testing.assert_close(out, expected)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, reduce.weight), g)
    want = torch.autograd.grad(expected, (x, reduce.weight), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
