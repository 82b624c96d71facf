"""NumPy ``.npy`` files: [C, H, W] (one image) or [N, C, H, W], read through a memory map.

The channels come first, or last when the user says so (``channels_last``: [H, W, C] or
[N, H, W, C]); a channel count (--num-channels, or the sidecar below) must fit that axis
(``channel_axis``).

``np.load(mmap_mode='r')`` maps the file; slicing [n, c0:c1, r0:r1, k0:k1] touches only the
pages of those channels (for C-ordered data each channel of an image is one contiguous run).

Channel names and wavelengths travel in a sidecar beside the file, ``FILE.channels.json`` (for
``cube.npy``: ``cube.channels.json``; ``cube.npy.channels.json`` also works)::

    {"channel_names": ["b400", "b405", ...], "wavelengths": [400.0, 405.0, ...]}   # nm; either key optional
    ["b400", "b405", ...]                                                         # names only

Values given to the reader directly take precedence. Logs, reconstruction pictures and exports
use them as they use an ENVI header's band names and wavelengths.
"""

from __future__ import annotations

import json
import os

import numpy as np

from ..errors import DataError
from .base import Source, as_names, as_wavelengths, default_channel_names, require_file
from .channel_axis import ChannelsFirstArray


class NpySource(ChannelsFirstArray, Source):
    format = "npy"
    _HANDLE_ATTRS = ("_arr",)
    _MAPPED_ATTRS = ("_arr",)

    def __init__(self, path: str, *, wavelengths=None, channel_names=None, nodata=None, channels_last: bool = False):
        super().__init__(path)
        self.channels_last = bool(channels_last)
        require_file(self.path)
        arr = self._open()
        if arr.ndim not in (3, 4):
            raise DataError(
                f"{self.path} holds an array of shape {arr.shape}; an .npy image must be [C, H, W] "
                "or a stack [N, C, H, W] ([H, W, C] / [N, H, W, C] with --channels-last). Add the missing axis (e.g. a[None] for one channel) and re-save.")
        if arr.dtype.kind not in "biuf":
            raise DataError(f"{self.path} has dtype {arr.dtype}; only numeric (int/uint/float) arrays "
                            "can be used as images. Convert it with a.astype(np.float32) and re-save.")
        n, c, h, w = self._shape = self._stack_shape(arr.shape)
        self._raw_itemsize = arr.dtype.itemsize
        self.sidecar = sidecar_path(self.path)
        where = f"{self.path} (shape {tuple(arr.shape)})"
        if self.sidecar is not None and (wavelengths is None or channel_names is None):
            meta = read_sidecar(self.sidecar)
            where = f"{self.sidecar} (channel sidecar of {self.path}, shape {tuple(arr.shape)})"
            wavelengths = meta.get("wavelengths") if wavelengths is None else wavelengths
            channel_names = meta.get("channel_names") if channel_names is None else channel_names
        # The channel count the metadata states decides the channel axis (never the shape alone).
        listed = next((v for v in (channel_names, wavelengths) if v is not None), None)
        self.declared_channels = None if listed is None else int(np.asarray(listed).size)
        self.check_metadata_count(where)
        self.wavelengths = as_wavelengths(wavelengths, c, where)
        self.channel_names = as_names(channel_names, c, where) or default_channel_names(c)
        self.nodata = self._mask_value = None if nodata is None else float(nodata)

    def _array_shape(self) -> tuple:
        return tuple(self._open().shape)

    def _array_name(self) -> str:
        return self.path

    def _label_hint(self) -> str:
        stem = self.path[:-4] if self.path.endswith(".npy") else self.path
        return f'Or list the channels in a sidecar {stem}.channels.json: {{"channel_names": [...]}} (one per channel).'

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
        return self._slice(self._open(), index, c0, c1, r0, r1, k0, k1)


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
    if isinstance(meta, list):  # a bare list: the channel names
        if not all(isinstance(v, str) for v in meta):
            raise DataError(f"the channel sidecar {path} is a list of non-names ({meta[:3]}...); a bare list must hold "
                            'the channel names as strings; for wavelengths write {"wavelengths": [...]} (nm).')
        return {"channel_names": meta}
    unknown = sorted(set(meta) - {"channel_names", "wavelengths"}) if isinstance(meta, dict) else None
    if unknown is None or unknown:
        raise DataError(f"the channel sidecar {path} must be a JSON object with 'channel_names' and/or "
                        f"'wavelengths' (nm), or a list of channel names"
                        f"{'; unknown keys: ' + ', '.join(unknown) if unknown else ''}.")
    return meta
