"""Run a pretrained model over a whole data file: tiles in, one stitched array out.

Every image (or time step) of the file is cut into the model's tile size (img_h x img_w). Tiles
start every img_h rows / img_w columns; where the last ones would run past the edge they are
shifted back to end at the edge (overlapping their neighbour, whose values they replace there),
so every pixel is predicted and none is dropped. An image smaller than a tile is padded with
invalid values (zero-filled like any invalid input) and the padding cropped off again.

Outputs (float32):

    mae       [N, C, H, W]    the reconstruction (--mask-ratio of each tile's patches hidden, default the
                              training run's; 0: none; --complementary-masks: every patch predicted
                              from its context, in ceil(1 / ratio) passes)
    forecast  [N, V, H, W]    from every time step t, the state at t + lead time
    regress   [N, K, H, W]    the K target maps, in the targets' units
    segment   [N, 1, H, W]    the class index of every pixel (as float32)
    embed     [N, D, H/p, W/p]  the backbone's token of every patch, as a feature map
                              (rows/columns beyond the last whole patch have no token)

Input values that are invalid (NaN/Inf, the format's no-data value) stay invalid: NaN at the same
place in a reconstruction or forecast, NaN in a regression or class map where no channel of the
pixel is valid, and NaN for a token whose patch holds no valid value.

Each task's prediction is its task object's (``dchag.tasks``: ``output_planes``, ``predict_tiles``);
``embed`` serves a model of any task.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from dchag.tasks import get_task

from dchag.model.config import TASKS as MODEL_TASKS

TASKS = MODEL_TASKS + ("embed",)


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


class _Output:
    """A float32 array written tile by tile: .npy (memory-mapped) or .zarr."""

    def __init__(self, path: str, shape: tuple, attrs: dict):
        if os.path.exists(path):
            raise FileExistsError(f"--output {path} already exists; choose a new name (nothing was overwritten).")
        self.path = path
        if path.endswith(".zarr"):
            import zarr
            chunks = (1,) + tuple(min(s, 256) for s in shape[1:])
            self.array = zarr.open_array(path, mode="w-", shape=shape, chunks=chunks, dtype="float32",
                                         fill_value=float("nan"))
            self.array.attrs.update(attrs)
        elif path.endswith(".npy"):
            self.array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)
        else:
            raise ValueError(f"--output {path}: give a .npy or .zarr path.")

    def write(self, index, values: np.ndarray) -> None:
        self.array[index] = values

    def close(self) -> None:
        if isinstance(self.array, np.memmap):
            self.array.flush()


def predict_file(model, data_path: str, task: str, output: str, *, data_format: str = "auto",
                 mask_ratio: float | None = None, seed: int = 0, lead_time: float | None = None, batch_size: int = 8,
                 progress: bool = True, picture: str | None = None, complementary: bool = False,
                 allow_missing_channels: bool = False) -> np.ndarray:
    """Predict over every image of ``data_path`` with ``model`` (a :class:`PretrainedDChag`);
    writes ``output`` (.npy or .zarr) and returns it (memory-mapped / zarr array). MAE:
    ``mask_ratio`` None = the training run's; ``complementary`` = every patch predicted while hidden.
    The file's channels are matched to the model's by identity (:mod:`dchag.inference.channels`):
    read in the model's order, extra ones dropped, missing ones refused unless
    ``allow_missing_channels`` (then read as invalid values)."""
    from tqdm import tqdm
    from dchag.data import open_source
    if task not in TASKS:
        raise ValueError(f"--task must be one of {TASKS}, got {task!r}.")
    cfg = model.cfg
    if task != "embed" and cfg.task != task:
        raise ValueError(f"--task {task}: this model was trained with --task {cfg.task}; use --task {cfg.task} "
                         "or embed.")
    src = open_source(data_path, data_format)
    cmap = file_channel_map(model, src, data_path, allow_missing_channels)
    N, _, H, W = src.shape
    C = cfg.num_channels
    if H is None:
        raise ValueError(f"{data_path} mixes image sizes; predict one file (or one image size) at a time.")
    h, w, p = cfg.img_h, cfg.img_w, cfg.patch_dim
    if task == "embed":
        gh, gw = H // p, W // p
        if not gh or not gw:
            raise ValueError(f"{data_path}: images of {H} x {W} hold no whole {p} x {p} patch to embed.")
        rows, cols = tile_starts(gh * p, h), tile_starts(gw * p, w)
        shape = (N, cfg.hidden_size, gh, gw)
    else:
        rows, cols = tile_starts(H, h), tile_starts(W, w)
        shape = (N, get_task(task).output_planes(cfg), H, W)
    out = _Output(output, shape, {"task": task, "source": str(data_path)})
    tiles = [(i, r, c) for i in range(N) for r in rows for c in cols]
    bar = tqdm(total=len(tiles), desc=f"predict {task}", unit="tile", disable=not progress)
    try:
        for b0 in range(0, len(tiles), batch_size):
            batch = tiles[b0:b0 + batch_size]
            x = np.full((len(batch), C, h, w), np.nan, np.float32)
            for k, (i, r, c) in enumerate(batch):
                block = read_model_channels(src, cmap, i, slice(r, min(r + h, H)), slice(c, min(c + w, W)))
                x[k, :, :block.shape[1], :block.shape[2]] = block
            y = _run(model, task, x, np.arange(b0, b0 + len(batch)), mask_ratio, seed, lead_time, complementary)
            for k, (i, r, c) in enumerate(batch):
                if task == "embed":
                    tr, tc = r // p, c // p
                    nr, nc = min(h // p, shape[2] - tr), min(w // p, shape[3] - tc)
                    out.write((i, slice(None), slice(tr, tr + nr), slice(tc, tc + nc)), y[k, :, :nr, :nc])
                else:
                    nr, nc = min(h, H - r), min(w, W - c)
                    out.write((i, slice(None), slice(r, r + nr), slice(c, c + nc)), y[k, :, :nr, :nc])
            bar.update(len(batch))
    finally:
        bar.close()
        out.close()
    if picture:
        save_picture(picture, read_model_channels(src, cmap, 0), out.array, task, model)
    return out.array


def file_channel_map(model, src, data_path, allow_missing_channels: bool = False):
    """How the channels of the data source ``src`` are read as the model's (by identity; by position
    when the file names none, then only with the model's channel count, channels first); what it
    says is printed once."""
    from dchag.data.readers.open import check_channel_axis
    from dchag.inference.channels import map_channels, source_channels
    given = source_channels(src)
    if given is None:  # positional: the model's channel count decides the axis (never a guess)
        check_channel_axis(src, model.cfg.num_channels, f"the model's {model.cfg.num_channels} channels")
    cmap = map_channels(model.cfg, given, src.num_channels, allow_missing=allow_missing_channels,
                        where=str(data_path))
    model.say(*cmap.lines)
    return cmap


def read_model_channels(src, cmap, index: int, rows: slice | None = None, cols: slice | None = None) -> np.ndarray:
    """float32 [C, h, w]: image ``index`` of ``src`` (window ``rows`` x ``cols``) as the model's
    channels, in its order (``cmap``); a channel the file lacks is NaN (invalid input)."""
    into = [m for m, i in enumerate(cmap.take) if i is not None]
    block = src.read(index, [cmap.take[m] for m in into], rows, cols)
    if len(into) == len(cmap.take):
        return block
    out = np.full((len(cmap.take),) + block.shape[1:], np.nan, np.float32)
    out[into] = block
    return out


def predict_plan(model, task: str, options: dict) -> str | None:
    """One line on how ``task`` will predict (MAE: the share of patches hidden and the passes), or None."""
    return None if task == "embed" else get_task(task).predict_plan(model, options)


def _run(model, task: str, x: np.ndarray, index: np.ndarray, mask_ratio, seed: int, lead_time, complementary=False):
    """[B, C, h, w] raw tiles -> [B, *, h, w] (embed: [B, D, h/p, w/p]), invalid inputs left NaN."""
    cfg = model.cfg
    if task != "embed":
        return get_task(task).predict_tiles(model, x, index, {"mask_ratio": mask_ratio, "seed": seed,
                                                              "lead_time": lead_time, "complementary": complementary})
    tokens = model.embed_tiles(x)  # [B, L, D]
    gh, gw = cfg.grid
    fmap = tokens.reshape(len(x), gh, gw, -1).transpose(0, 3, 1, 2)  # [B, D, gh, gw]
    p = cfg.patch_dim
    any_valid = np.isfinite(x).any(axis=1).reshape(len(x), gh, p, gw, p).any(axis=(2, 4))
    return np.where(any_valid[:, None], fmap, np.nan)


def save_picture(path: str, x: np.ndarray, result, task: str, model) -> str:
    """PNG of the first image: input | output, false colour. Input and output share the stretch
    of ``dchag.data.visualize`` that training's picture uses: each colour spans its band's mean
    +- 2 std of the statistics saved with the model (without them: the input's percentiles); the
    embedding shows its first 3 principal components, stretched by their percentiles."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from dchag.data.visualize import band_limits, rgb_channels, rgb_renderer
    y = np.asarray(result[0], np.float64)
    ch = rgb_channels(x.shape[0], model.wavelengths)
    stats = model.mean is not None
    input_rgb = rgb_renderer(x, ch, band_limits(ch, model.mean, model.std) if stats else None)
    if task == "embed":
        D, gh, gw = y.shape
        f = np.nan_to_num(y.reshape(D, -1).T)
        f = f - f.mean(axis=0)
        _, _, vt = np.linalg.svd(f, full_matrices=False)
        pca = (f @ vt[:3].T).T.reshape(3, gh, gw)
        right = rgb_renderer(pca, [0, 1, 2])(pca)
    else:  # the task's own rendering (a reconstruction shares the input's stretch)
        right = get_task(task).prediction_rgb(y, model, input_rgb)
    title = "embedding (PCA)" if task == "embed" else get_task(task).prediction_title
    fig, axes = plt.subplots(1, 2, figsize=(6, 3.2))
    for ax, img, name in zip(axes, (input_rgb(x), right), ("input", title)):
        ax.imshow(img, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
