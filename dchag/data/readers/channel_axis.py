"""Which axis of a plain array (.npy, HDF5 and Zarr arrays) holds the channels. It is never guessed
from the shape.

The documented layout is channels first: [C, H, W] or [N, C, H, W]. An array stored channels last
([H, W, C] or [N, H, W, C]) is declared so by its user (``--channels-last``); the reader then takes
the last axis as the channels. A channel count says whether the array fits the layout:
``--num-channels`` (or the model's, for prediction), or the array's own metadata (a .npy channel
sidecar, an HDF5/Zarr ``wavelengths`` or ``channel_names`` attribute). With a count C:

- channels first (the default): the first axis (of C, H, W) must have C entries, and that is
  enough, whatever the last axis holds. When the last axis has C entries too (a square stack
  of C x C tiles of C bands), the reading is said once at start-up (:func:`check_channel_axis`
  returns that note), naming ``--channels-last`` for a file stored the other way;
- a last axis of C entries and a first axis of another size: refused as stored channels-last,
  naming ``--channels-last`` (or the transpose that stores it channels-first);
- ``--channels-last``: the last axis must have C entries;
- neither axis: the count does not fit (``open_source`` names both numbers).

Without any count a channels-first 3- or 4-D array is refused, naming both readings and the flags
that pick one; with ``--channels-last`` the last axis is the count.
"""

from __future__ import annotations

from ..errors import DataError


def _transpose(ndim: int) -> str:
    return f"np.moveaxis(a, -1, -3) (that is a.transpose({'2, 0, 1' if ndim == 3 else '0, 3, 1, 2'}))"


def stack_shape(shape: tuple, channels_last: bool = False) -> tuple[int, int, int, int]:
    """(N, C, H, W) of an array of ``shape`` stored [C, H, W] / [N, C, H, W], or with
    ``channels_last`` [H, W, C] / [N, H, W, C]."""
    n, a, b, c = (1, *shape) if len(shape) == 3 else tuple(shape)
    return (n, c, a, b) if channels_last else (n, a, b, c)


def check_channel_axis(shape: tuple, count: int | None, where: str, counted_by: str, label_hint: str,
                       channels_last: bool = False) -> str | None:
    """Raise :class:`DataError` unless ``count`` fits the array of ``shape`` in its declared layout
    (channels first, or ``channels_last``). ``counted_by`` names where ``count`` comes from
    ("--num-channels 500"); ``label_hint`` says how to label the array's channels in its own format
    (for the error without a count). Returns a note for the start-up summary when the shape alone
    would also fit the other layout (None otherwise)."""
    if len(shape) not in (3, 4):
        return None  # the reader refuses other ranks itself
    first, rows, last = shape[-3], shape[-2], shape[-1]
    if channels_last:
        if count is not None and last != count:
            first_fits = f"; its first axis has {count}: drop --channels-last" if first == count else ""
            raise DataError(f"{where} has shape {list(shape)}: --channels-last reads its last axis as the channels, but "
                            f"that axis has {last} entries, not the channel count ({counted_by}){first_fits}.")
        return None
    if count is None:
        raise DataError(
            f"{where} has shape {list(shape)} and nothing says which axis holds the channels: read channels-first "
            f"(the documented layout) it is {first} channels of {rows} x {last} pixels, read channels-last it is "
            f"{last} channels of {first} x {rows} pixels. Pick one: --num-channels {first} if the channels come "
            f"first; --channels-last --num-channels {last} if they come last. {label_hint}")
    if first == count:
        if last != count:
            return None
        return (f"{where} (shape {list(shape)}) is read channels-first, the documented layout: {count} channels of "
                f"{rows} x {last} pixels ({counted_by} is its first axis; its last axis has {count} entries too). If "
                "it is stored channels-last ([H, W, C] / [N, H, W, C]), add --channels-last.")
    if last == count:
        raise DataError(
            f"{where} has shape {list(shape)}: its last axis has {count} entries, the channel count ({counted_by}), "
            f"and its first axis {first}, so it is stored channels-last ([H, W, C] / [N, H, W, C]). Add --channels-last "
            f"to read it so, or store it channels-first with {_transpose(len(shape))}.")
    return None


class ChannelsFirstArray:
    """Mixin of the plain-array readers: the array's layout (channels first, or ``channels_last``
    as its user declared), its (N, C, H, W) shape, the slice of a block, and
    ``check_channel_axis(num_channels)``. A reader sets ``channels_last`` and ``declared_channels``
    (the count its metadata lists, or None) and implements ``_array_shape()``, ``_array_name()`` and
    ``_label_hint()`` (how to list the channels in its format)."""

    declared_channels: int | None = None
    channels_last: bool = False

    def _stack_shape(self, shape: tuple) -> tuple[int, int, int, int]:
        return stack_shape(shape, self.channels_last)

    def _slice(self, arr, index, c0, c1, r0, r1, k0, k1):
        """The block [c1-c0, r1-r0, k1-k0] of image ``index`` of ``arr`` (numpy, h5py or zarr)."""
        lead = () if arr.ndim == 3 else (index,)
        if self.channels_last:  # [.., H, W, C]: the pixels of the window, then the channels first
            import numpy as np
            return np.moveaxis(np.asarray(arr[lead + (slice(r0, r1), slice(k0, k1), slice(c0, c1))]), -1, 0)
        return arr[lead + (slice(c0, c1), slice(r0, r1), slice(k0, k1))]

    def check_metadata_count(self, where: str) -> None:
        """At opening: a count from the metadata decides the axis at once."""
        if self.declared_channels is not None:
            self.channel_axis_note = check_channel_axis(
                self._array_shape(), self.declared_channels, self._array_name(),
                f"{self.declared_channels} channels listed in {where}", "", self.channels_last)

    def check_channel_axis(self, num_channels: int | None, counted_by: str | None = None) -> str | None:
        """Refuse unless ``num_channels`` (--num-channels, or the model's: ``counted_by`` says which;
        None: the metadata's count, if any) fits the array's layout; the start-up note, if any."""
        count = self.declared_channels if num_channels is None else num_channels
        by = counted_by or (f"--num-channels {count}" if num_channels is not None else "the array's metadata")
        return check_channel_axis(self._array_shape(), count, self._array_name(), by, self._label_hint(),
                                  self.channels_last)
