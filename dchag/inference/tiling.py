"""A scene cut into the model's tiles, and the tiles' outputs stitched back (numpy only).

Along each axis, tiles of ``tile`` pixels start every ``tile - overlap`` pixels; where the last
one would run past the edge it is shifted back to end at the edge, so every pixel is covered and
none is dropped (an image smaller than a tile gets one tile, padded). Each tile's output is
weighted by a separable window, normalized so that at every pixel the weights of the tiles that
cover it sum to one (a partition of unity): the stitched value is a weighted mean of the tiles'.

- ``overlap = 0`` (the default): weight 1 on the pixels whose last covering tile this is, 0
  elsewhere: every pixel comes from the last tile that covers it (the shifted edge tile replaces
  its neighbour's values there), exactly the stitching of earlier versions.
- ``overlap > 0``: a linear ramp, ``w(t) = min(1, (t + 1/2) / overlap, (tile - t - 1/2) / overlap)``
  for t = 0 .. tile - 1 (a trapezoid: flat in the tile's middle, falling linearly over ``overlap``
  pixels towards each edge, to ``1 / (2 overlap)`` at the edge pixel), the product of the row and
  column ramps, divided by the sum of the ramps of the tiles covering the pixel. A seam between
  two tiles becomes a linear cross-fade over the overlap; at the scene's border (one tile) the
  normalization gives weight 1.

The weights sum to one per axis, so tiles are added without a second pass; rows are finished
(and written) as soon as no later tile covers them: memory holds one band of tile rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np


def tile_starts(size: int, tile: int, step: int | None = None) -> list[int]:
    """Start offsets covering [0, size) with tiles of ``tile`` (the last shifted back to end at
    the edge; one start 0 when the image is smaller than a tile)."""
    step = step or tile
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile + 1, step))
    if starts[-1] + tile < size:
        starts.append(size - tile)
    return starts


def ramp(tile: int, overlap: int) -> np.ndarray:
    """float64 [tile]: the blending window of one tile along an axis (see the module docstring)."""
    t = np.arange(tile) + 0.5
    return np.minimum(1.0, np.minimum(t, tile - t) / overlap)


@dataclass(frozen=True)
class Axis:
    """The tiles along one axis: their starts and, per tile, the weight of each of its pixels
    (float64 [n, tile]; 0 beyond ``size`` for a padded tile)."""
    size: int
    tile: int
    overlap: int
    starts: tuple[int, ...]
    weights: np.ndarray

    @classmethod
    def plan(cls, size: int, tile: int, overlap: int = 0) -> "Axis":
        if not 0 <= overlap < tile:
            raise ValueError(f"overlap {overlap} must be at least 0 and smaller than the tile ({tile}).")
        starts = tile_starts(size, tile, tile - overlap)
        n = len(starts)
        w = np.zeros((n, tile))
        if overlap == 0:  # each pixel from the last tile covering it
            for j, s in enumerate(starts):
                end = starts[j + 1] if j + 1 < n else size
                w[j, :end - s] = 1.0
        else:
            total = np.zeros(max(size, tile))
            window = ramp(tile, overlap)
            for s in starts:
                total[s:s + tile] += window
            for j, s in enumerate(starts):
                w[j] = window / total[s:s + tile]
        for j, s in enumerate(starts):
            w[j, max(0, size - s):] = 0.0  # padding beyond the image
        return cls(size, tile, overlap, tuple(starts), w)

    def end(self, j: int) -> int:
        """The first pixel after tile ``j`` inside the image."""
        return min(self.starts[j] + self.tile, self.size)


class Stitcher:
    """Adds weighted tile outputs of a stack of images and hands each finished band of rows on.

    Tiles must arrive in order: image, tile row, tile column (:meth:`order`). ``emit(i, r0, r1,
    block)`` receives float32 ``finish(block)`` for rows [r0, r1) of image ``i``, every column,
    once, in order. Memory: one band of ``planes x tile x W`` float64 values."""

    def __init__(self, planes: int, rows: Axis, cols: Axis, emit: Callable, finish: Callable | None = None):
        self.planes, self.rows, self.cols, self.emit = planes, rows, cols, emit
        self.finish = finish or (lambda block: block)
        self.acc = np.zeros((planes, rows.tile, cols.size))
        self.image, self.tile_row, self.base = None, None, 0  # the band holds rows [base, base + tile)

    def order(self, num_images: int) -> list[tuple[int, int, int]]:
        """Every tile (image, tile row, tile column), in the order :meth:`add` takes them."""
        return [(i, j, k) for i in range(num_images) for j in range(len(self.rows.starts))
                for k in range(len(self.cols.starts))]

    def add(self, i: int, j: int, k: int, y: np.ndarray) -> None:
        """``y`` [planes, tile_h, tile_w]: the output of tile (i, j, k)."""
        if i != self.image:
            self._flush()
            self.image, self.tile_row, self.base = i, None, 0
            self.acc[:] = 0.0
        if j != self.tile_row:
            self._advance(self.rows.starts[j])
            self.tile_row = j
        r0, c0 = self.rows.starts[j], self.cols.starts[k]
        nr, nc = self.rows.end(j) - r0, self.cols.end(k) - c0
        w = self.rows.weights[j, :nr, None] * self.cols.weights[k, None, :nc]  # [nr, nc]
        y = np.asarray(y[:, :nr, :nc], np.float64)
        self.acc[:, r0 - self.base:r0 - self.base + nr, c0:c0 + nc] += np.where(w > 0, y * w, 0.0)

    def _advance(self, start: int) -> None:
        """Rows before ``start`` are finished (no later tile row covers them): emit them, and move
        the band to begin at ``start``."""
        if start <= self.base:
            return
        done = start - self.base
        self._emit(self.base, start)
        keep = self.rows.tile - done
        if keep > 0:
            self.acc[:, :keep] = self.acc[:, done:]
        self.acc[:, max(keep, 0):] = 0.0
        self.base = start

    def _emit(self, r0: int, r1: int) -> None:
        r1 = min(r1, self.rows.size)
        if r1 > r0:
            block = self.acc[:, r0 - self.base:r1 - self.base]
            self.emit(self.image, r0, r1, np.asarray(self.finish(block), np.float32))

    def _flush(self) -> None:
        if self.image is not None:
            self._emit(self.base, self.base + self.rows.tile)
            self.image = None

    def close(self) -> None:
        """Emit the last image's remaining rows."""
        self._flush()
