"""ENVI images (``.hdr`` header + raw data file), BSQ/BIL/BIP, any ENVI data type and byte order.

The header is parsed by ``spectral`` (data type, byte order, header offset, interleave,
``wavelength``/``wavelength units``, ``band names``, ``reflectance scale factor``,
``data ignore value``). The data file is then memory-mapped in its stored interleave:

    BSQ: (bands, lines, samples)   a channel range is one contiguous run per band
    BIL: (lines, bands, samples)   per line, the channel range is contiguous
    BIP: (lines, samples, bands)   pixel-interleaved: pages read also hold other bands

and sliced, so a read touches only the requested bands of the requested window (for BIP the
operating system still pages in whole pixels; store BSQ for channel-sharded training).
The cube is one image: shape (N=1, C=bands, H=lines, W=samples).
Values come back divided by the reflectance scale factor, ``data ignore value`` as NaN.
"""

from __future__ import annotations

import os

import numpy as np

from ..errors import DataError
from .base import Source, as_names, default_channel_names, require_file

_DATA_EXTS = ("", ".img", ".dat", ".raw", ".bin", ".bsq", ".bil", ".bip", ".sli", ".hyspex")
_UNIT_TO_NM = {"nanometers": 1.0, "nanometer": 1.0, "nm": 1.0, "micrometers": 1000.0,
               "micrometer": 1000.0, "microns": 1000.0, "um": 1000.0, "millimeters": 1e6, "mm": 1e6}


def find_envi_pair(path: str) -> tuple[str, str]:
    """(header, data file) for a path that names either one."""
    require_file(path, "ENVI file")
    stem, ext = os.path.splitext(path)
    if ext.lower() == ".hdr":
        header = path
        for e in _DATA_EXTS + tuple(x.upper() for x in _DATA_EXTS if x):
            if os.path.isfile(stem + e):
                return header, stem + e
        raise DataError(
            f"ENVI header {header} has no data file beside it (looked for {os.path.basename(stem)} with "
            f"extensions {', '.join(e or '(none)' for e in _DATA_EXTS)}); copy the data file next to the header "
            "with the same name.")
    for header in (path + ".hdr", stem + ".hdr", path + ".HDR", stem + ".HDR"):
        if os.path.isfile(header):
            return header, path
    raise DataError(f"{path} has no ENVI header ({os.path.basename(stem)}.hdr) beside it; an ENVI image needs "
                    "its .hdr file in the same folder.")


class EnviSource(Source):
    format = "envi"
    _HANDLE_ATTRS = ("_mm",)
    _MAPPED_ATTRS = ("_mm",)

    def __init__(self, path: str, *, nodata=None, apply_scale: bool = True):
        super().__init__(path)
        from spectral.io import envi  # imported here: only ENVI users pay for it

        self.header_path, self.data_path = find_envi_pair(self.path)
        try:
            header = envi.read_envi_header(self.header_path)
            envi.check_compatibility(header)
            params = envi.gen_params(header)
        except (envi.FileNotAnEnviHeader, envi.EnviHeaderParsingError, envi.EnviFeatureNotSupported,
                envi.EnviDataTypeError, KeyError, ValueError) as e:
            raise DataError(f"{self.header_path} is not a usable ENVI header ({type(e).__name__}: {e}); it must "
                            "start with 'ENVI' and give samples, lines, bands, data type and byte order.") from e
        self.header = header
        self.interleave = str(header.get("interleave", "bsq")).strip().lower()
        if self.interleave not in ("bsq", "bil", "bip"):
            raise DataError(f"{self.header_path}: interleave {self.interleave!r} is not one of bsq, bil, bip; "
                            "fix the 'interleave' line of the header.")
        self._dtype = np.dtype(params.dtype)  # includes the byte order from the header
        self._offset_bytes = int(params.offset)
        bands, lines, samples = params.nbands, params.nrows, params.ncols
        self._shape = (1, bands, lines, samples)
        self._raw_itemsize = self._dtype.itemsize
        self._check_size(bands, lines, samples)

        if "wavelength" in header:
            try:
                wl = np.asarray([float(w) for w in header["wavelength"]], np.float64)
            except ValueError as e:
                raise DataError(f"{self.header_path}: the 'wavelength' list is not numeric ({e}); fix the header.") from e
            if wl.size != bands:
                raise DataError(f"{self.header_path} lists {wl.size} wavelengths for {bands} bands; fix the "
                                "'wavelength' list or the 'bands' count in the header.")
            unit = str(header.get("wavelength units", "nanometers")).strip().lower()
            self.wavelengths = wl * _UNIT_TO_NM.get(unit, 1.0)
        names = as_names(header.get("band names"), bands, f"{self.header_path} 'band names'") \
            if "band names" in header else None
        self.channel_names = names or default_channel_names(bands, self.wavelengths)

        ignore = nodata if nodata is not None else header.get("data ignore value")
        self.nodata = self._mask_value = None if ignore is None else float(ignore)
        scale = float(header.get("reflectance scale factor", 1.0)) if apply_scale else 1.0
        if scale <= 0:
            raise DataError(f"{self.header_path}: reflectance scale factor {scale} must be positive; fix the header.")
        self.scale_factor = scale
        self._multiplier = None if scale == 1.0 else 1.0 / scale

    def _check_size(self, bands, lines, samples):
        need = self._offset_bytes + bands * lines * samples * self._dtype.itemsize
        have = os.path.getsize(self.data_path)
        if have < need:
            raise DataError(
                f"ENVI data file {self.data_path} is truncated: its header says {bands} bands x {lines} lines x "
                f"{samples} samples of {self._dtype.name} (+{self._offset_bytes} header bytes) = {need} bytes, but the "
                f"file has {have} bytes. Re-copy the file (an interrupted transfer?) or correct 'bands', 'lines', "
                f"'samples', 'data type' or 'header offset' in {self.header_path}.")

    def _open(self) -> np.memmap:
        if self._fresh() or getattr(self, "_mm", None) is None:
            _, C, H, W = self._shape
            shape = {"bsq": (C, H, W), "bil": (H, C, W), "bip": (H, W, C)}[self.interleave]
            self._mm = np.memmap(self.data_path, dtype=self._dtype, mode="r", offset=self._offset_bytes, shape=shape)
        return self._mm

    def _read_block(self, index, c0, c1, r0, r1, k0, k1):
        mm = self._open()
        if self.interleave == "bsq":
            return mm[c0:c1, r0:r1, k0:k1]
        if self.interleave == "bil":
            return mm[r0:r1, c0:c1, k0:k1].transpose(1, 0, 2)
        return mm[r0:r1, k0:k1, c0:c1].transpose(2, 0, 1)

    def close(self):
        self._mm = None  # np.memmap has no close(); dropping the reference unmaps it
        super().close()
