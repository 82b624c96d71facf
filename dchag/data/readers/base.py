"""The common interface of every reader: an indexed stack of images [N, C, H, W].

A source never materialises a whole image: ``read`` takes the image index, a channel range and
a spatial window, and each reader turns that into a memory-mapped slice, a chunked read or a
hyperslab. That is what lets channel-parallel rank r read only its C/P channels from storage.

Conventions shared by all readers:
- ``read`` returns float32 [c, h, w], already scaled to physical units (ENVI reflectance
  scale factor, CF scale_factor/add_offset), with the format's no-data value turned into NaN.
  One rule downstream -- "non-finite means invalid" -- then covers NaN, Inf and no-data alike.
- ``nodata`` reports the file's no-data value in *raw* (stored) units, for information.
- ``elements_read`` / ``bytes_read`` count what was requested from storage (elements of the
  requested blocks; bytes at the stored item size) and ``channels_read`` is the set of global
  channel indices ever touched, so tests can prove that a rank reads only its own channels.
  They are per-process counters (DataLoader workers keep their own copies).
- Open file handles are created lazily and dropped on pickling, so a source can be handed to
  DataLoader worker processes (fork or spawn) safely.
"""

from __future__ import annotations

import os
import re
from typing import Iterable, Sequence

import numpy as np

from ..errors import DataError



class Source:
    """Base class. Subclasses set ``_shape`` (N, C, H, W), names/metadata, and implement
    ``_read_block(index, c0, c1, r0, r1, k0, k1) -> array [c1-c0, r1-r0, k1-k0]`` in raw units."""

    format: str = "?"

    def __init__(self, path: str | None):
        self.path = None if path is None else str(path)
        self._shape: tuple[int, int, int, int] = (0, 0, 0, 0)
        self.channel_names: list[str] = []
        self.wavelengths: np.ndarray | None = None  # [C] nanometres, or None
        self.nodata: float | None = None  # raw-unit no-data value, or None
        self.latitudes: np.ndarray | None = None  # [H] degrees north, or None
        self.longitudes: np.ndarray | None = None  # [W] degrees east, or None
        # Raw -> physical: value * _multiplier + _offset; raw == _mask_value -> NaN.
        self._mask_value: float | None = None
        self._multiplier: float | None = None
        self._offset: float | None = None
        self._raw_itemsize = 4
        self.reset_counters()

    # ---- metadata -------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(N, C, H, W): N images or time steps, C channels, H rows, W columns."""
        return self._shape

    @property
    def num_images(self) -> int:
        return self._shape[0]

    @property
    def num_channels(self) -> int:
        return self._shape[1]

    def image_hw(self, index: int) -> tuple[int, int]:
        """(H, W) of image ``index``; differs from ``shape[2:]`` only for folders of unequal images."""
        self._check_index(index)
        return self._shape[2], self._shape[3]

    def describe(self) -> str:
        return f"{self.format} source {self.path!r} with shape (N, C, H, W) = {self.shape}"

    # ---- counters -------------------------------------------------------------------------
    def reset_counters(self) -> None:
        self.elements_read = 0
        self.bytes_read = 0
        self.channels_read: set[int] = set()

    # ---- reading --------------------------------------------------------------------------
    def read(self, index: int, channels=None, rows: slice | None = None,
             cols: slice | None = None) -> np.ndarray:
        """float32 [c, h, w] of image ``index``: only ``channels`` (range/slice/list, default all)
        and only the window ``rows`` x ``cols`` (unit-step slices, default whole image)."""
        index = self._check_index(index)
        H, W = self.image_hw(index)
        r0, r1 = _window(rows, H, "rows", self)
        k0, k1 = _window(cols, W, "cols", self)
        runs = _channel_runs(channels, self.num_channels, self)
        blocks = []
        for c0, c1 in runs:
            raw = np.asarray(self._read_block(index, c0, c1, r0, r1, k0, k1))
            expect = (c1 - c0, r1 - r0, k1 - k0)
            if raw.shape != expect:  # a reader bug, not a user error: fail loudly
                raise AssertionError(f"{type(self).__name__} returned {raw.shape}, expected {expect}")
            blocks.append(self._to_physical(raw))
            self._count(raw, c0, c1)
        if not blocks:
            return np.zeros((0, r1 - r0, k1 - k0), np.float32)
        return blocks[0] if len(blocks) == 1 else np.concatenate(blocks, axis=0)

    def _count(self, raw: np.ndarray, c0: int, c1: int) -> None:
        self.elements_read += raw.size
        self.bytes_read += raw.size * self._raw_itemsize
        self.channels_read.update(range(c0, c1))

    def _to_physical(self, raw: np.ndarray) -> np.ndarray:
        out = raw.astype(np.float32, order="C", copy=True)  # BIL/BIP views arrive transposed
        if self._mask_value is not None:
            invalid = raw == np.asarray(self._mask_value).astype(raw.dtype) \
                if _representable(self._mask_value, raw.dtype) else None
            if invalid is not None and invalid.any():
                out[invalid] = np.nan
        if self._multiplier is not None:
            out *= np.float32(self._multiplier)
        if self._offset is not None:
            out += np.float32(self._offset)
        return out

    def _read_block(self, index, c0, c1, r0, r1, k0, k1) -> np.ndarray:
        raise NotImplementedError

    def _check_index(self, index: int) -> int:
        n = self.num_images
        if not isinstance(index, (int, np.integer)) or not 0 <= int(index) < n:
            raise DataError(f"image index {index!r} is outside [0, {n}) for {self.describe()}.")
        return int(index)

    # ---- process safety -------------------------------------------------------------------
    _HANDLE_ATTRS: tuple[str, ...] = ()

    def __getstate__(self):
        state = dict(self.__dict__)
        for name in self._HANDLE_ATTRS:  # memmaps/file handles: reopened lazily in the worker
            state[name] = None
        state["_pid"] = None
        return state

    def _fresh(self) -> bool:
        """True when handles must be (re)opened: first use, or first use after a fork."""
        if getattr(self, "_pid", None) != os.getpid():
            self._pid = os.getpid()
            return True
        return False

    _MAPPED_ATTRS: tuple[str, ...] = ()  # handles that are memory maps of the file

    def release_pages(self) -> None:
        """Unmap the file's memory maps (reopened by the next read). The pages a read touched stay in
        the process's resident memory while mapped; a reader going over a scene larger than memory
        (tools/predict.py) calls this between windows, so its memory does not grow with the scene."""
        for name in self._MAPPED_ATTRS:
            setattr(self, name, None)

    def close(self) -> None:
        for name in self._HANDLE_ATTRS:
            h = getattr(self, name, None)
            if h is not None and hasattr(h, "close"):
                try:
                    h.close()
                except Exception:
                    pass
            setattr(self, name, None)
        self._pid = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.path!r} shape={self.shape}>"


def _representable(value: float, dtype: np.dtype) -> bool:
    """Whether a no-data value can occur in ``dtype`` (e.g. -9999 cannot occur in uint16)."""
    dtype = np.dtype(dtype)
    if dtype.kind in "f":
        return True
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return float(value).is_integer() and info.min <= value <= info.max
    return False


def _window(sl: slice | None, size: int, what: str, src: Source) -> tuple[int, int]:
    if sl is None:
        return 0, size
    if not isinstance(sl, slice) or sl.step not in (None, 1):
        raise DataError(f"{what} must be a unit-step slice, got {sl!r}.")
    start = 0 if sl.start is None else sl.start
    stop = size if sl.stop is None else sl.stop
    if not 0 <= start <= stop <= size:
        raise DataError(f"{what} window [{start}, {stop}) lies outside [0, {size}) of {src.describe()}.")
    return start, stop


def _channel_runs(channels, num_channels: int, src: Source) -> list[tuple[int, int]]:
    """Contiguous [c0, c1) runs covering ``channels`` in the requested order."""
    if channels is None:
        return [(0, num_channels)]
    if isinstance(channels, (int, np.integer)):
        channels = [int(channels)]
    if isinstance(channels, slice):
        channels = range(*channels.indices(num_channels))
    if isinstance(channels, range) and channels.step == 1:
        if not (0 <= channels.start <= channels.stop <= num_channels):
            raise DataError(f"channels {channels} lie outside [0, {num_channels}) of {src.describe()}; "
                            "check --num-channels and the channel partition.")
        return [(channels.start, channels.stop)] if len(channels) else []
    idx = [int(c) for c in channels]
    for c in idx:
        if not 0 <= c < num_channels:
            raise DataError(f"channel {c} lies outside [0, {num_channels}) of {src.describe()}.")
    runs: list[tuple[int, int]] = []
    for c in idx:
        if runs and runs[-1][1] == c:
            runs[-1] = (runs[-1][0], c + 1)
        else:
            runs.append((c, c + 1))
    return runs


def require_file(path: str, what: str = "data file", flag: str = "--data-path") -> str:
    if not os.path.exists(path):
        raise DataError(f"{what} {path!r} does not exist; check {flag} (relative paths are "
                        f"resolved from the working directory {os.getcwd()!r}).")
    return path


def default_channel_names(num_channels: int, wavelengths: Iterable[float] | None = None) -> list[str]:
    """Names for data that has none: ``NNN.NNnm`` from the wavelengths, else ``chNNN`` (see
    :func:`is_generated_name`)."""
    if wavelengths is not None:
        return [f"{w:.2f}nm" for w in wavelengths]
    width = max(3, len(str(num_channels - 1)))
    return [f"ch{c:0{width}d}" for c in range(num_channels)]


_GENERATED_NAME = re.compile(r"ch\d{3,}|-?\d+\.\d{2}nm")


def is_generated_name(name: str) -> bool:
    """A name :func:`default_channel_names` made: it says where a channel sits (its position or
    wavelength), not what it is, so it never identifies a channel across data sets (dchag/transfer
    matches such channels by wavelength instead)."""
    return _GENERATED_NAME.fullmatch(str(name)) is not None


def as_wavelengths(values, num_channels: int, where: str) -> np.ndarray | None:
    if values is None:
        return None
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if arr.size != num_channels:
        raise DataError(f"{where} lists {arr.size} wavelengths but the data has {num_channels} channels; "
                        "fix the wavelength list so it has one value per channel.")
    return arr


def as_names(values: Sequence | None, num_channels: int, where: str) -> list[str] | None:
    if values is None:
        return None
    names = [v.decode() if isinstance(v, bytes) else str(v) for v in np.asarray(values).reshape(-1)]
    if len(names) != num_channels:
        raise DataError(f"{where} lists {len(names)} channel names but the data has {num_channels} channels; "
                        "fix the name list so it has one name per channel.")
    return names
