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

Groups are formed by count over the new channels (dchag/transfer/architecture.py); each new group
takes the pretrained group whose centre is nearest: the mean wavelength of its channels when
both models know every channel's wavelength, else its mean relative position in the channel order.
A model pretrained on a blend of sources had one set of per-segment weights for group g of every
source, so there groups match by relative position only (g + 1/2) / G.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from dchag.data.readers.base import is_generated_name
from dchag.model.config import DChagConfig
from dchag.parallel.partition import ChannelPartition

WAVELENGTH_TOLERANCE_NM = 1e-3
KINDS = ("same", "name", "wavelength", "interpolated", "new")


@dataclass(frozen=True)
class ChannelMatch:
    kind: str  # one of KINDS
    sources: tuple[tuple[int, float], ...] = ()  # (pretrained channel, weight); () for "new"

    @property
    def copied(self) -> bool:
        return self.kind in ("same", "name", "wavelength")


def _names(cfg: DChagConfig) -> list:
    return list(cfg.channel_names) if cfg.channel_names is not None else [None] * cfg.num_channels


def _wavelengths(cfg: DChagConfig) -> list:
    return list(cfg.wavelengths) if cfg.wavelengths is not None else [None] * cfg.num_channels


def match_channels(pretrained: DChagConfig, new: DChagConfig) -> list[ChannelMatch]:
    """One :class:`ChannelMatch` per channel of ``new`` (module docstring)."""
    if new.channel_names is not None and (new.channel_names, new.wavelengths) == \
            (pretrained.channel_names, pretrained.wavelengths):
        return [ChannelMatch("same", ((c, 1.0),)) for c in range(new.num_channels)]
    by_name = {}
    for i, name in enumerate(_names(pretrained)):
        if name is not None and not is_generated_name(name):
            by_name.setdefault(name, i)
    bands = sorted((w, i) for i, w in enumerate(_wavelengths(pretrained)) if w is not None)
    lams = [w for w, _ in bands]
    out = []
    for name, lam in zip(_names(new), _wavelengths(new)):
        if name is not None and not is_generated_name(name) and name in by_name:
            out.append(ChannelMatch("name", ((by_name[name], 1.0),)))
            continue
        if lam is None or not bands:
            out.append(ChannelMatch("new"))
            continue
        j = bisect.bisect_left(lams, lam)
        near = min((k for k in (j - 1, j) if 0 <= k < len(bands)), key=lambda k: abs(lams[k] - lam))
        if abs(lams[near] - lam) <= WAVELENGTH_TOLERANCE_NM:
            out.append(ChannelMatch("wavelength", ((bands[near][1], 1.0),)))
        elif lams[0] < lam < lams[-1]:
            (wa, a), (wb, b) = bands[j - 1], bands[j]
            t = (lam - wa) / (wb - wa)
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


def match_groups(pretrained: DChagConfig, new: DChagConfig, matches: list[ChannelMatch]) -> list[tuple[int, bool]]:
    """For each new group: (the pretrained group whose centre is nearest, whether the two are the
    same channels in the same order)."""
    blend = pretrained.sources is not None or new.sources is not None
    both = not blend and all(w is not None for w in _wavelengths(pretrained) + _wavelengths(new))
    old_centres, new_centres = _centres(pretrained, both), _centres(new, both)
    if blend:  # a segment's weights served every source's group at that position: by position only
        return [(min(range(len(old_centres)), key=lambda h: (abs(old_centres[h] - c), h)), False) for c in new_centres]
    old_part = ChannelPartition(pretrained.num_channels, pretrained.num_groups)
    new_part = ChannelPartition(new.num_channels, new.num_groups)
    out = []
    for g, centre in enumerate(new_centres):
        src = min(range(len(old_centres)), key=lambda h: (abs(old_centres[h] - centre), h))
        n, start, old_start = new_part.group_sizes[g], new_part.group_starts[g], old_part.group_starts[src]
        same = n == old_part.group_sizes[src] and all(
            matches[start + k].copied and matches[start + k].sources[0][0] == old_start + k for k in range(n))
        out.append((src, same))
    return out
