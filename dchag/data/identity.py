"""A channel is an identity, not a position: matching channels of two band lists exactly.

A channel's identity is its name (when the data gave one: a generated name, ``chNNN`` or
``NNN.NNnm``, says only where a channel sits, ``readers.base.is_generated_name``) and its wavelength
in nm (where it has one). Two channels are the same channel when (first rule that applies)

1. both have a real name and the names are equal                          -> "name"
2. both have a wavelength and the two are equal within 1e-3 nm            -> "wavelength"

This is the exact part of the fine-tuning match (dchag/transfer/channels.py, which also
interpolates between bands); blends (one model channel per identity over all sources) and
prediction (an input's channels reordered to the model's) use it as it is.

Two checks guard every match (:func:`channel_ids`, :func:`union_of`, :func:`match_to`, the
fine-tune's match):

* **A name that contradicts its wavelength.** Two channels of the same name whose wavelengths are
  further apart than the bands' width (the wider of the two where known, else
  ``DEFAULT_WIDTH_NM`` = 20 nm) are not obviously the same channel (a band named ``B05`` at 865 nm
  against ``B05`` at 705 nm): refused, naming both, unless ``prefer`` says which to trust
  (``--match-channels``): ``"name"`` (the names stand: the match by name is taken),
  ``"wavelength"`` (the wavelengths stand: the name is ignored for that pair, rule 2 decides).
* **Wavelength units.** dchag's wavelengths are nanometres, from the far ultraviolet to the
  thermal infrared: ``PLAUSIBLE_NM`` = 100-20,000 nm (every optical and thermal band of an imaging
  sensor: Sentinel-2 443-2,190 nm, Landsat TIRS up to 12.5 µm, MODIS up to 14.4 µm). A value
  below 100 can only be micrometres (400 nm is 0.4 µm; nothing images below 100 nm), one above
  20,000 can only be ångström (visible light is 4,000-7,000 Å): refused, naming the unit and the
  factor. Channels with no wavelength (weather variables, radar) give none.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Sequence

from .errors import DataError
from .readers.base import is_generated_name

WAVELENGTH_TOLERANCE_NM = 1e-3
DEFAULT_WIDTH_NM = 20.0  # a band's width where the data does not give one (a name/wavelength contradiction)
PLAUSIBLE_NM = (100.0, 20_000.0)  # far ultraviolet .. thermal infrared
PREFER = ("name", "wavelength")  # --match-channels: which identity stands when a name contradicts its wavelength


@dataclass(frozen=True)
class ChannelId:
    name: str | None  # None: no name, or a generated one
    wavelength: float | None  # nm; None: none
    width: float | None = None  # nm (full width at half maximum); None: not known

    @property
    def known(self) -> bool:
        """Whether the channel can be matched at all (a real name or a wavelength)."""
        return self.name is not None or self.wavelength is not None

    def describe(self) -> str:
        parts = ([repr(self.name)] if self.name is not None else []) + \
            ([f"{self.wavelength:g} nm"] if self.wavelength is not None else [])
        return " at ".join(parts) if parts else "an unnamed channel"


def _finite(value) -> float | None:
    return None if value is None or not math.isfinite(float(value)) else float(value)


def channel_ids(names: Sequence | None, wavelengths: Sequence | None, count: int | None = None, *,
                widths: Sequence | None = None, where: str = "the data") -> list[ChannelId]:
    """ChannelIds from parallel lists (any may be None; generated names and non-finite values carry
    no identity); wavelengths in another unit than nm are refused (:func:`check_units`, naming
    ``where``)."""
    n = count if count is not None else len(names if names is not None else wavelengths or [])
    out = []
    for i in range(n):
        name = None if names is None else names[i]
        name = None if name is None or is_generated_name(str(name)) else str(name)
        lam = None if wavelengths is None else _finite(wavelengths[i])
        width = None if widths is None else _finite(widths[i])
        out.append(ChannelId(name, lam, width if width is not None and width > 0 else None))
    check_units(out, where)
    return out


def check_units(channels: Sequence[ChannelId], where: str = "the data") -> None:
    """Refuse wavelengths that can only be micrometres or ångström (the module docstring)."""
    lams = [c.wavelength for c in channels if c.wavelength is not None]
    if not lams:
        return
    low, high = min(lams), max(lams)
    lo_nm, hi_nm = PLAUSIBLE_NM
    if low <= 0:
        raise DataError(f"{where}: a wavelength of {low:g} is not a wavelength; give each channel's centre wavelength "
                        "in nm (or none for a channel that has no wavelength).")
    if low < lo_nm:
        unit, fix = ("micrometres", "multiply them by 1,000") if high < lo_nm else \
            ("a mix of units", "give every value in nm")
        raise DataError(f"{where}: wavelengths {low:g}-{high:g} are not nanometres ({lo_nm:,.0f}-{hi_nm:,.0f} nm covers "
                        f"every imaging band); {low:g} can only be {unit}: {fix}.")
    if high > hi_nm:
        unit, fix = ("ångström", "divide them by 10") if low > hi_nm / 10 else ("a mix of units", "give every value in nm")
        raise DataError(f"{where}: wavelengths {low:g}-{high:g} are not nanometres ({lo_nm:,.0f}-{hi_nm:,.0f} nm covers "
                        f"every imaging band); {high:g} can only be {unit}: {fix}.")


def name_tolerance_nm(a: ChannelId, b: ChannelId) -> float:
    """How far apart the wavelengths of two channels of one name may lie: the wider band's width,
    else ``DEFAULT_WIDTH_NM``."""
    widths = [w for w in (a.width, b.width) if w is not None]
    return max(widths) if widths else DEFAULT_WIDTH_NM


def contradicts(a: ChannelId, b: ChannelId) -> bool:
    """Same name, wavelengths further apart than :func:`name_tolerance_nm`."""
    return a.wavelength is not None and b.wavelength is not None and \
        abs(a.wavelength - b.wavelength) > name_tolerance_nm(a, b)


class IdentityConflict(DataError):
    """A name match whose wavelengths contradict it (the module docstring)."""


def _check_prefer(prefer: str | None) -> None:
    if prefer is not None and prefer not in PREFER:
        raise ValueError(f"prefer must be one of {PREFER} or None, got {prefer!r}")


class IdentityIndex:
    """Looks channels up among ``known`` by name, then by wavelength (the module's rules).
    ``label``/``query_label`` name the two sides in a refusal; ``prefer``: ``PREFER`` or None."""

    def __init__(self, known: Sequence[ChannelId], *, label: str = "the known channels",
                 query_label: str = "the given channels", prefer: str | None = None):
        _check_prefer(prefer)
        self.label, self.query_label, self.prefer = label, query_label, prefer
        self.known = list(known)
        self._by_name: dict[str, int] = {}
        self._by_lambda: list[tuple[float, int]] = []  # sorted: a lookup bisects (a 3,000-band union: ms, not s)
        for i, c in enumerate(self.known):
            self._add(i, c)

    def _add(self, i: int, c: ChannelId) -> None:
        if c.name is not None:
            self._by_name.setdefault(c.name, i)
        if c.wavelength is not None:
            bisect.insort(self._by_lambda, (c.wavelength, i))

    def append(self, c: ChannelId) -> int:
        self.known.append(c)
        self._add(len(self.known) - 1, c)
        return len(self.known) - 1

    def find(self, c: ChannelId, exclude: set | frozenset = frozenset()) -> tuple[int, str] | None:
        """(index, "name" | "wavelength") of the channel ``c`` is, or None. A name match whose
        wavelengths contradict it raises :class:`IdentityConflict` unless ``prefer`` decides."""
        if c.name is not None and c.name in self._by_name and self._by_name[c.name] not in exclude:
            i = self._by_name[c.name]
            if not contradicts(c, self.known[i]) or self.prefer == "name":
                return i, "name"
            if self.prefer is None:
                self._refuse(c, self.known[i])
        if c.wavelength is not None:
            best = None  # the nearest within the tolerance; equally near: the earliest known
            k = bisect.bisect_left(self._by_lambda, (c.wavelength - WAVELENGTH_TOLERANCE_NM, -1))
            while k < len(self._by_lambda) and self._by_lambda[k][0] <= c.wavelength + WAVELENGTH_TOLERANCE_NM:
                lam, i = self._by_lambda[k]
                d = abs(lam - c.wavelength)
                if d <= WAVELENGTH_TOLERANCE_NM and i not in exclude and (best is None or (d, i) < best):
                    best = (d, i)
                k += 1
            if best is not None:
                return best[1], "wavelength"
        return None


    def _refuse(self, c: ChannelId, known: ChannelId) -> None:
        widths = [w for w in (c.width, known.width) if w is not None]
        limit = f"the bands' width, {name_tolerance_nm(c, known):g} nm" if widths else \
            f"{DEFAULT_WIDTH_NM:g} nm (no band width known)"
        raise IdentityConflict(
            f"channel {c.name!r} at {c.wavelength:g} nm ({self.query_label}) has the name of {known.name!r} at "
            f"{known.wavelength:g} nm ({self.label}), {abs(c.wavelength - known.wavelength):g} nm away: more than "
            f"{limit}, so the name and the wavelength disagree on which channel it is. Fix the name or the wavelength, "
            "or choose: --match-channels name (the names stand) or --match-channels wavelength (the wavelengths "
            "stand).")


def union_of(sources: Sequence[Sequence[ChannelId]], labels: Sequence[str] | None = None, *,
             prefer: str | None = None) -> tuple[list[ChannelId], list[tuple[int, ...]]]:
    """The channels of several sources as one list: (union, per source its union ids in its order).

    Sources are taken in order; a channel that is the same channel (module rules) as one already in
    the union is that one, else it is appended. Within one source two channels are never merged.
    A source whose channels carry no identity, beside a source whose do, is refused: nothing says
    which of the others' channels it shares. Each source's units are checked, and a name whose
    wavelengths contradict it is refused unless ``prefer`` decides (the module docstring)."""
    labels = list(labels) if labels is not None else [f"source {s}" for s in range(len(sources))]
    for label, chans in zip(labels, sources):
        check_units(chans, label)
    if len(sources) > 1:
        blind = [labels[s] for s, chans in enumerate(sources) if not any(c.known for c in chans)]
        if blind:
            raise DataError(
                f"{', '.join(blind)}: its channels have neither names nor wavelengths, so nothing says which channels "
                "it shares with the other sources of the blend. Give it a sidecar JSON beside the file "
                "(FILE.channels.json: {\"channel_names\": [...], \"wavelengths\": [...]}, or a list of names), or "
                "train it alone.")
    index = IdentityIndex([], label="an earlier source of the blend", prefer=prefer)
    ids = []
    for label, chans in zip(labels, sources):
        index.query_label = label
        taken: set[int] = set()
        mine = []
        for c in chans:
            hit = index.find(c, exclude=taken) if c.known else None
            u = hit[0] if hit is not None else index.append(c)
            taken.add(u)
            mine.append(u)
        ids.append(tuple(mine))
    return index.known, ids


def match_to(model: Sequence[ChannelId], given: Sequence[ChannelId], *, prefer: str | None = None,
             model_label: str = "the model", given_label: str = "the input"
             ) -> tuple[list[int | None], list[str], list[int]]:
    """Where each of the model's channels is in ``given``: (per model channel the index in
    ``given`` or None when missing, per model channel how it matched ("name", "wavelength" or
    "missing"), the indices of ``given`` no model channel uses). Both sides' units are checked, and
    a name whose wavelengths contradict it is refused unless ``prefer`` decides (module docstring)."""
    check_units(model, model_label)
    check_units(given, given_label)
    index = IdentityIndex(given, label=given_label, query_label=model_label, prefer=prefer)
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
