"""A false-colour picture of an MAE reconstruction: input | masked input | reconstruction.

RGB = the bands nearest 640 / 550 / 460 nm when wavelengths are known and span them, else
three channels spread over the channel axis (3/4, 1/2, 1/4 of C).

Contrast stretch: every panel of a picture shares one. Where the data's normalization is known
(training's and the parity study's pictures, on normalized values; tools/predict.py's, on data
units with the statistics saved with the model) it is fixed by the statistics: each colour spans
its band's mean +- ``STRETCH_SIGMAS`` standard deviations (``band_limits``). The same value then
gets the same colour in every tile and in both tools' pictures. Without statistics it is the
2nd-98th percentile of the input, per colour.
"""

from __future__ import annotations

import numpy as np

RGB_NM = (640.0, 550.0, 460.0)
STRETCH_SIGMAS = 2.0  # a colour spans its band's mean +- 2 standard deviations


def band_limits(channels, mean=None, std=None) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) [k] of the statistics stretch for ``channels``: mean +- STRETCH_SIGMAS x std;
    ``mean``/``std`` None: normalized data (mean 0, std 1)."""
    ch = list(channels)
    m = np.zeros(len(ch)) if mean is None else np.asarray(mean, np.float64)[ch]
    s = np.ones(len(ch)) if std is None else np.asarray(std, np.float64)[ch]
    return m - STRETCH_SIGMAS * s, m + STRETCH_SIGMAS * s


def rgb_channels(num_channels: int, wavelengths=None, tolerance_nm: float = 60.0) -> list[int]:
    """Three channel indices for R, G, B."""
    if wavelengths is not None:
        wl = np.asarray(wavelengths, np.float64)
        picks = [int(np.argmin(np.abs(wl - t))) for t in RGB_NM]
        if all(abs(wl[p] - t) <= tolerance_nm for p, t in zip(picks, RGB_NM)):
            return picks
    C = num_channels
    return [min(C - 1, int(f * C)) for f in (0.75, 0.5, 0.25)]


def _to_array(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x)


def masked_from_patches(image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(masked image [C,H,W] with NaN where hidden, hidden-pixel mask [H,W]) from a mask given
    per pixel [H, W], per patch [H/p, W/p], or per patch flattened [L] (square patches)."""
    C, H, W = image.shape
    m = np.asarray(mask).astype(bool)
    if m.ndim == 1:
        p = int(round(np.sqrt(H * W / m.size)))
        if p < 1 or (H // p) * (W // p) != m.size:
            raise ValueError(f"a flat mask of {m.size} patches does not tile a {H} x {W} image with square patches")
        m = m.reshape(H // p, W // p)
    if m.shape != (H, W):
        if H % m.shape[0] or W % m.shape[1]:
            raise ValueError(f"mask {m.shape} does not divide the image {H} x {W}")
        m = np.kron(m, np.ones((H // m.shape[0], W // m.shape[1]), bool)).astype(bool)
    out = image.astype(np.float32, copy=True)
    out[:, m] = np.nan
    return out, m


def rgb_renderer(reference: np.ndarray | None, channels: list[int], limits=None):
    """x [C, H, W] -> RGB [H, W, 3] in [0, 1]: channel ``channels[k]`` mapped linearly from
    ``limits`` = (low [3], high [3]) (``band_limits``) to [0, 1], else from the 2nd-98th percentile
    of ``reference``, so that every panel rendered with it is comparable. Hidden or invalid pixels
    (NaN) are grey."""
    ch = list(channels)
    if limits is not None:
        lo, hi = (np.asarray(v, np.float64).reshape(3, 1, 1) for v in limits)
    else:
        ref = np.asarray(reference)[ch].astype(np.float64)  # [3, H, W]
        lo = np.nanpercentile(ref.reshape(3, -1), 2, axis=1)[:, None, None]
        hi = np.nanpercentile(ref.reshape(3, -1), 98, axis=1)[:, None, None]
    scale = np.where(hi > lo, hi - lo, 1.0)

    def render(x):
        y = (np.asarray(x)[ch].astype(np.float64) - lo) / scale
        hidden = ~np.isfinite(y).all(axis=0)
        y = np.clip(np.nan_to_num(y, nan=0.5), 0, 1).transpose(1, 2, 0)
        y[hidden] = 0.5
        return y
    return render


def save_reconstruction_png(path, image, mask_or_masked, reconstruction, wavelengths=None, title: str | None = None,
                            dpi: int = 100, rgb: list[int] | None = None, limits=None) -> str:
    """Write a 3-panel PNG. ``image``/``reconstruction``: [C, H, W] (numpy or torch).
    ``mask_or_masked``: the masked input [C, H, W] (hidden pixels NaN or 0), or a bool mask
    (True = hidden) per pixel [H, W], per patch [H/p, W/p] or flattened [L].
    ``rgb``: the channels shown as R, G, B (default: ``rgb_channels``); ``limits``: the stretch
    (``band_limits`` of those channels; default: percentiles of ``image``)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    image, reconstruction = _to_array(image), _to_array(reconstruction)
    mk = _to_array(mask_or_masked)
    if image.ndim != 3 or reconstruction.shape != image.shape:
        raise ValueError(f"image {image.shape} and reconstruction {reconstruction.shape} must both be [C, H, W]")
    if mk.dtype == bool or mk.shape != image.shape:
        masked, _ = masked_from_patches(image, mk)
    else:
        masked = mk.astype(np.float32)
    ch = list(rgb) if rgb is not None else rgb_channels(image.shape[0], wavelengths)
    rgb = rgb_renderer(image, ch, limits)

    H, W = image.shape[1:]
    fig_w = 3 * max(2.0, 2.5 * W / max(H, W))
    fig, axes = plt.subplots(1, 3, figsize=(fig_w, max(2.2, 2.5 * H / max(H, W)) + 0.4))
    label = "bands " + ", ".join(f"{wavelengths[c]:.0f} nm" if wavelengths is not None else str(c) for c in ch)
    for ax, x, name in zip(axes, (image, masked, reconstruction), ("input", "masked input", "reconstruction")):
        ax.imshow(rgb(x), interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.set_axis_off()
    fig.suptitle(title or f"RGB = {label}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return str(path)


def save_reconstruction_grid(path, tiles: list[dict], rows: list[tuple[str, list]], title: str, dpi: int = 110,
                             limits=None) -> str:
    """Columns: tiles (each dict: "index", "input" [3, H, W] in R, G, B order, "mask" per patch [L]);
    rows: input, masked input, then one labelled row of reconstructions [3, H, W] per entry of
    ``rows`` (label, one array per tile). ``limits``: one stretch for every panel (``band_limits``;
    normalized tiles: ``band_limits(range(3))``); None: each column its input's percentiles."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    n_rows, n_cols = 2 + len(rows), len(tiles)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.7 * n_cols + 1.4, 1.7 * n_rows + 0.3), squeeze=False)
    for j, tile in enumerate(tiles):
        image = _to_array(tile["input"])
        render = rgb_renderer(image, [0, 1, 2], limits)
        masked, _ = masked_from_patches(image, tile["mask"])
        panels = [("input", image), ("masked input", masked)] + [(label, _to_array(recs[j])) for label, recs in rows]
        for i, (label, x) in enumerate(panels):
            grid_cell(axes[i, j], render(x), label if j == 0 else None, tile["index"] if i == 0 else None)
    return save_grid(fig, path, title, dpi)


def grid_cell(ax, image, row_label: str | None = None, tile_index: int | None = None, fontsize: float = 8,
              **imshow) -> None:
    """One panel of a grid of held-out tiles: the image without ticks; the row's label in the
    first column, the tile's index in the first row."""
    ax.imshow(image, interpolation="nearest", **imshow)
    ax.set_xticks([])
    ax.set_yticks([])
    if row_label is not None:
        ax.set_ylabel(row_label, fontsize=fontsize)
    if tile_index is not None:
        ax.set_title(f"tile {tile_index}", fontsize=8)


def save_grid(fig, path, title: str, dpi: int) -> str:
    import matplotlib.pyplot as plt
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return str(path)
