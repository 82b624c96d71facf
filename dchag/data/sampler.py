"""Data order as a function of (seed, position) only -- never of the parallel layout.

The training stream is an endless sequence of sample ids: epoch e is a permutation of
[0, num_samples) drawn from ``np.random.default_rng([seed, e])`` (or the identity when not
shuffling), and stream position p is sample ``perm_{p // S}[p % S]``. Iteration i consumes
positions [i*B, (i+1)*B) with B = global batch size, so *the global batch of an iteration is a
fixed set of samples whatever the layout*.

Within it, micro-step j of gradient accumulation covers positions i*B + j*m*D + [0, m*D),
and data-parallel rank d of D takes [d*m, (d+1)*m) of that (m = micro-batch size; B = m*D*k).
Ranks of one channel-parallel / tensor-parallel group share their DP rank and therefore get
the same samples. Changing D (and k, keeping B) only redistributes a global batch.

Evaluation reads the held-out split in storage order and scores each sample exactly once on any
DP size (``build_eval_loader``): the last micro-batches are padded with copies whose validity
masks are False, so they weigh nothing (the losses and metrics pool sums of weights).

Resuming: start at ``consumed_samples`` (the number of samples of all finished iterations,
as Megatron counts it) and the rest of the stream is exactly what the uninterrupted run saw.
"""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .errors import DataError


class SampleOrder:
    """Stream position -> sample id, for one (num_samples, seed, shuffle)."""

    def __init__(self, num_samples: int, seed: int | tuple = 0, shuffle: bool = True):
        if num_samples < 1:
            raise DataError("the data split is empty: no sample to draw; use more data, smaller --img-h/--img-w, "
                            "or a different validation fraction.")
        # seed: an int, or a tuple (a blend's source s streams with (seed, s): dchag/data/blend.py)
        seed = tuple(int(x) for x in seed) if isinstance(seed, (tuple, list)) else (int(seed),)
        self.num_samples, self.seed, self.shuffle = int(num_samples), seed, bool(shuffle)
        self._epoch, self._perm = -1, None

    def permutation(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_samples)
        if epoch != self._epoch:  # cache one epoch: consecutive positions hit the same one
            self._perm = np.random.default_rng([*self.seed, int(epoch)]).permutation(self.num_samples)
            self._epoch = epoch
        return self._perm

    def __call__(self, start: int, count: int) -> list[int]:
        """Sample ids at stream positions [start, start + count)."""
        out = []
        p, end = int(start), int(start) + int(count)
        while p < end:
            epoch, off = divmod(p, self.num_samples)
            take = min(end - p, self.num_samples - off)
            out.extend(int(s) for s in self.permutation(epoch)[off:off + take])
            p += take
        return out


def global_batch(iteration: int, global_batch_size: int, num_samples: int, seed: int = 0,
                 shuffle: bool = True) -> list[int]:
    """Sample ids of the whole global batch of ``iteration`` (0-based), in order."""
    return SampleOrder(num_samples, seed, shuffle)(iteration * global_batch_size, global_batch_size)


def micro_batch(iteration: int, micro_step: int, *, global_batch_size: int, micro_batch_size: int,
                data_parallel_rank: int, data_parallel_size: int, num_samples: int, seed: int = 0,
                shuffle: bool = True) -> list[int]:
    """Sample ids of DP rank d's micro-batch ``micro_step`` in ``iteration``."""
    _check_layout(global_batch_size, micro_batch_size, data_parallel_size, data_parallel_rank)
    start = iteration * global_batch_size + (micro_step * data_parallel_size + data_parallel_rank) * micro_batch_size
    return SampleOrder(num_samples, seed, shuffle)(start, micro_batch_size)


def _check_layout(global_batch_size, micro_batch_size, data_parallel_size, data_parallel_rank=0):
    if micro_batch_size < 1 or data_parallel_size < 1:
        raise DataError(f"--micro-batch-size ({micro_batch_size}) and the data-parallel size ({data_parallel_size}) "
                        "must be >= 1.")
    if not 0 <= data_parallel_rank < data_parallel_size:
        raise DataError(f"data-parallel rank {data_parallel_rank} outside [0, {data_parallel_size}).")
    if global_batch_size is not None and global_batch_size % (micro_batch_size * data_parallel_size):
        raise DataError(
            f"--global-batch-size {global_batch_size} is not a multiple of --micro-batch-size {micro_batch_size} x "
            f"data-parallel size {data_parallel_size}; choose a global batch size that is a multiple of "
            f"{micro_batch_size * data_parallel_size}.")


class MicroBatchSampler(Sampler[list[int]]):
    """Batch sampler: yields this DP rank's micro-batches (lists of m sample ids), from
    ``consumed_samples`` on, for ``num_micro_batches`` steps (None = endless)."""

    def __init__(self, num_samples: int, micro_batch_size: int, *, data_parallel_rank: int = 0,
                 data_parallel_size: int = 1, seed: int = 0, consumed_samples: int = 0, shuffle: bool = True,
                 global_batch_size: int | None = None, num_micro_batches: int | None = None):
        _check_layout(global_batch_size, micro_batch_size, data_parallel_size, data_parallel_rank)
        step = micro_batch_size * data_parallel_size
        if consumed_samples < 0 or consumed_samples % step:
            raise DataError(
                f"cannot resume at consumed samples {consumed_samples}: it must be a multiple of micro-batch size x "
                f"data-parallel size = {step} (a whole number of micro-steps). Resume from a checkpoint of this run "
                "or restart the data order.")
        self.order = SampleOrder(num_samples, seed, shuffle)
        self.m, self.d, self.D = micro_batch_size, data_parallel_rank, data_parallel_size
        self.consumed_samples = int(consumed_samples)
        self.num_micro_batches = num_micro_batches

    def __iter__(self) -> Iterator[list[int]]:
        pos = self.consumed_samples
        j = 0
        while self.num_micro_batches is None or j < self.num_micro_batches:
            yield self.order(pos + self.d * self.m, self.m)
            pos += self.m * self.D
            j += 1

    def __len__(self) -> int:
        if self.num_micro_batches is None:
            raise TypeError("an endless MicroBatchSampler has no length; pass num_micro_batches")
        return self.num_micro_batches


def build_train_loader(dataset, micro_batch_size: int, *, data_parallel_rank: int = 0, data_parallel_size: int = 1,
                       seed: int = 0, consumed_samples: int = 0, global_batch_size: int | None = None,
                       num_workers: int = 0, num_micro_batches: int | None = None) -> DataLoader:
    """Endless shuffled loader of this DP rank's micro-batches, resuming at ``consumed_samples``.
    Iterate it k = global_batch_size / (m * D) times per iteration."""
    sampler = MicroBatchSampler(len(dataset), micro_batch_size, data_parallel_rank=data_parallel_rank,
                                data_parallel_size=data_parallel_size, seed=seed, consumed_samples=consumed_samples,
                                shuffle=True, global_batch_size=global_batch_size,
                                num_micro_batches=num_micro_batches)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                      persistent_workers=num_workers > 0, generator=torch.Generator().manual_seed(seed))


def eval_scored(num_samples: int, micro_batch_size: int, data_parallel_size: int,
                num_micro_batches: int | None = None) -> int:
    """How many held-out samples an evaluation scores: all of them, or the first
    ``num_micro_batches`` x micro-batch x DP of them (--eval-iters global batches) if fewer."""
    if num_micro_batches is None:
        return num_samples
    return min(num_samples, num_micro_batches * micro_batch_size * data_parallel_size)


class EvalSampler(Sampler[list[int]]):
    """This DP rank's evaluation micro-batches: positions in storage order, each of the first
    ``scored`` samples on exactly one rank, once. Step s gives rank d the positions
    s*m*D + d*m + [0, m); positions >= ``scored`` are padding (``PaddedEval``), so every rank runs
    the same number of full-size micro-batches (ZeRO 3 gathers parameters collectively)."""

    def __init__(self, scored: int, micro_batch_size: int, *, data_parallel_rank: int = 0,
                 data_parallel_size: int = 1):
        _check_layout(None, micro_batch_size, data_parallel_size, data_parallel_rank)
        self.scored, self.m, self.d, self.D = int(scored), micro_batch_size, data_parallel_rank, data_parallel_size
        self.steps = math.ceil(self.scored / (self.m * self.D))

    def __iter__(self) -> Iterator[list[int]]:
        for s in range(self.steps):
            start = (s * self.D + self.d) * self.m
            yield list(range(start, start + self.m))

    def __len__(self) -> int:
        return self.steps


class PaddedEval(Dataset):
    """The first ``scored`` items of ``dataset``, each with ``scored = True``; a position past them
    is padding: a copy of item 0 whose validity masks (``valid``, ``target_valid``) are all False,
    so it weighs nothing in a loss or metric, with ``scored = False``."""

    MASK_KEYS = ("valid", "target_valid")

    def __init__(self, dataset, scored: int):
        self.dataset, self.scored = dataset, int(scored)

    def __len__(self) -> int:
        return self.scored

    def __getitem__(self, position: int) -> dict:
        if position < self.scored:
            return {**self.dataset[position], "scored": torch.tensor(True)}
        item = dict(self.dataset[0])
        for key in self.MASK_KEYS:
            if key in item:
                item[key] = torch.zeros_like(item[key])
        return {**item, "scored": torch.tensor(False)}


def build_eval_loader(dataset, micro_batch_size: int, *, data_parallel_rank: int = 0, data_parallel_size: int = 1,
                      num_micro_batches: int | None = None, num_workers: int = 0) -> DataLoader:
    """The held-out split in storage order, each sample scored exactly once on any DP size: all of
    it, or the first ``num_micro_batches`` x m x DP samples (``--eval-iters`` x k steps); the last
    micro-batches are padded with masked copies (``scored`` False). The same batches at every
    evaluation: build it (or re-iterate it) once per evaluation."""
    scored = eval_scored(len(dataset), micro_batch_size, data_parallel_size, num_micro_batches)
    sampler = EvalSampler(scored, micro_batch_size, data_parallel_rank=data_parallel_rank,
                          data_parallel_size=data_parallel_size)
    return DataLoader(PaddedEval(dataset, scored), batch_sampler=sampler, num_workers=num_workers)
