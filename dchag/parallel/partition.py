"""Which channels belong to which group, and which groups to which channel-parallel rank.

Pure arithmetic, no process groups: the model, the data loader and the tools all derive their
channel slices from here, so they can never disagree.

Channels are split into G contiguous groups whose sizes differ by at most one (the first
``C % G`` groups get one extra channel). Channel-parallel rank r of P owns the contiguous
groups ``[r*G/P, (r+1)*G/P)`` and therefore a contiguous channel range.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property


class LayoutError(ValueError):
    """An inconsistent model/parallel layout; the message names the problem and the fix."""


@dataclass(frozen=True)
class ChannelPartition:
    num_channels: int  # C
    num_groups: int  # G
    channel_parallel_size: int = 1  # P

    def __post_init__(self):
        C, G, P = self.num_channels, self.num_groups, self.channel_parallel_size
        if C < 1:
            raise LayoutError(f"--num-channels must be >= 1, got {C}.")
        if G < 1 or G > C:
            raise LayoutError(
                f"--dchag-groups {G} must be between 1 and --num-channels {C}: "
                "a group needs at least one channel.")
        if P < 1 or G % P != 0:
            raise LayoutError(
                f"--channel-parallel-size {P} must divide --dchag-groups {G} so every channel-parallel "
                f"rank owns the same number of groups; choose G as a multiple of P "
                f"(e.g. --dchag-groups {max(P, (G // P + 1) * P) if P >= 1 else G}).")

    @cached_property
    def group_sizes(self) -> tuple[int, ...]:
        base, extra = divmod(self.num_channels, self.num_groups)
        return tuple(base + (1 if g < extra else 0) for g in range(self.num_groups))

    @cached_property
    def group_starts(self) -> tuple[int, ...]:
        starts, s = [], 0
        for n in self.group_sizes:
            starts.append(s)
            s += n
        return tuple(starts)

    @property
    def groups_per_rank(self) -> int:
        return self.num_groups // self.channel_parallel_size

    def rank_groups(self, rank: int) -> range:
        """Global indices of the groups owned by channel-parallel ``rank``."""
        self._check_rank(rank)
        k = self.groups_per_rank
        return range(rank * k, (rank + 1) * k)

    def stream_chunks(self, chunk_size: int) -> int:
        """--dchag-channel-chunk K: how many chunks every channel rank streams its channels in
        (dchag/model/streaming.py). ceil(largest rank's channels / K), so no chunk exceeds K channels,
        but the same count on every rank (ZeRO-3 records the order of module calls and requires it
        to be identical on all ranks), and at most the smallest rank's channel count (no empty chunk)."""
        if chunk_size < 1:
            raise LayoutError(f"--dchag-channel-chunk must be >= 1 to stream (0 = off), got {chunk_size}.")
        counts = [len(self.rank_channels(r)) for r in range(self.channel_parallel_size)]
        return max(1, min(-(-max(counts) // chunk_size), min(counts)))

    def rank_channels(self, rank: int) -> range:
        """Global indices of the channels owned by channel-parallel ``rank`` (contiguous)."""
        groups = self.rank_groups(rank)
        start = self.group_starts[groups.start]
        stop = self.group_starts[groups.stop - 1] + self.group_sizes[groups.stop - 1]
        return range(start, stop)

    def group_of_channel(self) -> tuple[int, ...]:
        """Group index of each channel, length C."""
        return tuple(g for g, n in enumerate(self.group_sizes) for _ in range(n))

    def _check_rank(self, rank: int):
        if not 0 <= rank < self.channel_parallel_size:
            raise LayoutError(f"channel-parallel rank {rank} outside [0, {self.channel_parallel_size}).")


def validate_layout(world_size: int, tensor_model_parallel_size: int, channel_parallel_size: int) -> None:
    """Raise LayoutError naming the fix if (world, T, P) cannot be laid out (no process group needed)."""
    T, P = tensor_model_parallel_size, channel_parallel_size
    if T < 1 or P < 1:
        raise LayoutError(f"--tensor-model-parallel-size ({T}) and --channel-parallel-size ({P}) must be >= 1.")
    if world_size % T != 0:
        raise LayoutError(
            f"world size {world_size} is not divisible by --tensor-model-parallel-size {T}: "
            f"world = T x DP; launch a multiple of {T} processes or change T.")
    if T % P != 0:
        raise LayoutError(
            f"--channel-parallel-size {P} must divide --tensor-model-parallel-size {T}: the channel "
            f"group lies inside the TP group (P = T is the paper's layout).")
