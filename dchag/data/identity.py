"""A channel is an identity, not a position: matching channels of two band lists exactly.

A channel's identity is its name (when the data gave one: a generated name, ``chNNN`` or
``NNN.NNnm``, says only where a channel sits, ``readers.base.is_generated_name``) and its wavelength
in nm (where it has one). Two channels are the same channel when (first rule that applies)

1. both have a real name and the names are equal                          -> "name"
2. both have a wavelength and the two are equal within 1e-3 nm            -> "wavelength"

This is the exact part of the fine-tuning match (dchag/transfer/channels.py, which also
interpolates between bands); blends (one model channel per identity over all sources) and
prediction (an input's channels reordered to the model's) use it as it is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from .errors import DataError
from .readers.base import is_generated_name

WAVELENGTH_TOLERANCE_NM = 1e-3


@dataclass(frozen=True)
class ChannelId:
    name: str | None  # None: no name, or a generated one
    wavelength: float | None  # nm; None: none

    @property
    def known(self) -> bool:
        """Whether the channel can be matched at all (a real name or a wavelength)."""
        return self.name is not None or self.wavelength is not None

    def describe(self) -> str:
        parts = ([repr(self.name)] if self.name is not None else []) + \
            ([f"{self.wavelength:g} nm"] if self.wavelength is not None else [])
        return " at ".join(parts) if parts else "an unnamed channel"


def channel_ids(names: Sequence | None, wavelengths: Sequence | None, count: int | None = None) -> list[ChannelId]:
    """ChannelIds from parallel lists (either may be None; generated names and non-finite
    wavelengths carry no identity)."""
    n = count if count is not None else len(names if names is not None else wavelengths or [])
    out = []
    for i in range(n):
        name = None if names is None else names[i]
        name = None if name is None or is_generated_name(str(name)) else str(name)
        lam = None if wavelengths is None else wavelengths[i]
        lam = None if lam is None or not math.isfinite(float(lam)) else float(lam)
        out.append(ChannelId(name, lam))
    return out


class IdentityIndex:
    """Looks channels up among ``known`` by name, then by wavelength (the module's rules)."""

    def __init__(self, known: Sequence[ChannelId]):
        self.known = list(known)
        self._by_name: dict[str, int] = {}
        self._by_lambda: list[tuple[float, int]] = []
        for i, c in enumerate(self.known):
            self._add(i, c)

    def _add(self, i: int, c: ChannelId) -> None:
        if c.name is not None:
            self._by_name.setdefault(c.name, i)
        if c.wavelength is not None:
            self._by_lambda.append((c.wavelength, i))

    def append(self, c: ChannelId) -> int:
        self.known.append(c)
        self._add(len(self.known) - 1, c)
        return len(self.known) - 1

    def find(self, c: ChannelId, exclude: set | frozenset = frozenset()) -> tuple[int, str] | None:
        """(index, "name" | "wavelength") of the channel ``c`` is, or None."""
        if c.name is not None and c.name in self._by_name and self._by_name[c.name] not in exclude:
            return self._by_name[c.name], "name"
        if c.wavelength is not None:
            best = None
            for lam, i in self._by_lambda:
                d = abs(lam - c.wavelength)
                if d <= WAVELENGTH_TOLERANCE_NM and i not in exclude and (best is None or d < best[0]):
                    best = (d, i)
            if best is not None:
                return best[1], "wavelength"
        return None


def union_of(sources: Sequence[Sequence[ChannelId]], labels: Sequence[str] | None = None
             ) -> tuple[list[ChannelId], list[tuple[int, ...]]]:
    """The channels of several sources as one list: (union, per source its union ids in its order).

    Sources are taken in order; a channel that is the same channel (module rules) as one already in
    the union is that one, else it is appended. Within one source two channels are never merged.
    A source whose channels carry no identity, beside a source whose do, is refused: nothing says
    which of the others' channels it shares."""
    labels = list(labels) if labels is not None else [f"source {s}" for s in range(len(sources))]
    if len(sources) > 1:
        blind = [labels[s] for s, chans in enumerate(sources) if not any(c.known for c in chans)]
        if blind:
            raise DataError(
                f"{', '.join(blind)}: its channels have neither names nor wavelengths, so nothing says which channels "
                "it shares with the other sources of the blend. Give it a sidecar JSON beside the file "
                "(FILE.channels.json: {\"names\": [...], \"wavelengths\": [...]}, or a list of names), or train it "
                "alone.")
    index = IdentityIndex([])
    ids = []
    for chans in sources:
        taken: set[int] = set()
        mine = []
        for c in chans:
            hit = index.find(c, exclude=taken) if c.known else None
            u = hit[0] if hit is not None else index.append(c)
            taken.add(u)
            mine.append(u)
        ids.append(tuple(mine))
    return index.known, ids


def match_to(model: Sequence[ChannelId], given: Sequence[ChannelId]) -> tuple[list[int | None], list[str], list[int]]:
    """Where each of the model's channels is in ``given``: (per model channel the index in
    ``given`` or None when missing, per model channel how it matched ("name", "wavelength" or
    "missing"), the indices of ``given`` no model channel uses)."""
    index = IdentityIndex(given)
    where, how, used = [], [], set()
    for c in model:
        hit = index.find(c, exclude=used) if c.known else None
        if hit is None:
            where.append(None)
            how.append("missing")
        else:
            where.append(hit[0])
            how.append(hit[1])
            used.add(hit[0])
    return where, how, [i for i in range(len(given)) if i not in used]
