"""HDF5 files: one dataset [C, H, W] or [N, C, H, W], read by hyperslab through h5py.

Which dataset: ``dataset=`` (or ``file.h5::group/name`` in the path); by default the only
dataset with 3 or 4 dimensions, else one named data/images/cube/reflectance/radiance.
Metadata read from the dataset's attributes (or a sibling dataset for wavelengths):
``wavelengths``/``wavelength`` [C] (nm), ``channel_names``/``band_names`` [C],
no-data ``_FillValue``/``nodata``/``missing_value``/``data ignore value``, and CF
``scale_factor``/``add_offset``. For channel-sharded reading, chunk the dataset with one
channel (or a few) per chunk: h5py decompresses whole chunks.
"""

from __future__ import annotations

import numpy as np

from ..errors import DataError
from .base import Source, as_names, as_wavelengths, default_channel_names, require_file
from .channel_axis import ChannelsFirstArray

_PREFERRED = ("data", "images", "image", "cube", "reflectance", "radiance")
_NODATA_ATTRS = ("_FillValue", "nodata", "missing_value", "data ignore value", "no_data_value")


def _h5_open(path: str):
    import h5py

    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise DataError(f"{path} cannot be opened as HDF5 ({e}); the file is truncated, damaged or not HDF5. "
                        "Re-copy or regenerate it, or pass the right --data-format.") from e


def _candidates(f) -> list[str]:
    import h5py

    found = []
    f.visititems(lambda name, obj: found.append(name)
                 if isinstance(obj, h5py.Dataset) and obj.ndim in (3, 4) else None)
    return found


class Hdf5Source(ChannelsFirstArray, Source):
    format = "hdf5"
    _HANDLE_ATTRS = ("_file",)

    def __init__(self, path: str, *, dataset: str | None = None, wavelengths=None, channel_names=None,
                 nodata=None, channels_last: bool = False):
        super().__init__(path)
        self.channels_last = bool(channels_last)
        require_file(self.path)
        f = self._open()
        self.dataset = dataset or self._pick_dataset(f)
        if self.dataset not in f:
            raise DataError(f"{self.path} has no dataset {self.dataset!r}; it has {_candidates(f) or 'no 3-D/4-D datasets'}. "
                            f"Name one with {self.path}::NAME in --data-path.")
        d = f[self.dataset]
        if d.ndim not in (3, 4):
            raise DataError(f"{self.path}::{self.dataset} has shape {d.shape}; it must be [C, H, W] or [N, C, H, W].")
        if d.dtype.kind not in "biuf":
            raise DataError(f"{self.path}::{self.dataset} has dtype {d.dtype}; images must be numeric.")
        n, c, h, w = self._shape = self._stack_shape(d.shape)
        self._raw_itemsize = d.dtype.itemsize
        attrs = dict(d.attrs)

        wl = wavelengths
        if wl is None:
            for key in ("wavelengths", "wavelength"):
                if key in attrs:
                    wl = attrs[key]
                    break
                parent = d.parent
                if key in parent and parent[key].shape == (c,):
                    wl = parent[key][()]
                    break
        names = channel_names
        if names is None:
            names = next((attrs[k] for k in ("channel_names", "band_names") if k in attrs), None)
        listed = next((v for v in (names, wl) if v is not None), None)
        self.declared_channels = None if listed is None else int(np.asarray(listed).size)
        self.check_metadata_count(f"{self.path}::{self.dataset}'s attributes")
        self.wavelengths = as_wavelengths(wl, c, f"{self.path}::{self.dataset} wavelengths")
        self.channel_names = as_names(names, c, f"{self.path}::{self.dataset} channel names") \
            or default_channel_names(c, self.wavelengths)
        if nodata is None:
            nodata = next((attrs[k] for k in _NODATA_ATTRS if k in attrs), None)
        self.nodata = self._mask_value = None if nodata is None else float(np.asarray(nodata).reshape(-1)[0])
        if "scale_factor" in attrs:
            self._multiplier = float(np.asarray(attrs["scale_factor"]).reshape(-1)[0])
        if "add_offset" in attrs:
            self._offset = float(np.asarray(attrs["add_offset"]).reshape(-1)[0])

    def _array_shape(self) -> tuple:
        return tuple(self._open()[self.dataset].shape)

    def _array_name(self) -> str:
        return f"{self.path}::{self.dataset}"

    def _label_hint(self) -> str:
        return "Or give the dataset a 'wavelengths' or 'channel_names' attribute (one entry per channel)."

    def _pick_dataset(self, f) -> str:
        cands = _candidates(f)
        if len(cands) == 1:
            return cands[0]
        for name in _PREFERRED:
            if name in cands:
                return name
        raise DataError(
            f"{self.path} has {len(cands)} datasets with 3 or 4 dimensions ({', '.join(cands) or 'none'}); "
            f"name the image dataset in --data-path as {self.path}::NAME.")

    def _open(self):
        if self._fresh() or getattr(self, "_file", None) is None:
            self._file = _h5_open(self.path)  # h5py handles must not cross a fork: reopen per process
        return self._file

    def _read_block(self, index, c0, c1, r0, r1, k0, k1):
        d = self._open()[self.dataset]
        try:
            return self._slice(d, index, c0, c1, r0, r1, k0, k1)
        except OSError as e:
            raise DataError(f"reading {self.path}::{self.dataset} image {index} failed ({e}); the file is "
                            "truncated or damaged. Re-copy or regenerate it.") from e
