"""Per-identity parameters (a *bank*) and the rows a rank's slots take from them, per data source.

A per-identity parameter (the tokenizer's weight, bias and channel embedding, D-CHAG-L's
first-level coefficients, the MAE head's rows) holds on channel-parallel rank r the rows of its
*home* ids only (``SourceLayout.home_ids(r)``, sorted: dchag/parallel/sources.py), so each
identity is held once over the channel group. For data source s the rank's slots
(``rank_slots(s, r)``) take

    home rows       from the rank's own parameter: a slice when they are one run of its rows
                    (always so with one source: the single-source model's code path), else an
                    index_select
    borrowed rows   from the ``borrowed(s)`` rows [n_b, ...]: each home rank fills in the rows it
                    holds (zeros elsewhere) and one all-reduce over the channel group gives every
                    rank all of them (``share_over_channel_parallel_region``); its backward
                    all-reduces the gradient, so a home row receives the gradient of every
                    rank's use of it

A slot that repeats (a source with fewer channels than groups) takes its row again; the
index_select's backward adds the repeats' gradients into that one row.

The modules call :func:`lend` and :func:`take` inside their own forward, where ZeRO-3 has
gathered their parameters. ``n_b`` is the same on every rank, so every rank joins the collective
(or none does).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dchag.parallel.comm import share_over_channel_parallel_region
from dchag.parallel.sources import SourceLayout, contiguous_range


@dataclass(frozen=True)
class RowPlan:
    """For one source and one rank: where each of the rank's slots finds its row."""
    home: tuple[int, ...]  # per slot: its row in the rank's parameter, -1 when borrowed
    borrowed: tuple[int, ...]  # per slot: its row in the borrowed rows, -1 when at home
    lend_rows: tuple[int, ...]  # the rank's rows that other ranks borrow ...
    lend_at: tuple[int, ...]  # ... and where they go in the borrowed rows
    num_borrowed: int  # len(SourceLayout.borrowed(s)): the same on every rank (0: no collective)
    _pieces: dict = field(default_factory=dict, init=False, repr=False, compare=False, hash=False)

    @classmethod
    def whole(cls, rows: int) -> "RowPlan":
        """One source: slot i is row i, nothing borrowed."""
        return cls(tuple(range(rows)), (-1,) * rows, (), (), 0)

    @classmethod
    def of(cls, layout: SourceLayout, source: int, rank: int) -> "RowPlan":
        plan = layout.row_plan(source, rank)
        borrowed = layout.borrowed(source)
        home_row = {u: i for i, u in enumerate(layout.home_ids(rank))}
        lent = [(home_row[u], j) for j, u in enumerate(borrowed) if u in home_row]
        return cls(tuple(i if kind == "home" else -1 for kind, i in plan),
                   tuple(i if kind == "borrowed" else -1 for kind, i in plan),
                   tuple(i for i, _ in lent), tuple(j for _, j in lent), len(borrowed))

    @property
    def num_slots(self) -> int:
        return len(self.home)

    def pieces(self, slots: range) -> tuple:
        """How ``slots`` take their rows: ("slice", start, stop) of the rank's rows, or
        ("index", home rows, borrowed rows, order): the home slots' rows, the borrowed slots'
        rows, and per slot its position in the two concatenated (None: already in order)."""
        key = (slots.start, slots.stop)
        if key not in self._pieces:
            home, borrowed = self.home[slots.start:slots.stop], self.borrowed[slots.start:slots.stop]
            run = contiguous_range(home) if min(home, default=-1) >= 0 else None
            if run is not None:
                self._pieces[key] = ("slice", run.start, run.stop)
            else:
                at_home = [i for i, h in enumerate(home) if h >= 0]
                away = [i for i, b in enumerate(borrowed) if b >= 0]
                position = {slot: k for k, slot in enumerate(at_home + away)}
                order = [position[i] for i in range(len(home))]
                self._pieces[key] = ("index", tuple(home[i] for i in at_home), tuple(borrowed[i] for i in away),
                                     None if order == list(range(len(home))) else tuple(order))
        return self._pieces[key]


@dataclass(frozen=True)
class Bank:
    """The rows one rank holds of every per-identity parameter, and per source how its slots take them."""
    ids: range | tuple[int, ...]  # the union ids whose rows the rank holds (its home ids), sorted
    global_rows: int  # |U|
    plans: tuple[RowPlan, ...]  # per source

    @classmethod
    def of(cls, layout: SourceLayout, rank: int) -> "Bank":
        ids = layout.home_ids(rank)
        ids = contiguous_range(ids) or ids
        if layout.sources is None:  # one source: the rank's channels are its rows, in order
            return cls(ids, layout.num_channels, (RowPlan.whole(len(ids)),))
        return cls(ids, layout.num_channels, tuple(RowPlan.of(layout, s, rank) for s in range(layout.num_sources)))


def _index(rows: tuple[int, ...], device) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long, device=device)


def lend(params: tuple[torch.Tensor, ...] | list[torch.Tensor], plan: RowPlan) -> list[torch.Tensor] | None:
    """The rows of ``params`` borrowed for the plan's source, [n_b, ...] each, on every rank: one
    all-reduce over the channel group for all of them (every rank calls it). None when nothing is
    borrowed."""
    if not plan.num_borrowed:
        return None
    first = params[0]
    width = [int(torch.Size(p.shape[1:]).numel()) for p in params]
    # (Also when the rank lends no row: the empty selection keeps its parameters in the graph, so
    # they get a (zero) gradient as on one rank, and AdamW decays them alike.)
    rows = _index(plan.lend_rows, first.device)
    mine = torch.cat([p.index_select(0, rows).reshape(len(plan.lend_rows), w) for p, w in zip(params, width)], 1)
    contribution = first.new_zeros(plan.num_borrowed, sum(width)).index_copy(0, _index(plan.lend_at, first.device), mine)
    shared = share_over_channel_parallel_region(contribution)
    return [t.reshape((plan.num_borrowed,) + tuple(p.shape[1:])) for t, p in zip(shared.split(width, 1), params)]


def take(param: torch.Tensor, plan: RowPlan, slots: range | None = None, borrowed: torch.Tensor | None = None,
         sink=None) -> torch.Tensor:
    """The rows of the rank's ``slots`` (positions in its slot list for the plan's source; default
    all of them), [len(slots), ...]. ``borrowed``: :func:`lend`'s rows of this parameter;
    ``sink``: the streamed stage's ChunkGradSink (dchag/model/streaming.py), keyed by ``slots``.

    When the source borrows anything, every rank takes a (possibly empty) selection of the
    borrowed rows, so that every rank's backward reaches the all-reduce of their gradient, in the
    same order: a rank whose slots all lie at home would otherwise skip it and hang the others."""
    slots = range(plan.num_slots) if slots is None else slots
    kind, *rest = plan.pieces(slots)
    key = (slots.start, slots.stop)
    if kind == "slice":
        start, stop = rest
        if sink is not None:
            rows = sink.rows(param, start, stop)
        else:
            rows = param if (start, stop) == (0, param.shape[0]) else param[start:stop]
        if not plan.num_borrowed:
            return rows
        home, lent, order = None, (), None
    else:
        home, lent, order = rest
        rows = _select(param, _index(home, param.device), key, sink)
    if plan.num_borrowed:
        if borrowed is None:
            raise RuntimeError("data source borrows rows from other ranks: call lend() first (a collective)")
        rows = torch.cat([rows, _select(borrowed, _index(lent, param.device), key, sink)])
    return rows if order is None else rows.index_select(0, _index(order, param.device))


def _select(t: torch.Tensor, index: torch.Tensor, key, sink) -> torch.Tensor:
    return t.index_select(0, index) if sink is None else sink.index(t, key, index)
