"""The torch side of a blend (dchag/data/blend.py): one dataset over every source, the training
sampler that gives each step one source's next global batch, and evaluation over every source.

Items of a blend are a source's TileDataset items plus

    "source":         int64 []    the source's index in --data-path
    "channel_weight": float32 [c] per channel of this rank: 1 where the slot is its channel's first
                                  in the source, 0 on a repeat (a source with fewer channels than
                                  groups repeats its channels; the loss counts each once:
                                  ``SourceLayout.scored_slots``)

A micro-batch holds one source only (every micro-batch of a step reads the step's source), so
items stack as they do for one source.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .blend import BlendSchedule
from .errors import DataError
from .sampler import SampleOrder, _check_layout, build_eval_loader


class SourceItems(Dataset):
    """One split of one source of a blend: ``dataset``'s items, tagged (see the module)."""

    def __init__(self, dataset, source: int, channel_weight):
        self.dataset, self.source = dataset, int(source)
        self.channel_weight = torch.as_tensor([float(w) for w in channel_weight], dtype=torch.float32)
        self._source = torch.tensor(self.source, dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        return {**self.dataset[i], "source": self._source, "channel_weight": self.channel_weight}


class BlendedDataset(Dataset):
    """Every source's items of one split, indexed by (source, position in that source's split)."""

    def __init__(self, parts: list[SourceItems], names):
        self.parts, self.names = list(parts), tuple(names)

    @property
    def datasets(self) -> list:
        """The sources' TileDatasets, in --data-path order."""
        return [p.dataset for p in self.parts]

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)

    def __getitem__(self, key) -> dict:
        s, i = key
        return self.parts[s][i]


class BlendedMicroBatchSampler(Sampler[list[tuple[int, int]]]):
    """This DP rank's micro-batches of a blend, from ``consumed_samples`` on: step i reads source
    s(i) (``BlendSchedule``) and that source's stream positions n_s(i) B + [0, B), cut into
    micro-steps and DP ranks as ``dchag.data.sampler`` cuts one source's global batch. Yields lists
    of (source, sample position) pairs; endless unless ``num_steps``."""

    def __init__(self, sizes, weights, micro_batch_size: int, *, global_batch_size: int, data_parallel_rank: int = 0,
                 data_parallel_size: int = 1, seed: int = 0, consumed_samples: int = 0, num_steps: int | None = None):
        _check_layout(global_batch_size, micro_batch_size, data_parallel_size, data_parallel_rank)
        if consumed_samples < 0 or consumed_samples % global_batch_size:
            raise DataError(f"cannot resume a blend at consumed samples {consumed_samples}: it must be a multiple of "
                            f"the global batch size {global_batch_size} (each step reads one source). Resume from a "
                            "checkpoint of this run.")
        self.schedule = BlendSchedule(weights)
        if len(sizes) != self.schedule.num_sources:
            raise ValueError(f"{len(sizes)} sources but {self.schedule.num_sources} weights")
        self.orders = [SampleOrder(n, (seed, s)) for s, n in enumerate(sizes)]
        self.m, self.d, self.D, self.B = micro_batch_size, data_parallel_rank, data_parallel_size, global_batch_size
        self.k = global_batch_size // (micro_batch_size * data_parallel_size)
        self.start_step = consumed_samples // global_batch_size
        self.num_steps = num_steps

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.start_step
        counts = self.schedule.counts_before(step)
        while self.num_steps is None or step < self.start_step + self.num_steps:
            s = self.schedule.source_at(step)
            base = counts[s] * self.B
            for j in range(self.k):
                start = base + (j * self.D + self.d) * self.m
                yield [(s, i) for i in self.orders[s](start, self.m)]
            counts[s] += 1
            step += 1

    def __len__(self) -> int:
        if self.num_steps is None:
            raise TypeError("an endless BlendedMicroBatchSampler has no length; pass num_steps")
        return self.num_steps * self.k


def blend_global_batch(step: int, weights, sizes, global_batch_size: int, seed: int = 0) -> tuple[int, list[int]]:
    """(source, sample positions) of the whole global batch of ``step``: a function of the weights,
    the seed and the step (= consumed samples / global batch size) only."""
    schedule = BlendSchedule(weights)
    s = schedule.source_at(step)
    start = schedule.counts_before(step)[s] * global_batch_size
    return s, SampleOrder(sizes[s], (seed, s))(start, global_batch_size)


def build_blended_train_loader(dataset: BlendedDataset, weights, micro_batch_size: int, *, global_batch_size: int,
                               data_parallel_rank: int = 0, data_parallel_size: int = 1, seed: int = 0,
                               consumed_samples: int = 0, num_workers: int = 0,
                               num_steps: int | None = None) -> DataLoader:
    """Endless loader of this DP rank's blended micro-batches, resuming at ``consumed_samples``;
    iterate it k = global_batch_size / (m D) times per step (every micro-batch of a step is one source)."""
    sampler = BlendedMicroBatchSampler([len(p) for p in dataset.parts], weights, micro_batch_size,
                                       global_batch_size=global_batch_size, data_parallel_rank=data_parallel_rank,
                                       data_parallel_size=data_parallel_size, seed=seed,
                                       consumed_samples=consumed_samples, num_steps=num_steps)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, persistent_workers=num_workers > 0,
                      generator=torch.Generator().manual_seed(seed))


class BlendedEval:
    """Evaluation over every source's held-out split: each source's loader (``build_eval_loader``:
    every held-out sample once, on any DP size) in turn, so each micro-batch holds one source."""

    def __init__(self, dataset: BlendedDataset, micro_batch_size: int, *, data_parallel_rank: int = 0,
                 data_parallel_size: int = 1, num_micro_batches: int | None = None, num_workers: int = 0):
        self.dataset = dataset
        self.loaders = {s: build_eval_loader(part, micro_batch_size, data_parallel_rank=data_parallel_rank,
                                             data_parallel_size=data_parallel_size,
                                             num_micro_batches=num_micro_batches, num_workers=num_workers)
                        for s, part in enumerate(dataset.parts) if len(part)}

    def __iter__(self):
        for loader in self.loaders.values():
            yield from loader

    def of_source(self, source: int):
        """The held-out batches of one source."""
        yield from self.loaders.get(source, ())

    def __len__(self) -> int:
        return sum(len(loader) for loader in self.loaders.values())


def build_blend(args, cfg, channel_rank: int, data_parallel_rank: int, data_parallel_size: int,
                consumed_samples: int):
    """(train loader, valid factory) of a blended run (``args.data_sources``, set by the pre-flight):
    per source its datasets over the channels this channel-parallel rank reads of it
    (``SourceLayout.rank_source_channels``), its own statistics and held-out split; the factory's
    ``dataset`` is the held-out BlendedDataset (for the callbacks)."""
    from .build import build_datasets
    layout = cfg.source_layout(args.channel_parallel_size)
    train_parts, valid_parts = [], []
    for s, rec in enumerate(args.data_sources):
        channels = layout.rank_source_channels(s, channel_rank)
        train, valid = build_datasets(rec["path"], args.data_format, task="mae", img_h=args.img_h, img_w=args.img_w,
                                      channels=channels, num_channels=rec["num_channels"],
                                      valid_fraction=args.valid_fraction, strict=args.data_strict, seed=args.seed)
        weight = layout.scored_slots(s, channel_rank)
        train_parts.append(SourceItems(train, s, weight))
        valid_parts.append(SourceItems(valid, s, weight))
    names = [rec["name"] for rec in args.data_sources]
    train_ds, valid_ds = BlendedDataset(train_parts, names), BlendedDataset(valid_parts, names)
    train = build_blended_train_loader(train_ds, [rec["weight"] for rec in args.data_sources], args.micro_batch_size,
                                       global_batch_size=args.global_batch_size,
                                       data_parallel_rank=data_parallel_rank, data_parallel_size=data_parallel_size,
                                       seed=args.seed, consumed_samples=consumed_samples, num_workers=args.num_workers)
    k = args.global_batch_size // (args.micro_batch_size * data_parallel_size)
    eval_iters = getattr(args, "eval_iters", None)

    def valid():
        return BlendedEval(valid_ds, args.micro_batch_size, data_parallel_rank=data_parallel_rank,
                           data_parallel_size=data_parallel_size,
                           num_micro_batches=None if eval_iters is None else eval_iters * k)
    valid.dataset = valid_ds
    return train, valid
