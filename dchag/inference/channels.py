"""Where a model meets data, channels by identity: an input's channels onto the model's.

The input's channels (a file's metadata or sidecar; in Python a ``channels=`` argument: names
and/or wavelengths) are matched to the model's by name, then wavelength
(:func:`dchag.data.identity.match_to`), and the input is read in the model's order:

- a model channel the input lacks is refused, naming it, unless missing channels are allowed
  (``--allow-missing-channels``, ``allow_missing_channels=True``): it is then read as invalid
  values (NaN, zero-filled after normalization as training does with invalid input) and reported;
- input channels no model channel uses are dropped, with one line;
- an input that carries no identity (a bare array, a file without metadata or sidecar), or a model
  that records none, is taken by position, in the model's channel order, and the output says so.

A model pretrained on a blend of sources (``DChagConfig.sources``: per source the union ids of its
channels) is run as the source whose channel set the input covers best (most channels found; the
first such source): :func:`map_channels` returns that source's index beside the reordering (one
source, the usual case: always 0, every model channel).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from dchag.data.errors import DataError
from dchag.data.identity import ChannelId, channel_ids, match_to


@dataclass(frozen=True)
class ChannelMap:
    """How an input's channels are read as the model's."""
    take: tuple[int | None, ...]  # per model channel (of ``source``), its index in the input; None: missing
    how: tuple[str, ...]  # per model channel: "name", "wavelength", "missing" or "position"
    extra: tuple[int, ...]  # input channels no model channel uses (dropped)
    source: int  # the training source the input is run as (0 unless the model was pretrained on a blend)
    lines: tuple[str, ...]  # what to tell the user: reordering, drops, zero-fills, no identity

    @property
    def missing(self) -> tuple[int, ...]:
        return tuple(c for c, i in enumerate(self.take) if i is None)

    @property
    def is_identity(self) -> bool:
        """The input's channels are the model's, in its order (nothing to reorder)."""
        return not self.extra and self.take == tuple(range(len(self.take)))

    def select(self, x, axis: int = 1):
        """``x`` (numpy or torch, channels on ``axis``) as the model's channels: reordered, extra
        channels dropped, missing ones NaN."""
        if self.is_identity:
            return x
        import torch
        idx = [i if i is not None else 0 for i in self.take]
        if torch.is_tensor(x):
            out = x.index_select(axis, torch.as_tensor(idx, device=x.device)).to(torch.float32)
            if self.missing:
                out.index_fill_(axis, torch.as_tensor(self.missing, device=x.device), float("nan"))
            return out
        out = np.take(np.asarray(x), idx, axis=axis).astype(np.float32, copy=False)
        if self.missing:
            sl = [slice(None)] * out.ndim
            sl[axis] = list(self.missing)
            out[tuple(sl)] = np.nan
        return out


def model_channels(cfg) -> list[ChannelId]:
    """The model's channels (a DChagConfig) as identities."""
    return channel_ids(cfg.channel_names, cfg.wavelengths, cfg.num_channels)


def given_channels(channels, count: int) -> list[ChannelId] | None:
    """A ``channels=`` argument as ``count`` identities, or None (no identity given). Accepted: a
    list of names (str), a list of wavelengths (nm, numbers), ChannelIds, or a dict with
    ``names``/``channel_names`` and/or ``wavelengths``."""
    if channels is None:
        return None
    if isinstance(channels, dict):
        unknown = sorted(set(channels) - {"names", "channel_names", "wavelengths"})
        if unknown:
            raise DataError(f"channels= has unknown keys {unknown}; give 'names' and/or 'wavelengths' (nm).")
        names = channels.get("names", channels.get("channel_names"))
        wavelengths = channels.get("wavelengths")
    else:
        values = list(np.asarray(channels).reshape(-1)) if not isinstance(channels, (list, tuple)) else list(channels)
        if all(isinstance(v, ChannelId) for v in values):
            ids = values
            if len(ids) != count:
                raise DataError(f"channels= lists {len(ids)} channels for an input of {count}: give one per channel.")
            return ids
        if all(isinstance(v, (str, np.str_)) for v in values):
            names, wavelengths = values, None
        elif all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) for v in values):
            names, wavelengths = None, values
        else:
            raise DataError("channels= must be the input's channel names (strings), its wavelengths in nm (numbers), "
                            "or {'names': [...], 'wavelengths': [...]}.")
    for what, values in (("names", names), ("wavelengths", wavelengths)):
        if values is not None and len(values) != count:
            raise DataError(f"channels= lists {len(values)} {what} for an input of {count} channels: give one per "
                            "channel, in the input's order.")
    return channel_ids(names, wavelengths, count)


def source_channels(source) -> list[ChannelId] | None:
    """A data source's channels (``dchag.data`` reader) as identities, or None when its metadata
    names none (generated names, no wavelengths)."""
    ids = channel_ids(source.channel_names, None if source.wavelengths is None else list(source.wavelengths),
                      source.num_channels)
    return ids if any(c.known for c in ids) else None


def _list(ids: Sequence[ChannelId], which: Sequence[int], limit: int = 8) -> str:
    shown = ", ".join(ids[i].describe() for i in list(which)[:limit])
    return shown + (f" and {len(which) - limit} more" if len(which) > limit else "")


def map_channels(cfg, given: list[ChannelId] | None, count: int, *, allow_missing: bool = False,
                 where: str = "the input", flag: str = "--allow-missing-channels") -> ChannelMap:
    """The input's ``count`` channels (identities ``given``, None: none) as the model's (``cfg``).

    Raises DataError naming the model channels the input lacks (unless ``allow_missing``), or
    when an input without identity does not have the model's channel count."""
    model = model_channels(cfg)
    C = cfg.num_channels
    known_given = given is not None and any(c.known for c in given)
    if not known_given or not any(c.known for c in model):
        if count != C:
            if not known_given:
                raise DataError(f"{where} has {count} channels and carries no channel names or wavelengths, so they are "
                                f"taken by position; the model takes {C}. Give data with the model's {C} channels in its "
                                "order, or name the input's channels (a sidecar FILE.channels.json, channels= in Python) "
                                "so they are matched by identity.")
            raise DataError(f"{where} has {count} channels; the model takes {C} and records no channel names or "
                            "wavelengths to match them by, so give its channels in its order.")
        line = (f"channels: {where} carries no channel names or wavelengths; its {count} channels are taken in the "
                "model's channel order" if not known_given else
                f"channels: the model records no channel names or wavelengths; {where}'s {count} channels are taken "
                "in the model's order")
        return ChannelMap(tuple(range(C)), ("position",) * C, (), 0, (line,))
    sources = [tuple(range(C))] if cfg.sources is None else [tuple(s) for s in cfg.sources]
    best = None
    for s, ids in enumerate(sources):
        where_s, how_s, extra_s = match_to([model[u] for u in ids], given)
        found = sum(w is not None for w in where_s)
        if best is None or found > best[0]:
            best = (found, s, where_s, how_s, extra_s)
    found, source, take, how, extra = best
    ids = sources[source]
    src_model = [model[u] for u in ids]
    missing = [c for c, w in enumerate(take) if w is None]
    label = "" if cfg.sources is None else (f" (as source {cfg.source_names[source]!r}" if cfg.source_names
                                            else f" (as source {source}") + f" of the {len(sources)} it trained on)"
    if missing and not allow_missing:
        raise DataError(f"{where} lacks {len(missing)} of the model's {len(ids)} channels{label}: "
                        f"{_list(src_model, missing)} (matched by name, then wavelength, against its channels "
                        f"{_list(given, range(len(given)))}). Give data that has them, or {flag} to predict with them "
                        "zero-filled as invalid input.")
    lines = []
    kinds = {k: how.count(k) for k in ("name", "wavelength") if how.count(k)}
    reordered = tuple(take) != tuple(range(len(ids)))
    if reordered or extra or missing or cfg.sources is not None:
        lines.append(f"channels: {found} of the model's {len(ids)}{label} found in {where} ("
                     + ", ".join(f"{n} by {k}" for k, n in kinds.items()) + ")"
                     + ("; read in the model's order" if reordered else ""))
    if extra:
        lines.append(f"channels: {len(extra)} of {where}'s channels are not the model's and are dropped: "
                     f"{_list(given, extra)}")
    if missing:
        lines.append(f"channels: {len(missing)} of the model's channels are missing from {where} and zero-filled as "
                     f"invalid input ({flag}): {_list(src_model, missing)}")
    return ChannelMap(tuple(take), tuple(how), tuple(extra), source, tuple(lines))
