"""A folder of files of one format, seen as one source concatenated along N.

Every file must have the same channels (count and names): a channel-parallel rank's slice
must mean the same bands in every file. Image sizes may differ between files (tiles are cut per
image; see ``image_hw``); then ``shape`` reports H = W = None. Latitudes, when present, must
agree (one grid).
"""

from __future__ import annotations

import bisect

import numpy as np

from ..errors import DataError
from .base import Source


class ConcatSource(Source):
    def __init__(self, path: str, parts: list[Source]):
        super().__init__(path)
        if not parts:
            raise DataError(f"folder {path} holds no data files; check --data-path.")
        first = parts[0]
        self.format = first.format
        self.parts = parts
        for p in parts[1:]:
            if p.num_channels != first.num_channels:
                raise DataError(
                    f"{p.path} has {p.num_channels} channels but {first.path} has {first.num_channels}; every file "
                    f"in the folder {path} must have the same channels. Move the odd file out or split the folder.")
            if p.channel_names != first.channel_names:
                diff = next(i for i, (a, b) in enumerate(zip(p.channel_names, first.channel_names)) if a != b)
                raise DataError(
                    f"{p.path} channel {diff} is {p.channel_names[diff]!r} but in {first.path} it is "
                    f"{first.channel_names[diff]!r}; files in one folder must store the same channels in the same "
                    "order. Reorder/re-export the file or move it out of the folder.")
            if (p.latitudes is None) != (first.latitudes is None) or (
                    p.latitudes is not None and not np.allclose(p.latitudes, first.latitudes)):
                raise DataError(f"{p.path} and {first.path} lie on different latitude grids; regrid to one grid.")
        self._starts = np.cumsum([0] + [p.num_images for p in parts]).tolist()
        sizes = {p.shape[2:] for p in parts}
        H, W = sizes.pop() if len(sizes) == 1 else (None, None)
        self._shape = (self._starts[-1], first.num_channels, H, W)
        self.channel_names = list(first.channel_names)
        self.wavelengths = first.wavelengths
        self.nodata = first.nodata
        self.latitudes, self.longitudes = first.latitudes, first.longitudes
        self.files = [p.path for p in parts]

    def describe(self) -> str:
        return f"{self.format} folder {self.path!r} ({len(self.parts)} files, N = {self.num_images}, C = {self.num_channels})"

    def locate(self, index: int) -> tuple[Source, int]:
        """(file source, index inside that file) of global image ``index``."""
        self._check_index(index)
        i = bisect.bisect_right(self._starts, int(index)) - 1
        return self.parts[i], int(index) - self._starts[i]

    def image_hw(self, index: int) -> tuple[int, int]:
        part, local = self.locate(index)
        return part.image_hw(local)

    def read(self, index, channels=None, rows=None, cols=None):
        part, local = self.locate(index)
        before = part.elements_read, part.bytes_read
        out = part.read(local, channels, rows, cols)
        self.elements_read += part.elements_read - before[0]
        self.bytes_read += part.bytes_read - before[1]
        self.channels_read |= part.channels_read
        return out

    def reset_counters(self) -> None:
        super().reset_counters()
        for p in getattr(self, "parts", []):
            p.reset_counters()

    def release_pages(self) -> None:
        for p in self.parts:
            p.release_pages()

    def close(self):
        for p in self.parts:
            p.close()
