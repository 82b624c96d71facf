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
    assert seen[:3] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]] and seen[3] == [0, 1, 2, 3]
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
