"""Which pretrained channels (and groups) each channel (and group) of the new model comes from.

A channel is an identity, not a position. When the new data has exactly the pretrained model's
channel list (the same names, generated ones included, and wavelengths: the same sensor, e.g. a
new task on the same data), every channel is its pretrained self ("same"). Otherwise each channel
of the new data is matched to the pretrained channels by (first rule that applies):

1. its name, when the data gave one (a generated name, ``chNNN`` or ``NNN.NNnm``, says nothing
   about what a channel is: ``dchag.data.readers.base.is_generated_name``)    -> "name"
2. its wavelength, equal to a pretrained band's within 1e-3 nm                    -> "wavelength"
3. its wavelength, inside the pretrained bands' range: the two pretrained bands that bracket it,
   weighted linearly, (1 - t) a + t b with t = (lambda - lambda_a) / (lambda_b - lambda_a)  -> "interpolated"
4. anything else (outside the range, or neither a known name nor a wavelength)    -> "new"

Rules 1 and 2 are the shared identity match (``dchag.data.identity``, which prediction and blends
use too), with its checks: wavelengths in another unit than nm are refused, and so is a name whose
wavelengths lie further apart than the bands' width (20 nm where unknown) unless ``--match-channels
name|wavelength`` says which to trust (``prefer``).

Groups are formed by count over the new channels (dchag/transfer/architecture.py); each new group
takes the pretrained group whose centre is nearest: the mean wavelength of its channels when
both models know every channel's wavelength, else its mean relative position in the channel order.
A model pretrained on a blend of sources had one set of per-segment weights for group g of every
source: a new group that is a whole group g of some source takes g, any other the nearest by
relative position (g + 1/2) / G.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from dchag.data.errors import DataError
from dchag.data.identity import IdentityIndex, channel_ids
from dchag.model.config import DChagConfig
from dchag.parallel.partition import ChannelPartition
from dchag.transfer.errors import FinetuneError

KINDS = ("same", "name", "wavelength", "interpolated", "new")
PRETRAINED, HERE = "the pretrained model", "this run's data"


@dataclass(frozen=True)
class ChannelMatch:
    kind: str  # one of KINDS
    sources: tuple[tuple[int, float], ...] = ()  # (pretrained channel, weight); () for "new"

    @property
    def copied(self) -> bool:
        return self.kind in ("same", "name", "wavelength")


def _wavelengths(cfg: DChagConfig) -> list:
    return list(cfg.wavelengths) if cfg.wavelengths is not None else [None] * cfg.num_channels


def identities(cfg: DChagConfig, where: str):
    """The channels of ``cfg`` as ``dchag.data.identity.ChannelId`` s (units checked; a refusal is a
    FinetuneError naming ``where``)."""
    try:
        return channel_ids(cfg.channel_names, cfg.wavelengths, cfg.num_channels, where=where)
    except DataError as e:
        raise FinetuneError(str(e)) from e


def match_channels(pretrained: DChagConfig, new: DChagConfig, prefer: str | None = None) -> list[ChannelMatch]:
    """One :class:`ChannelMatch` per channel of ``new`` (module docstring); ``prefer``: --match-channels."""
    if new.channel_names is not None and (new.channel_names, new.wavelengths) == \
            (pretrained.channel_names, pretrained.wavelengths):
        return [ChannelMatch("same", ((c, 1.0),)) for c in range(new.num_channels)]
    index = IdentityIndex(identities(pretrained, PRETRAINED), label=PRETRAINED, query_label=HERE, prefer=prefer)
    bands = sorted((w, i) for i, w in enumerate(_wavelengths(pretrained)) if w is not None)
    lams = [w for w, _ in bands]
    out = []
    for c in identities(new, HERE):
        try:
            hit = index.find(c) if c.known else None
        except DataError as e:
            raise FinetuneError(str(e)) from e
        if hit is not None:
            out.append(ChannelMatch(hit[1], ((hit[0], 1.0),)))
        elif c.wavelength is not None and bands and lams[0] < c.wavelength < lams[-1]:
            j = bisect.bisect_left(lams, c.wavelength)
            (wa, a), (wb, b) = bands[j - 1], bands[j]
            t = (c.wavelength - wa) / (wb - wa)
            out.append(ChannelMatch("interpolated", ((a, 1.0 - t), (b, t))))
        else:
            out.append(ChannelMatch("new"))
    return out


def _centres(cfg: DChagConfig, use_wavelengths: bool) -> list[float]:
    if cfg.sources is not None:  # a blend: group g of every source was group g's position
        return [(g + 0.5) / cfg.num_groups for g in range(cfg.num_groups)]
    part = ChannelPartition(cfg.num_channels, cfg.num_groups)
    wl = _wavelengths(cfg)
    out = []
    for start, size in zip(part.group_starts, part.group_sizes):
        if use_wavelengths:
            out.append(sum(wl[start:start + size]) / size)
        else:
            out.append((start + size / 2) / cfg.num_channels)
    return out


def _groups(num_channels: int, num_groups: int) -> list[tuple[int, ...]]:
    part = ChannelPartition(num_channels, num_groups)
    return [tuple(range(s, s + n)) for s, n in zip(part.group_starts, part.group_sizes)]


def _pretrained_groups(cfg: DChagConfig) -> dict[tuple[int, ...], int]:
    """{a group's channels, in order: its group}. A model pretrained on a blend: every source's groups
    (of its slots), group g of every source having used the per-segment weights at position g."""
    if cfg.sources is None:
        return {members: g for g, members in enumerate(_groups(cfg.num_channels, cfg.num_groups))}
    lay, out = cfg.source_layout(1), {}
    for s in range(lay.num_sources):
        slots = lay.slots(s)
        for g, members in enumerate(_groups(len(slots), cfg.num_groups)):
            out.setdefault(tuple(slots[i] for i in members), g)
    return out


def copied_sources(matches: list[ChannelMatch]) -> list[int] | None:
    """The pretrained channel each new channel is a copy of, when the new channels are a subset of the
    pretrained ones (every one copied, none twice); else None."""
    if not matches or not all(m.copied for m in matches):
        return None
    src = [m.sources[0][0] for m in matches]
    return src if len(set(src)) == len(src) else None


def whole_groups(pretrained: DChagConfig, matches: list[ChannelMatch], num_groups: int) -> list[int | None]:
    """Per new group (G = ``num_groups``, by count over the new channels): the pretrained group it is
    whole (the same channels in the same order), else None."""
    old = _pretrained_groups(pretrained)
    src = [m.sources[0][0] if m.copied else None for m in matches]
    return [old.get(tuple(src[c] for c in members)) for members in _groups(len(matches), num_groups)]


def subset_groups(pretrained: DChagConfig, matches: list[ChannelMatch], channel_parallel_size: int
                  ) -> tuple[int, int] | None:
    """For new channels that are a subset of the pretrained ones: (G, groups kept whole) for the G
    (a multiple of P, at most the channel count) that keeps the most pretrained groups whole, ties to
    the G nearest the pretrained one, then the smaller; None when no G keeps any (or no subset)."""
    if copied_sources(matches) is None:
        return None
    P, C = channel_parallel_size, len(matches)
    best = None
    for G in range(P, C + 1, P):
        kept = sum(g is not None for g in whole_groups(pretrained, matches, G))
        key = (kept, -abs(G - pretrained.num_groups), -G)
        if kept and (best is None or key > best[0]):
            best = (key, G, kept)
    return None if best is None else best[1:]


def match_groups(pretrained: DChagConfig, new: DChagConfig, matches: list[ChannelMatch]) -> list[tuple[int, bool]]:
    """For each new group: (its pretrained group, whether the two are the same channels in the same
    order). A new group that is a whole pretrained group takes it; any other the pretrained group
    whose centre is nearest (from a blend: by position)."""
    blend = pretrained.sources is not None or new.sources is not None
    both = not blend and all(w is not None for w in _wavelengths(pretrained) + _wavelengths(new))
    old_centres, new_centres = _centres(pretrained, both), _centres(new, both)
    out = []
    for g, (whole, centre) in enumerate(zip(whole_groups(pretrained, matches, new.num_groups), new_centres)):
        if whole is not None:
            out.append((whole, True))
        else:
            out.append((min(range(len(old_centres)), key=lambda h: (abs(old_centres[h] - centre), h)), False))
    return out
