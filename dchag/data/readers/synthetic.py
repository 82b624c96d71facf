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

The scene's C channels sit at ``np.linspace(wavelength_min, wavelength_max, C)`` nm (default 400-900);
the spectra are functions of the position in that range, so the same seed with more channels samples
the same spectra more finely. ``bands="s2"`` gives the scene as 13 Sentinel-2-like bands instead
(``S2_BANDS``: names B01..B12 and B8A, centre wavelengths): each band is the box average of the
``scene_channels``-channel scene over the channels inside the band's width (noise included).
``bands="l8"`` gives the 9 Landsat-8-OLI-like bands (B1..B9), ``bands="50x900-1700nm"`` 50 adjacent
bands of equal width over 900-1,700 nm (named by their centres: they match by wavelength only).
``image_offset`` shifts the image index (abundance phases and noise), so a data set of images
``offset .. offset + N - 1`` of the same seed (same endmembers) shares no image with one from 0.

The abundances are also a per-pixel target (``SyntheticTargetSource``, ``--target-path
synthetic``): regress them from the spectra (spectral unmixing), or segment their argmax (the
dominant endmember of each pixel), from the same seed and window as the input.
"""

from __future__ import annotations

import re

import numpy as np

from ..errors import DataError
from .base import Source, default_channel_names

_M = np.uint64(0xFFFFFFFFFFFFFFFF)

# Sentinel-2 MSI (S2A) bands: name, centre wavelength (nm), bandwidth (nm), in the product's band order.
S2_BANDS = (("B01", 443.0, 20.0), ("B02", 490.0, 65.0), ("B03", 560.0, 35.0), ("B04", 665.0, 30.0),
            ("B05", 705.0, 15.0), ("B06", 740.0, 15.0), ("B07", 783.0, 20.0), ("B08", 842.0, 115.0),
            ("B8A", 865.0, 20.0), ("B09", 945.0, 20.0), ("B10", 1375.0, 30.0), ("B11", 1610.0, 90.0),
            ("B12", 2190.0, 180.0))
# Landsat 8/9 OLI bands B1-B9 (B8 panchromatic, B9 cirrus): name, centre wavelength (nm), bandwidth (nm).
L8_BANDS = (("B1", 443.0, 16.0), ("B2", 482.0, 60.0), ("B3", 561.0, 57.0), ("B4", 655.0, 38.0),
            ("B5", 865.0, 28.0), ("B6", 1609.0, 85.0), ("B7", 2201.0, 187.0), ("B8", 590.0, 173.0),
            ("B9", 1373.0, 21.0))
BAND_SETS = {"s2": S2_BANDS, "l8": L8_BANDS}
_EVEN_BANDS = re.compile(r"(\d+)x(\d+(?:\.\d*)?)-(\d+(?:\.\d*)?)nm")


def band_table(bands: str) -> tuple:
    """The (name, centre, width) rows of a band set: 's2', 'l8', or 'NxLO-HInm' (N adjacent bands of
    equal width tiling LO-HI nm; named by their centres, so they match other data by wavelength)."""
    if bands in BAND_SETS:
        return BAND_SETS[bands]
    m = _EVEN_BANDS.fullmatch(str(bands))
    if m is None:
        raise DataError(f"unknown synthetic band set {bands!r}; known: {', '.join(BAND_SETS)}, or NxLO-HInm (N "
                        "adjacent bands tiling LO-HI nm, e.g. 50x900-1700nm).")
    n, lo, hi = int(m.group(1)), float(m.group(2)), float(m.group(3))
    if n < 1 or not lo < hi:
        raise DataError(f"synthetic band set {bands!r} needs N >= 1 and LO < HI.")
    width = (hi - lo) / n
    centres = [lo + (i + 0.5) * width for i in range(n)]
    return tuple((name, c, width) for name, c in zip(default_channel_names(n, centres), centres))


def band_members(scene_wavelengths: np.ndarray, bands) -> list[np.ndarray]:
    """For each (name, centre, width) band, the indices of the scene channels inside
    [centre - width/2, centre + width/2]; a band holding none is refused."""
    members = []
    for name, centre, width in bands:
        idx = np.flatnonzero(np.abs(scene_wavelengths - centre) <= width / 2)
        if idx.size == 0:
            step = float(np.diff(scene_wavelengths).mean()) if scene_wavelengths.size > 1 else float("nan")
            raise DataError(f"synthetic band {name} ({centre:g} +- {width / 2:g} nm) holds no scene channel (scene: "
                            f"{scene_wavelengths.size} channels, {scene_wavelengths[0]:g}-{scene_wavelengths[-1]:g} nm, "
                            f"step {step:.3g} nm); raise scene_channels or widen wavelength_min/wavelength_max.")
        members.append(idx)
    return members


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
                 noise: float = 0.01, global_grid: bool = False, wavelength_min: float = 400.0,
                 wavelength_max: float = 900.0, bands: str | None = None, scene_channels: int | None = None,
                 image_offset: int = 0):
        super().__init__(path or "synthetic")
        for name, v in (("num_channels", num_channels), ("height", height), ("width", width),
                        ("num_images", num_images), ("endmembers", endmembers), ("modes", modes)):
            if int(v) < 1:
                raise DataError(f"synthetic data needs {name} >= 1, got {v}.")
        if not wavelength_min < wavelength_max:
            raise DataError(f"synthetic data needs wavelength_min < wavelength_max, got {wavelength_min} and "
                            f"{wavelength_max}.")
        if int(image_offset) < 0:
            raise DataError(f"synthetic data needs image_offset >= 0, got {image_offset}.")
        C, H, W, N = int(num_channels), int(height), int(width), int(num_images)
        self._shape = (N, C, H, W)
        self.seed, self.noise, self.image_offset = int(seed), float(noise), int(image_offset)
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
        if bands is None:
            if scene_channels is not None and int(scene_channels) != C:
                raise DataError(f"synthetic scene_channels={scene_channels} is for bands=...; without bands the scene "
                                f"has num_channels={C} channels.")
            self.scene_channels = C
            self.wavelengths = np.linspace(wavelength_min, wavelength_max, C) if C > 1 else \
                np.array([(wavelength_min + wavelength_max) / 2])
            self.channel_names = default_channel_names(C)
            self._members = None
        else:
            table = band_table(bands)
            if C != len(table):
                raise DataError(f"synthetic bands={bands} has {len(table)} channels, but num_channels is {C}: give "
                                f"--num-channels {len(table)} (the scene's own count is scene_channels).")
            if scene_channels is None or int(scene_channels) < 2:
                raise DataError(f"synthetic bands={bands} needs scene_channels >= 2 (the hyperspectral scene the bands "
                                f"average), got {scene_channels}.")
            self.scene_channels = int(scene_channels)
            scene_wl = np.linspace(wavelength_min, wavelength_max, self.scene_channels)
            self._members = band_members(scene_wl, table)
            self.wavelengths = np.array([centre for _, centre, _ in table])
            self.channel_names = [name for name, _, _ in table]
        if global_grid:  # cell-centred global grid, north to south, for forecast benchmarks
            self.latitudes = 90.0 - (np.arange(H) + 0.5) * 180.0 / H
            self.longitudes = (np.arange(W) + 0.5) * 360.0 / W

    def describe(self) -> str:
        return f"synthetic source (N, C, H, W) = {self.shape}, seed {self.seed}"

    def spectra(self, channels: np.ndarray) -> np.ndarray:
        """Endmember spectra at the given scene channels only: [K, c]."""
        C = self.scene_channels
        lam = (channels.astype(np.float64) / max(C - 1, 1))[None, None, :]  # [1, 1, c]
        bumps = self._amp[..., None] * np.exp(-0.5 * ((lam - self._mu[..., None]) / self._sigma[..., None]) ** 2)
        return self._base[:, None] + bumps.sum(axis=1)

    def abundances(self, index: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Softmax-mixed smooth fields on the window: [K, h, w], summing to 1 over K."""
        H, W = self._shape[2:]
        y = rows.astype(np.float64)[None, None, :, None] / H
        x = cols.astype(np.float64)[None, None, None, :] / W
        arg = 2 * np.pi * (self._fy[..., None, None] * y + self._fx[..., None, None] * x) \
            + (self._phase + self._omega * (index + self.image_offset))[..., None, None]
        field = (self._mamp[..., None, None] * np.cos(arg)).sum(axis=1)  # [K, h, w]
        z = self._sharp * field
        z = np.exp(z - z.max(axis=0, keepdims=True))
        return z / z.sum(axis=0, keepdims=True)

    def _scene(self, index: int, ch: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """The scene at the given scene channels: [c, h, w] float64."""
        S = self.spectra(ch)  # [K, c]
        A = self.abundances(index, rows, cols)  # [K, h, w]
        x = np.einsum("kc,khw->chw", S, A)
        if self.noise:
            x += self.noise * hashed_normal(self.seed, index + self.image_offset, ch, rows, cols)
        return x

    def _read_block(self, index, c0, c1, r0, r1, k0, k1):
        rows, cols = np.arange(r0, r1), np.arange(k0, k1)
        if self._members is None:
            return self._scene(index, np.arange(c0, c1), rows, cols).astype(np.float32)
        members = self._members[c0:c1]  # band b = mean of its scene channels: [c, h, w]
        scene = self._scene(index, np.concatenate(members), rows, cols)
        bounds = np.cumsum([0] + [m.size for m in members])
        return np.stack([scene[a:b].mean(axis=0) for a, b in zip(bounds[:-1], bounds[1:])]).astype(np.float32)


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


def spec_channel_count(spec: dict) -> int | None:
    """The channel count a parsed synthetic spec gives: ``num_channels``, else its band set's size."""
    if "num_channels" in spec:
        return int(spec["num_channels"])
    return len(band_table(spec["bands"])) if spec.get("bands") else None


_INT_OPTIONS = {"num_images", "num_channels", "height", "width", "seed", "endmembers", "modes", "scene_channels",
                "image_offset"}
_FLOAT_OPTIONS = {"noise", "wavelength_min", "wavelength_max"}


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
        if k not in _INT_OPTIONS | _FLOAT_OPTIONS | {"global_grid", "bands"}:
            raise DataError(f"unknown synthetic option {k!r}; known: num_images, num_channels, height, width, seed, "
                            "endmembers, modes, noise, global_grid, wavelength_min, wavelength_max, bands, "
                            "scene_channels, image_offset.")
        try:
            out[k] = float(v) if k in _FLOAT_OPTIONS else v.lower() in ("1", "true", "yes") if k == "global_grid" \
                else v if k == "bands" else int(v)
        except ValueError:
            raise DataError(f"synthetic option {k}={v!r} is not a number.") from None
    return out
