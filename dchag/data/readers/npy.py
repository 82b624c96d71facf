"""NumPy ``.npy`` files: [C, H, W] (one image) or [N, C, H, W], read through a memory map.

``np.load(mmap_mode='r')`` maps the file; slicing [n, c0:c1, r0:r1, k0:k1] touches only the
pages of those channels (for C-ordered data each channel of an image is one contiguous run).

Channel names and wavelengths travel in a sidecar beside the file, ``FILE.channels.json`` (for
``cube.npy``: ``cube.channels.json``; ``cube.npy.channels.json`` also works)::

    {"channel_names": ["b400", "b405", ...], "wavelengths": [400.0, 405.0, ...]}   # nm; either key optional

Values given to the reader directly take precedence. Logs, reconstruction pictures and exports
use them as they use an ENVI header's band names and wavelengths.
"""

from __future__ import annotations

import json
import os

import numpy as np

from ..errors import DataError
from .base import Source, as_names, as_wavelengths, default_channel_names, require_file


class NpySource(Source):
    format = "npy"
    _HANDLE_ATTRS = ("_arr",)

    def __init__(self, path: str, *, wavelengths=None, channel_names=None, nodata=None):
        super().__init__(path)
        require_file(self.path)
        arr = self._open()
        if arr.ndim not in (3, 4):
            raise DataError(
                f"{self.path} holds an array of shape {arr.shape}; an .npy image must be [C, H, W] "
                "or a stack [N, C, H, W]. Add the missing axis (e.g. a[None] for one channel) and re-save.")
        if arr.dtype.kind not in "biuf":
            raise DataError(f"{self.path} has dtype {arr.dtype}; only numeric (int/uint/float) arrays "
                            "can be used as images. Convert it with a.astype(np.float32) and re-save.")
        n, c, h, w = (1, *arr.shape) if arr.ndim == 3 else arr.shape
        self._shape = (n, c, h, w)
        self._raw_itemsize = arr.dtype.itemsize
        self.sidecar = sidecar_path(self.path)
        if self.sidecar is not None and (wavelengths is None or channel_names is None):
            meta = read_sidecar(self.sidecar)
            where = f"{self.sidecar} (channel sidecar of {self.path}, shape {tuple(arr.shape)})"
            wavelengths = meta.get("wavelengths") if wavelengths is None else wavelengths
            channel_names = meta.get("channel_names") if channel_names is None else channel_names
            self.wavelengths = as_wavelengths(wavelengths, c, where)
            self.channel_names = as_names(channel_names, c, where) or default_channel_names(c)
            self.nodata = self._mask_value = None if nodata is None else float(nodata)
            return
        self.wavelengths = as_wavelengths(wavelengths, c, "wavelengths=")
        self.channel_names = as_names(channel_names, c, "channel_names=") or default_channel_names(c)
        self.nodata = self._mask_value = None if nodata is None else float(nodata)

    def channels_last_hint(self, num_channels: int) -> str:
        """A fix for an array saved channels-last ([H, W, C] or [N, H, W, C]), or ''."""
        shape = self._open().shape
        if shape[-1] == num_channels and shape[-3] != num_channels:
            return (f" It looks channels-last ({list(shape)}: the last axis has {num_channels}); save it channels-first: "
                    f"np.save(path, np.moveaxis(a, -1, -3)) (that is a.transpose({'2, 0, 1' if len(shape) == 3 else '0, 3, 1, 2'})).")
        return ""

    def check_channels_first(self) -> None:
        """Without --num-channels: refuse an array whose first two image axes are equal and the last
        differs ([H, H, C] is far more likely channels-last than C = H channels of H x C images)."""
        shape = self._open().shape
        if shape[-3] == shape[-2] != shape[-1]:
            raise DataError(
                f"{self.path} has shape {list(shape)}, read as {shape[-3]} channels of {shape[-2]} x {shape[-1]} "
                f"images; it looks channels-last ([H, W, C] with {shape[-1]} channels). Save it channels-first: "
                f"np.save(path, np.moveaxis(a, -1, -3)) (that is a.transpose("
                f"{'2, 0, 1' if len(shape) == 3 else '0, 3, 1, 2'})); if it really is channels-first, confirm with "
                f"--num-channels {shape[-3]}.")

    def _open(self) -> np.ndarray:
        if self._fresh() or getattr(self, "_arr", None) is None:
            try:
                self._arr = np.load(self.path, mmap_mode="r", allow_pickle=False)
            except ValueError as e:
                # numpy says "mmap length is greater than file size" for a short file.
                raise DataError(
                    f"{self.path} cannot be memory-mapped ({e}); the file is truncated, damaged or not "
                    "a plain .npy array. Re-copy or regenerate it (np.save(path, array)).") from e
            except OSError as e:
                raise DataError(f"{self.path} is not a readable .npy file ({e}); re-save it with np.save.") from e
        return self._arr

    def _read_block(self, index, c0, c1, r0, r1, k0, k1):
        arr = self._open()
        if arr.ndim == 3:
            return arr[c0:c1, r0:r1, k0:k1]
        return arr[index, c0:c1, r0:r1, k0:k1]


def sidecar_path(path: str) -> str | None:
    """``cube.channels.json`` (or ``cube.npy.channels.json``) beside ``cube.npy``, if present."""
    stem = path[:-4] if path.endswith(".npy") else path
    for candidate in (stem + ".channels.json", path + ".channels.json"):
        if os.path.isfile(candidate):
            return candidate
    return None


def read_sidecar(path: str) -> dict:
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read the channel sidecar {path} ({e}); it must be JSON like "
                        '{"channel_names": [...], "wavelengths": [...]}.') from e
    unknown = sorted(set(meta) - {"channel_names", "wavelengths"}) if isinstance(meta, dict) else None
    if unknown is None or unknown:
        raise DataError(f"the channel sidecar {path} must be a JSON object with 'channel_names' and/or "
                        f"'wavelengths' (nm){'; unknown keys: ' + ', '.join(unknown) if unknown else ''}.")
    return meta
