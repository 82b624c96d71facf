"""Several data sources (sensors) over one model: which channel identities each rank tokenizes,
and which rank holds each identity's weights. Pure arithmetic, no process groups.

A blended run (``--data-path 0.4 A 0.3 B 0.3 C``) trains one model on sources with different band
sets. The model's channels are the *union* U of the sources' channel identities (a channel that
two sources share, by name or wavelength, is one channel of the model: dchag/data/identity.py);
each source s is the tuple of union ids of its channels, in the source's own order.

Per source, the channel stage runs exactly as for one source today:

- **slots**: the source's channels, or, when it has fewer than m G (m = 2^(k-1) sub-groups per
  group for a tree of k levels), its channels repeated so that every group has m of them: slot i
  holds channel floor(i C_s / (m G)). A 4-band camera under G = 8 thus feeds each group one band.
  Flat aggregation has no groups to fill (G = C_s: one token per channel).
- **groups and ranks**: the slots are grouped as one source's channels are
  (``ChannelPartition(len(slots), G, P)``: contiguous, sizes differing by at most one), and
  channel-parallel rank r tokenizes the slots of its G/P groups: ``rank_slots(s, r)``.

Per-identity weights (tokenizer rows, channel embedding, D-CHAG-L's first-level coefficient, the MAE
head's rows) exist once per union id. Each id has one **home** rank, the rank that tokenizes it in
the first source (in blend order) that has it; a rank holds the rows of its home ids only
(``home_ids(r)``, sorted), so the weights are sharded over the channel group with no duplicate, and
gradient norms and checkpoints count each row once. When source s puts id u on a rank that is not
u's home, that rank **borrows** u's rows for the step: ``borrowed(s)`` lists these ids (the same
list on every rank), their home ranks contribute them and one all-reduce over the channel group
gives every rank all of them; its backward all-reduces their gradients, so u's home row receives
the gradient of every use in every source.

With one source (``sources is None``) a rank's slots are exactly its home ids, contiguous, and
nothing is borrowed: the single-source model, unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from dchag.parallel.partition import ChannelPartition, LayoutError


def expand_slots(channel_ids: tuple[int, ...], groups: int, sub_groups: int = 1) -> tuple[int, ...]:
    """The source's channels, repeated (each in place) until every group holds ``sub_groups`` of them."""
    need = groups * sub_groups
    n = len(channel_ids)
    if n >= need:
        return tuple(channel_ids)
    return tuple(channel_ids[i * n // need] for i in range(need))


@dataclass(frozen=True)
class SourceLayout:
    """The channel stage's layout over sources for channel-parallel size P.

    ``num_channels``: |U|; ``sources``: per source, its union ids in its order (None: one source
    holding every channel in order); ``groups``: G (ignored by flat, whose groups are a source's
    channels); ``tree_levels``: k."""
    num_channels: int
    sources: tuple[tuple[int, ...], ...] | None
    groups: int
    channel_parallel_size: int = 1
    aggregation: str = "linear"
    tree_levels: int = 1

    def __post_init__(self):
        if self.sources is not None:
            seen = set()
            for s, ids in enumerate(self.sources):
                if not ids:
                    raise LayoutError(f"data source {s} has no channel.")
                bad = [u for u in ids if not 0 <= u < self.num_channels]
                if bad:
                    raise LayoutError(f"data source {s} names channel {bad[0]} outside the model's "
                                      f"{self.num_channels} channels.")
                seen.update(ids)
            if len(seen) != self.num_channels:
                missing = sorted(set(range(self.num_channels)) - seen)
                raise LayoutError(f"model channel {missing[0]} belongs to no data source: every channel of the "
                                  "model must come from a source.")
        for s in range(self.num_sources):
            self.partition(s)  # P | G (flat: P | C_s), checked up front

    # ---- per source ----------------------------------------------------------------------
    @property
    def num_sources(self) -> int:
        return 1 if self.sources is None else len(self.sources)

    def source_ids(self, source: int) -> tuple[int, ...]:
        """Union ids of the source's channels, in its order."""
        self._check_source(source)
        return tuple(range(self.num_channels)) if self.sources is None else tuple(self.sources[source])

    def slots(self, source: int) -> tuple[int, ...]:
        """Union ids of the source's slots (its channels, repeated when it has too few)."""
        ids = self.source_ids(source)
        if self.aggregation == "flat" or self.sources is None:
            return ids
        return expand_slots(ids, self.groups, 2 ** (self.tree_levels - 1))

    def source_slot_channels(self, source: int) -> tuple[int, ...]:
        """For each slot, the position of its channel in the source's own channel order (what the
        data reader reads; repeats where slots repeat)."""
        ids = self.source_ids(source)
        pos = {u: i for i, u in enumerate(ids)}
        return tuple(pos[u] for u in self.slots(source))

    def partition(self, source: int) -> ChannelPartition:
        n = len(self.slots(source))
        G = n if self.aggregation == "flat" else self.groups
        try:
            return ChannelPartition(n, G, self.channel_parallel_size)
        except LayoutError as e:
            if self.sources is None:
                raise
            raise LayoutError(f"data source {source} ({len(self.source_ids(source))} channels): {e}") from None

    def rank_slot_range(self, source: int, rank: int) -> range:
        """The slots (positions in ``slots(source)``) channel-parallel ``rank`` tokenizes."""
        return self.partition(source).rank_channels(rank)

    def rank_slots(self, source: int, rank: int) -> tuple[int, ...]:
        """Union ids of the slots ``rank`` tokenizes for ``source`` (in slot order; may repeat)."""
        slots = self.slots(source)
        return tuple(slots[i] for i in self.rank_slot_range(source, rank))

    def rank_source_channels(self, source: int, rank: int) -> tuple[int, ...]:
        """What ``rank`` reads of ``source``: positions in the source's own channel order, per slot."""
        per_slot = self.source_slot_channels(source)
        return tuple(per_slot[i] for i in self.rank_slot_range(source, rank))

    def scored_slots(self, source: int, rank: int) -> tuple[bool, ...]:
        """Per slot of ``rank``: True where the slot is its channel's first slot in the source, so a
        loss over the source's channels counts each channel once when slots repeat."""
        slots = self.slots(source)
        first = {}
        for i, u in enumerate(slots):
            first.setdefault(u, i)
        return tuple(first[slots[i]] == i for i in self.rank_slot_range(source, rank))

    # ---- homes and borrowing ---------------------------------------------------------------
    @cached_property
    def home(self) -> tuple[int, ...]:
        """Per union id, the channel-parallel rank that holds its weights."""
        home = [-1] * self.num_channels
        for s in range(self.num_sources):
            for r in range(self.channel_parallel_size):
                for u in self.rank_slots(s, r):
                    if home[u] < 0:
                        home[u] = r
        return tuple(home)

    def home_ids(self, rank: int) -> tuple[int, ...]:
        """Union ids whose rows ``rank`` holds, sorted (the rows of its per-identity parameters)."""
        return tuple(u for u, r in enumerate(self.home) if r == rank)

    def borrowed(self, source: int) -> tuple[int, ...]:
        """Union ids that some rank tokenizes for ``source`` without holding them, sorted; the
        same on every rank."""
        out = set()
        for r in range(self.channel_parallel_size):
            out.update(u for u in self.rank_slots(source, r) if self.home[u] != r)
        return tuple(sorted(out))

    def row_plan(self, source: int, rank: int) -> tuple[tuple[str, int], ...]:
        """Per slot of ``rank`` for ``source``: ("home", row in ``home_ids(rank)``) or
        ("borrowed", row in ``borrowed(source)``)."""
        home_row = {u: i for i, u in enumerate(self.home_ids(rank))}
        borrowed_row = {u: i for i, u in enumerate(self.borrowed(source))}
        return tuple(("home", home_row[u]) if u in home_row else ("borrowed", borrowed_row[u])
                     for u in self.rank_slots(source, rank))

    def contiguous_home_rows(self, source: int, rank: int) -> range | None:
        """The home rows of ``rank``'s slots when they are one contiguous run with nothing borrowed
        (always so with one source): a slice of the parameters suffices. Else None."""
        plan = self.row_plan(source, rank)
        if any(kind != "home" for kind, _ in plan):
            return None
        rows = [i for _, i in plan]
        if rows != list(range(rows[0], rows[0] + len(rows))):
            return None
        return range(rows[0], rows[0] + len(rows))

    def _check_source(self, source: int) -> None:
        if not 0 <= source < self.num_sources:
            raise LayoutError(f"data source {source} outside the model's {self.num_sources} source(s).")


def contiguous_range(ids) -> range | None:
    """``ids`` as a range when they are consecutive integers (a slice of rows), else None."""
    ids = tuple(ids)
    if ids and ids == tuple(range(ids[0], ids[0] + len(ids))):
        return range(ids[0], ids[0] + len(ids))
    return None


def runs(ids: tuple[int, ...] | list[int]) -> list[tuple[int, int]]:
    """Sorted ids as maximal runs [(start, stop), ...] (for checkpoint maps of a rank's home rows)."""
    out: list[list[int]] = []
    for u in ids:
        if out and out[-1][1] == u:
            out[-1][1] = u + 1
        else:
            out.append([u, u + 1])
    return [(a, b) for a, b in out]
