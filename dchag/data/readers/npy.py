"""NumPy ``.npy`` files: [C, H, W] (one image) or [N, C, H, W], read through a memory map.

``np.load(mmap_mode='r')`` maps the file; slicing [n, c0:c1, r0:r1, k0:k1] touches only the
pages of those channels (for C-ordered data each channel of an image is one contiguous run).
"""

from __future__ import annotations

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
        self.wavelengths = as_wavelengths(wavelengths, c, "wavelengths=")
        self.channel_names = as_names(channel_names, c, "channel_names=") or default_channel_names(c)
        self.nodata = self._mask_value = None if nodata is None else float(nodata)

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
