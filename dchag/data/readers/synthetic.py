"""Deterministic synthetic many-channel images, generated per requested channel and window.

A linear mixing model, the standard picture of a hyperspectral scene:

    x[n, c, y, x] = sum_k S[k, c] * A[n, k, y, x] + noise * eps(seed, n, c, y, x)

- S [K, C]: K endmember spectra, each a baseline plus a few Gaussian bumps over the normalized
  channel axis -> smooth and (through the shared endmembers) correlated across channels.
  Evaluated only at the requested channels: cost O(K c), never O(C).
- A [N, K, H, W]: abundances = softmax over k of smooth periodic fields (a few low-frequency
  cosines whose phases drift with n, so consecutive "time steps" are a learnable forecast).
  Evaluated only on the requested window: cost O(K h w), independent of C.
- eps: counter-based Gaussian noise from a hash of (seed, n, c, y, x), so any window of any
  channel is bit-identical however the image is split across ranks, without generating the rest.

All parameters derive from ``seed``. Values are roughly in [0, 1.5] (reflectance-like).

The abundances are also a per-pixel target (``SyntheticTargetSource``, ``--target-path
synthetic``): regress them from the spectra (spectral unmixing), or segment their argmax (the
dominant endmember of each pixel), from the same seed and window as the input.
"""

from __future__ import annotations

import numpy as np

from ..errors import DataError
from .base import Source, default_channel_names

_M = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = (x + np.uint64(0x9E3779B97F4A7C15)) & _M
    x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _M
    x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _M
    return x ^ (x >> np.uint64(31))


def _uniform(key: np.ndarray) -> np.ndarray:
    """(0, 1) float64 from uint64 keys."""
    return ((_splitmix64(key) >> np.uint64(11)).astype(np.float64) + 0.5) / float(1 << 53)


def hashed_normal(seed: int, n: int, channels: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Standard normal [c, h, w], a pure function of (seed, n, channel, row, col)."""
    with np.errstate(over="ignore"):
        base = _splitmix64(np.uint64(seed & 0xFFFFFFFF) * np.uint64(1_000_003) + np.uint64(n))
        c = channels.astype(np.uint64)[:, None, None] * np.uint64(0x100000001B3)
        r = rows.astype(np.uint64)[None, :, None] * np.uint64(0x1000193)
        k = cols.astype(np.uint64)[None, None, :]
        key = _splitmix64(base ^ c) ^ (r * np.uint64(65_537) + k)
        u1 = _uniform(key)
        u2 = _uniform(key ^ np.uint64(0xD6E8FEB86659FD93))
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)


class SyntheticSource(Source):
    format = "synthetic"

    def __init__(self, path: str | None = None, *, num_channels: int, height: int, width: int,
                 num_images: int = 64, seed: int = 0, endmembers: int = 4, modes: int = 6,
                 noise: float = 0.01, global_grid: bool = False):
        super().__init__(path or "synthetic")
        for name, v in (("num_channels", num_channels), ("height", height), ("width", width),
                        ("num_images", num_images), ("endmembers", endmembers), ("modes", modes)):
            if int(v) < 1:
                raise DataError(f"synthetic data needs {name} >= 1, got {v}.")
        C, H, W, N = int(num_channels), int(height), int(width), int(num_images)
        self._shape = (N, C, H, W)
        self.seed, self.noise = int(seed), float(noise)
        rng = np.random.default_rng([self.seed, 0x5EED])
        K, J, M = int(endmembers), 3, int(modes)
        # Spectra: baseline + J Gaussian bumps each, on lambda in [0, 1]. Shapes [K] / [K, J].
        self._base = rng.uniform(0.1, 0.4, K)
        self._amp = rng.uniform(0.2, 1.0, (K, J))
        self._mu = rng.uniform(0.0, 1.0, (K, J))
        self._sigma = rng.uniform(0.05, 0.25, (K, J))
        # Abundance fields: M cosine modes per endmember with integer wave numbers (periodic,
        # smooth), amplitudes decaying with frequency, phases drifting by omega per image. [K, M].
        self._fy = rng.integers(0, 4, (K, M)).astype(np.float64)
        self._fx = rng.integers(0, 4, (K, M)).astype(np.float64)
        self._fx[(self._fy == 0) & (self._fx == 0)] = 1.0
        self._mamp = rng.uniform(0.5, 1.0, (K, M)) / np.sqrt(self._fy ** 2 + self._fx ** 2)
        self._phase = rng.uniform(0.0, 2 * np.pi, (K, M))
        self._omega = rng.uniform(0.05, 0.3, (K, M))
        self._sharp = 3.0  # softmax temperature: larger = purer pixels
        self.wavelengths = np.linspace(400.0, 900.0, C) if C > 1 else np.array([650.0])
        self.channel_names = default_channel_names(C)
        if global_grid:  # cell-centred global grid, north to south, for forecast benchmarks
            self.latitudes = 90.0 - (np.arange(H) + 0.5) * 180.0 / H
            self.longitudes = (np.arange(W) + 0.5) * 360.0 / W

    def describe(self) -> str:
        return f"synthetic source (N, C, H, W) = {self.shape}, seed {self.seed}"

    def spectra(self, channels: np.ndarray) -> np.ndarray:
        """Endmember spectra at the given channels only: [K, c]."""
        C = self._shape[1]
        lam = (channels.astype(np.float64) / max(C - 1, 1))[None, None, :]  # [1, 1, c]
        bumps = self._amp[..., None] * np.exp(-0.5 * ((lam - self._mu[..., None]) / self._sigma[..., None]) ** 2)
        return self._base[:, None] + bumps.sum(axis=1)

    def abundances(self, index: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Softmax-mixed smooth fields on the window: [K, h, w], summing to 1 over K."""
        H, W = self._shape[2:]
        y = rows.astype(np.float64)[None, None, :, None] / H
        x = cols.astype(np.float64)[None, None, None, :] / W
        arg = 2 * np.pi * (self._fy[..., None, None] * y + self._fx[..., None, None] * x) \
            + (self._phase + self._omega * index)[..., None, None]
        field = (self._mamp[..., None, None] * np.cos(arg)).sum(axis=1)  # [K, h, w]
        z = self._sharp * field
        z = np.exp(z - z.max(axis=0, keepdims=True))
        return z / z.sum(axis=0, keepdims=True)

    def _read_block(self, index, c0, c1, r0, r1, k0, k1):
        ch, rows, cols = np.arange(c0, c1), np.arange(r0, r1), np.arange(k0, k1)
        S = self.spectra(ch)  # [K, c]
        A = self.abundances(index, rows, cols)  # [K, h, w]
        x = np.einsum("kc,khw->chw", S, A)
        if self.noise:
            x += self.noise * hashed_normal(self.seed, index, ch, rows, cols)
        return x.astype(np.float32)


class SyntheticTargetSource(Source):
    """The abundances of a :class:`SyntheticSource` as targets, pixel-aligned with it:
    ``kind="regress"``: [N, K, H, W] (each pixel's abundances sum to 1); ``kind="segment"``:
    [N, 1, H, W], the index of the largest abundance (the dominant endmember)."""

    format = "synthetic"

    def __init__(self, data: SyntheticSource, kind: str = "regress"):
        super().__init__(f"{data.path} (abundances)")
        if kind not in ("regress", "segment"):
            raise DataError(f"synthetic targets are 'regress' or 'segment', got {kind!r}.")
        self.data, self.kind = data, kind
        N, _, H, W = data.shape
        K = data._fy.shape[0]
        self._shape = (N, K if kind == "regress" else 1, H, W)
        self.channel_names = [f"abundance{k}" for k in range(K)] if kind == "regress" else ["endmember"]

    def describe(self) -> str:
        what = "endmember abundances" if self.kind == "regress" else "dominant endmember (class map)"
        return f"synthetic {what} of {self.data.describe()}"

    def _read_block(self, index, c0, c1, r0, r1, k0, k1):
        A = self.data.abundances(index, np.arange(r0, r1), np.arange(k0, k1))  # [K, h, w]
        if self.kind == "segment":
            return A.argmax(axis=0)[None].astype(np.float32)
        return A[c0:c1].astype(np.float32)


def parse_spec(spec: str | None) -> dict:
    """'synthetic:num_images=64,seed=3' (or just 'num_images=64,...') -> {'num_images': 64, 'seed': 3}."""
    if not spec or spec == "synthetic":
        return {}
    body = spec.split(":", 1)[1] if spec.startswith("synthetic:") else spec
    out = {}
    for part in filter(None, (p.strip() for p in body.split(","))):
        if "=" not in part:
            raise DataError(f"synthetic spec item {part!r} is not key=value; write e.g. "
                            "--data-path synthetic:num_images=64,seed=1,noise=0.01")
        k, v = (s.strip() for s in part.split("=", 1))
        aliases = {"n": "num_images", "c": "num_channels", "h": "height", "w": "width", "k": "endmembers"}
        k = aliases.get(k.lower(), k)
        if k not in {"num_images", "num_channels", "height", "width", "seed", "endmembers", "modes", "noise",
                     "global_grid"}:
            raise DataError(f"unknown synthetic option {k!r}; known: num_images, num_channels, height, width, seed, "
                            "endmembers, modes, noise, global_grid.")
        out[k] = float(v) if k == "noise" else (v.lower() in ("1", "true", "yes") if k == "global_grid" else int(v))
    return out
