"""Which axis of a plain array ([C, H, W] or [N, C, H, W]: .npy, HDF5 and Zarr arrays) holds the
channels. It is never guessed from the shape.

The readers take the channels first. An array's shape alone cannot say whether that is how it
was stored: [30, 28, 500] is 30 channels of 28 x 500 pixels, or 500 channels of 30 x 28 stored
channels-last. A channel count decides it: ``--num-channels`` (or the model's, for prediction),
or the array's own metadata (a .npy channel sidecar, an HDF5/Zarr ``wavelengths`` or
``channel_names`` attribute). With a count C:
- first axis C, last axis not C: channels first, read as it is;
- last axis C, first axis not: stored channels-last, refused, naming the transpose;
- both axes C: refused (the shape cannot tell the two readings apart);
- neither: the count does not fit (``open_source`` names both numbers).
Without any count a 3- or 4-D array is refused, naming both readings and the flag that picks one.
"""

from __future__ import annotations

from ..errors import DataError


def _transpose(ndim: int) -> str:
    return f"np.moveaxis(a, -1, -3) (that is a.transpose({'2, 0, 1' if ndim == 3 else '0, 3, 1, 2'}))"


def check_channel_axis(shape: tuple, count: int | None, where: str, counted_by: str, label_hint: str) -> None:
    """Raise :class:`DataError` unless ``count`` says the array of ``shape`` holds its channels
    first. ``counted_by`` names where ``count`` comes from ("--num-channels 500"); ``label_hint``
    says how to label the array's channels in its own format (for the error without a count)."""
    if len(shape) not in (3, 4):
        return  # the reader refuses other ranks itself
    first, rows, last = shape[-3], shape[-2], shape[-1]
    if count is None:
        raise DataError(
            f"{where} has shape {list(shape)} and nothing says which axis holds the channels: read channels-first "
            f"(the reader's layout) it is {first} channels of {rows} x {last} pixels, read channels-last it is "
            f"{last} channels of {first} x {rows} pixels. Pick one: --num-channels {first} if the channels come "
            f"first; if they come last, store it channels-first with {_transpose(len(shape))} and pass "
            f"--num-channels {last}. {label_hint}")
    if last == count and first != count:
        raise DataError(
            f"{where} has shape {list(shape)}: its last axis has {count} entries, the channel count ({counted_by}), "
            f"so it is stored channels-last ([H, W, C] / [N, H, W, C]); the reader takes the channels first. Store it "
            f"transposed: {_transpose(len(shape))}.")
    if last == count and first == count:
        raise DataError(
            f"{where} has shape {list(shape)}: both its first and its last axis have {count} entries, the channel "
            f"count ({counted_by}), so the shape cannot tell channels-first from channels-last. Store it "
            f"channels-first with a width other than {count} (e.g. crop or pad one column).")


class ChannelsFirstArray:
    """Mixin of the plain-array readers: ``check_channel_axis(num_channels)``. A reader sets
    ``declared_channels`` (the count its metadata lists, or None) and implements
    ``_array_shape()``, ``_array_name()`` and ``_label_hint()`` (how to list the channels in its
    format)."""

    declared_channels: int | None = None

    def check_metadata_count(self, where: str) -> None:
        """At opening: a count from the metadata decides the axis at once."""
        if self.declared_channels is not None:
            check_channel_axis(self._array_shape(), self.declared_channels, self._array_name(),
                               f"{self.declared_channels} channels listed in {where}", "")

    def check_channel_axis(self, num_channels: int | None, counted_by: str | None = None) -> None:
        """Refuse unless ``num_channels`` (--num-channels, or the model's: ``counted_by`` says which;
        None: the metadata's count, if any) says that the channels come first."""
        count = self.declared_channels if num_channels is None else num_channels
        by = counted_by or (f"--num-channels {count}" if num_channels is not None else "the array's metadata")
        check_channel_axis(self._array_shape(), count, self._array_name(), by, self._label_hint())
