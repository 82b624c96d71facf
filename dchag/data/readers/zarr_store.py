"""Zarr stores (v2 or v3), two layouts:

- a *weather-style group* whose arrays carry dimension names with lat/lon (ERA5, WeatherBench):
  variables are channels (default: sorted by name -- a store has no defined member order),
  read through :class:`~.variables.VariableSource` (xarray, zarr engine);
- a *plain array* [C, H, W] or [N, C, H, W] (the store itself, or ``store.zarr::name``), read by
  chunked slicing with the zarr library. Chunk with few channels per chunk for sharded reading:
  zarr decodes whole chunks. Metadata from attributes as for HDF5 (wavelengths,
  channel_names, _FillValue/nodata/missing_value, scale_factor/add_offset).
"""

from __future__ import annotations

import os
import warnings

import numpy as np

from ..errors import DataError
from .base import Source, as_names, as_wavelengths, default_channel_names, require_file
from .channel_axis import ChannelsFirstArray
from .variables import LAT_NAMES, LON_NAMES, VariableSource

_NODATA_ATTRS = ("_FillValue", "nodata", "missing_value", "data ignore value")


def _zopen(path: str, mode="r"):
    import zarr

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return zarr.open(path, mode=mode)
    except Exception as e:  # zarr raises several types for a broken store
        raise DataError(f"{path} cannot be opened as a Zarr store ({type(e).__name__}: {e}); it is damaged, "
                        "incomplete or not Zarr. Re-copy it, or pass the right --data-format.") from e


def _dim_names(arr) -> tuple | None:
    meta = getattr(arr, "metadata", None)
    names = getattr(meta, "dimension_names", None)
    if names:
        return tuple(names)
    names = arr.attrs.get("_ARRAY_DIMENSIONS")  # zarr v2 convention (xarray)
    return tuple(names) if names else None


def _is_gridded(arr) -> bool:
    names = _dim_names(arr)
    if not names:
        return False
    low = {str(n).lower() for n in names}
    return bool(low & LAT_NAMES) and bool(low & LON_NAMES)


class ZarrArraySource(ChannelsFirstArray, Source):
    format = "zarr"
    _HANDLE_ATTRS = ("_arr",)

    def __init__(self, path: str, *, array: str | None = None, wavelengths=None, channel_names=None, nodata=None,
                 channels_last: bool = False):
        super().__init__(path)
        self.channels_last = bool(channels_last)
        self.array_name = array
        arr = self._open()
        if arr.ndim not in (3, 4):
            raise DataError(f"{self.describe_name()} has shape {arr.shape}; it must be [C, H, W] or [N, C, H, W].")
        if np.dtype(arr.dtype).kind not in "biuf":
            raise DataError(f"{self.describe_name()} has dtype {arr.dtype}; images must be numeric.")
        n, c, h, w = self._shape = self._stack_shape(arr.shape)
        self._raw_itemsize = np.dtype(arr.dtype).itemsize
        attrs = dict(arr.attrs)
        if wavelengths is None:
            wavelengths = attrs.get("wavelengths", attrs.get("wavelength"))
        if channel_names is None:
            channel_names = attrs.get("channel_names", attrs.get("band_names"))
        listed = next((v for v in (channel_names, wavelengths) if v is not None), None)
        self.declared_channels = None if listed is None else int(np.asarray(listed).size)
        self.check_metadata_count(f"{self.describe_name()}'s attributes")
        self.wavelengths = as_wavelengths(wavelengths, c, f"{self.describe_name()} wavelengths")
        self.channel_names = as_names(channel_names, c, f"{self.describe_name()} channel names") \
            or default_channel_names(c, self.wavelengths)
        if nodata is None:
            nodata = next((attrs[k] for k in _NODATA_ATTRS if k in attrs), None)
        self.nodata = self._mask_value = None if nodata is None else float(nodata)
        if "scale_factor" in attrs:
            self._multiplier = float(attrs["scale_factor"])
        if "add_offset" in attrs:
            self._offset = float(attrs["add_offset"])

    def _array_shape(self) -> tuple:
        return tuple(self._open().shape)

    def _array_name(self) -> str:
        return self.describe_name()

    def _label_hint(self) -> str:
        return "Or give the array a 'wavelengths' or 'channel_names' attribute (one entry per channel)."

    def describe_name(self) -> str:
        return self.path + (f"::{self.array_name}" if self.array_name else "")

    def _open(self):
        if self._fresh() or getattr(self, "_arr", None) is None:
            import zarr

            node = _zopen(self.path)
            if self.array_name:
                try:
                    node = node[self.array_name]
                except KeyError as e:
                    raise DataError(f"{self.path} has no array {self.array_name!r}; it has "
                                    f"{sorted(node.array_keys()) if hasattr(node, 'array_keys') else []}.") from e
            if not isinstance(node, zarr.Array):
                raise DataError(f"{self.describe_name()} is a Zarr group, not an array; name the array "
                                f"as {self.path}::NAME in --data-path.")
            self._arr = node
        return self._arr

    def _read_block(self, index, c0, c1, r0, r1, k0, k1):
        arr = self._open()
        try:
            return self._slice(arr, index, c0, c1, r0, r1, k0, k1)
        except Exception as e:
            raise DataError(f"reading {self.describe_name()} image {index} failed ({type(e).__name__}: {e}); "
                            "the store is damaged. Re-copy or regenerate it.") from e


def open_zarr(path: str, *, selector: str | None = None, array: str | None = None, variables=None,
              nodata=None, **kw) -> Source:
    """Pick the layout: a weather-style group (``selector`` = variables), or an array (the store
    itself, the one 3-4-D array of a group, or the array named by ``selector``/``array``)."""
    import zarr

    require_file(path)
    node = _zopen(path)
    if isinstance(node, zarr.Array):
        return ZarrArraySource(path, nodata=nodata, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # non-zarr files (e.g. sample_info.json) inside the store
        arrays = dict(node.arrays())
    if array is None and any(_is_gridded(a) for a in arrays.values()):
        return VariableSource(path, engine="zarr", format_name="zarr", variables=variables or selector,
                              nodata=nodata, open_kwargs={"consolidated": _has_consolidated(path)},
                              sort_variables=True)
    name = array or selector
    if name:
        return ZarrArraySource(path, array=name, nodata=nodata, **kw)
    stacks = [k for k, a in arrays.items() if a.ndim in (3, 4)]
    if len(stacks) == 1:
        return ZarrArraySource(path, array=stacks[0], nodata=nodata, **kw)
    raise DataError(f"{path} is a Zarr group with {len(stacks)} arrays of 3-4 dims ({', '.join(stacks) or 'none'}) "
                    "and no lat/lon dimension names; name the image array as PATH::NAME in --data-path.")


def _has_consolidated(path: str) -> bool:
    if os.path.exists(os.path.join(path, ".zmetadata")):
        return True
    try:
        import json

        with open(os.path.join(path, "zarr.json")) as f:
            return bool(json.load(f).get("consolidated_metadata"))
    except (OSError, ValueError):
        return False
