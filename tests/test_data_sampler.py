"""Data order: a function of (seed, position) only; layout-independent; exact resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dchag.data import (DataError, MicroBatchSampler, TileDataset, build_eval_loader, build_train_loader,
                        global_batch, micro_batch, open_source)
from dchag.data.writers import write_npy

S, B, M = 37, 8, 2  # samples, global batch, micro batch


def rank_stream(D, d, iters, consumed=0, seed=3):
    """DP rank d's micro-batches for ``iters`` iterations (k = B / (M D) micro-steps each)."""
    k = B // (M * D)
    it = iter(MicroBatchSampler(S, M, data_parallel_rank=d, data_parallel_size=D, seed=seed,
                                consumed_samples=consumed, global_batch_size=B))
    return [[next(it) for _ in range(k)] for _ in range(iters)]


@pytest.mark.parametrize("D", [1, 2, 4])
def test_global_batch_is_layout_independent(D):
    iters = 12  # > 2 epochs: crosses epoch boundaries mid-batch
    streams = [rank_stream(D, d, iters) for d in range(D)]
    for i in range(iters):
        got = sorted(s for d in range(D) for mb in streams[d][i] for s in mb)
        assert got == sorted(global_batch(i, B, S, seed=3))
        # the same as the explicit per-micro-step helper
        for d in range(D):
            for j, mb in enumerate(streams[d][i]):
                assert mb == micro_batch(i, j, global_batch_size=B, micro_batch_size=M, data_parallel_rank=d,
                                         data_parallel_size=D, num_samples=S, seed=3)


def test_order_is_a_permutation_per_epoch_and_depends_on_seed():
    first = [s for i in range(4) for s in global_batch(i, B, 32, seed=1)]
    assert sorted(first) == list(range(32))
    assert first != [s for i in range(4) for s in global_batch(i, B, 32, seed=2)]
    assert first != list(range(32))


@pytest.mark.parametrize("D", [1, 2, 4])
def test_resume_from_consumed_samples_is_exact(D):
    full = rank_stream(D, 0, 10)
    resumed = rank_stream(D, 0, 6, consumed=4 * B)
    assert resumed == full[4:]
    # resuming under another layout gives the same global batches
    other = 2 if D != 2 else 4
    after = [sorted(s for d in range(other) for mb in rank_stream(other, d, 6, consumed=4 * B)[i] for s in mb)
             for i in range(6)]
    assert after == [sorted(global_batch(i, B, S, seed=3)) for i in range(4, 10)]


def test_bad_layout_and_resume_point_are_clear():
    with pytest.raises(DataError, match="multiple of 8"):
        MicroBatchSampler(S, 2, data_parallel_size=4, global_batch_size=12)
    with pytest.raises(DataError, match="cannot resume at consumed samples 3"):
        MicroBatchSampler(S, 2, data_parallel_size=2, consumed_samples=3)
    with pytest.raises(DataError, match="empty"):
        MicroBatchSampler(0, 2)


def test_loaders_batch_items(tmp_path):
    x = np.arange(12 * 3 * 4 * 4, dtype=np.float32).reshape(12, 3, 4, 4)
    ds = TileDataset(open_source(write_npy(tmp_path / "x.npy", x)), img_h=4, img_w=4, split="all")
    loader = build_train_loader(ds, 2, data_parallel_rank=1, data_parallel_size=2, seed=5, global_batch_size=4)
    batch = next(iter(loader))
    assert batch["images"].shape == (2, 3, 4, 4) and batch["valid"].dtype == torch.bool
    want = global_batch(0, 4, 12, seed=5)[2:4]
    assert batch["index"].tolist() == want
    np.testing.assert_array_equal(batch["images"].numpy(), x[want])
    ev = build_eval_loader(ds, 4, num_micro_batches=4)
    seen = [b["index"].tolist() for b in ev]
    assert seen == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]  # 12 samples: no fourth, wrapped-around batch
    assert [b["index"].tolist() for b in ev] == seen  # the same batches at every evaluation


def test_worker_processes_give_the_same_batches(tmp_path):
    """Sources reopen their handles in DataLoader workers (h5py, memmaps must not cross a fork)."""
    from dchag.data.writers import write_hdf5

    x = np.random.default_rng(0).random((8, 5, 4, 4)).astype(np.float32)
    ds = TileDataset(open_source(write_hdf5(tmp_path / "x.h5", x)), img_h=4, img_w=4, split="all",
                     channels=range(1, 3))
    ref = [b["images"] for b in build_train_loader(ds, 2, seed=1, num_micro_batches=6)]
    got = [b["images"] for b in build_train_loader(ds, 2, seed=1, num_micro_batches=6, num_workers=2)]
    for a, b in zip(ref, got):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("n", [1, 5, 6, 7, 12, 13])
@pytest.mark.parametrize("m,D", [(1, 1), (4, 1), (2, 2), (4, 2), (3, 3)])
def test_eval_scores_each_held_out_sample_exactly_once_on_any_dp_size(n, m, D):
    """Written out: positions of step s on rank d are s*m*D + d*m + [0, m); every rank runs the same
    number of full micro-batches; the real positions are 0..n-1, each once, the rest padding."""
    from dchag.data.sampler import EvalSampler
    per_rank = [list(EvalSampler(n, m, data_parallel_rank=d, data_parallel_size=D)) for d in range(D)]
    steps = -(-n // (m * D))
    assert all(len(batches) == steps and all(len(b) == m for b in batches) for batches in per_rank)
    real = sorted(p for batches in per_rank for b in batches for p in b if p < n)
    assert real == list(range(n))


def test_padded_eval_batches_weigh_nothing_and_the_pooled_loss_counts_each_sample_once(tmp_path):
    """6 held-out tiles, micro-batch 4, DP 2 (one padded micro-batch of 4 and a half-padded one) or
    DP 1 with --eval-iters capping the score at 4: the pooled MAE error of predicting zeros, every
    patch hidden, equals numpy's mean of the squared values over each scored sample once."""
    from dchag.tasks.mae import error_sums
    x = np.random.default_rng(3).normal(size=(6, 3, 4, 4)).astype(np.float32)
    x[2, 1, 0, :] = np.nan  # invalid: out of the loss
    ds = TileDataset(open_source(write_npy(tmp_path / "v.npy", x)), img_h=4, img_w=4, split="all")

    def pooled(loaders):  # 4 patches of 2 x 2 per tile, all hidden
        s = sum(error_sums(torch.zeros_like(b["images"]), b["images"], b["valid"],
                           torch.ones(len(b["index"]), 4, dtype=torch.bool), (2, 2), 2)
                for loader in loaders for b in loader)
        return float(s[0] / s[1]), int(sum(int(b["scored"].sum()) for loader in loaders for b in loader))

    both_ranks = [build_eval_loader(ds, 4, data_parallel_rank=d, data_parallel_size=2) for d in range(2)]
    assert pooled(both_ranks) == (pytest.approx(float(np.nanmean(x.astype(np.float64) ** 2)), rel=1e-6), 6)
    assert pooled([build_eval_loader(ds, 2, num_micro_batches=2)]) == (
        pytest.approx(float(np.nanmean(x[:4].astype(np.float64) ** 2)), rel=1e-6), 4)
    padding = [b for loader in both_ranks for b in loader if not b["scored"].all()]
    assert padding and all(not b["valid"][~b["scored"]].any() for b in padding)
