"""Readers: ``open_source(path, data_format)`` -> a :class:`Source` of images [N, C, H, W].

Formats (``--data-format``): npy, envi, hdf5, zarr, netcdf, synthetic, and auto (by file
extension or folder type). ``path`` may name a file, a Zarr store, or a folder of files of one
format (concatenated along N). ``PATH::SELECTOR`` picks the dataset/array inside an HDF5 file
or Zarr store, or the variables (comma-separated) of a NetCDF/Zarr weather data set.
"""

from __future__ import annotations

from .base import Source
from .concat import ConcatSource
from .detect import FORMATS, detect_format, list_folder
from .envi import EnviSource
from .hdf5 import Hdf5Source
from .npy import NpySource
from .open import open_source
from .synthetic import SyntheticSource
from .variables import VariableSource
from .zarr_store import ZarrArraySource

__all__ = ["FORMATS", "Source", "ConcatSource", "EnviSource", "Hdf5Source", "NpySource", "SyntheticSource",
           "VariableSource", "ZarrArraySource", "detect_format", "list_folder", "open_source"]
