"""Run a pretrained model over whole scenes: tiles in, one stitched array out.

Every image (or time step) is cut into the model's tile size (img_h x img_w) and the outputs are
stitched back (:mod:`dchag.inference.tiling`: tiles every ``tile - overlap`` pixels, the last ones
shifted back to end at the edge, so every pixel is predicted and none is dropped; ``overlap = 0``
takes each pixel from the last tile covering it, ``overlap > 0`` blends neighbouring tiles with a
linear ramp normalized by the summed weights). An image smaller than a tile is padded with invalid
values (zero-filled like any invalid input) and the padding cropped off again. Files, and arrays
in Python (``PretrainedDChag.reconstruct`` ... ``embed``), go through the same code.

Outputs (float32):

    mae       [N, C, H, W]    the reconstruction (--mask-ratio of each tile's patches hidden, default the
                              training run's; 0: none; --complementary-masks: every patch predicted
                              from its context, in ceil(1 / ratio) passes)
    forecast  [N, V, H, W]    from every time step t, the state at t + lead time
    regress   [N, K, H, W]    the K target maps, in the targets' units
    segment   [N, 1, H, W]    the class index of every pixel (as float32; with overlap, of the blended
                              class probabilities)
    embed     [N, D, H/p, W/p]  the backbone's token of every patch, as a feature map
                              (rows/columns beyond the last whole patch have no token)

Input values that are invalid (NaN/Inf, the format's no-data value) stay invalid: NaN at the same
place in a reconstruction or forecast, NaN in a regression or class map where no channel of the
pixel is valid, and NaN for a token whose patch holds no valid value.

Memory is bounded whatever the scene's size: tiles are read window by window (a background
thread reads the next batch while the model runs), and rows are written as soon as no later tile
covers them (:mod:`dchag.inference.output`). Under a launcher (:mod:`dchag.inference.distributed`)
the processes share the tiles, each reading only its tiles and its channels, and one process
writes the one output.

Each task's prediction is its task object's (``dchag.tasks``: ``stitch_planes``, ``predict_tiles``,
``finish_stitched``); ``embed`` serves a model of any task.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numpy as np

from dchag.inference.tiling import Axis, Stitcher
from dchag.model.config import TASKS as MODEL_TASKS
from dchag.tasks import get_task

TASKS = MODEL_TASKS + ("embed",)


# ---- what a task predicts per tile, and how it is stitched ---------------------------------

@dataclass
class TilePrediction:
    """One task's prediction of a batch of raw tiles [B, c, h, w] (this process's model channels):
    ``run(x, index) -> [B, planes, h, w]`` (embed: [B, D, h/p, w/p]; ``index``: each tile's
    sample index, MAE's mask), blended over ``planes`` and turned into ``out_planes`` by ``finish``."""
    planes: int
    out_planes: int
    scale: int  # output pixels per input pixel along an axis: 1, or the patch size for embed
    run: Callable
    finish: Callable

    @classmethod
    def of(cls, model, task: str, options: dict) -> "TilePrediction":
        cfg = model.cfg
        if task == "embed":
            return cls(cfg.hidden_size, cfg.hidden_size, cfg.patch_dim,
                       lambda x, index: _embed_map(model, x, options.get("lead_time")), lambda block: block)
        t = get_task(task)
        return cls(t.stitch_planes(cfg), t.output_planes(cfg), 1,
                   lambda x, index: np.asarray(t.predict_tiles(model, x, index, options), np.float32),
                   t.finish_stitched)


def _embed_map(model, x: np.ndarray, lead_time) -> np.ndarray:
    """[B, c, h, w] raw tiles -> [B, D, h/p, w/p] tokens as a feature map, NaN where a patch holds no valid value."""
    cfg = model.cfg
    tokens = model.embed_tiles(x, lead_time=lead_time)  # [B, L, D]
    gh, gw = cfg.grid
    fmap = tokens.reshape(len(x), gh, gw, -1).transpose(0, 3, 1, 2)  # [B, D, gh, gw]
    p = cfg.patch_dim
    any_valid = model.any_valid(x).numpy().reshape(len(x), gh, p, gw, p).any(axis=(2, 4))
    return np.where(any_valid[:, None], fmap, np.nan).astype(np.float32)


def check_overlap(cfg, task: str, overlap: int) -> None:
    h, w, p = cfg.img_h, cfg.img_w, cfg.patch_dim
    if not 0 <= overlap < min(h, w):
        raise ValueError(f"--overlap {overlap}: give 0 (no overlap) up to {min(h, w) - 1} pixels (less than the "
                         f"{h} x {w} tile).")
    if task == "embed" and overlap % p:
        raise ValueError(f"--overlap {overlap} with --task embed: give a multiple of the patch size {p} (tokens are "
                         "blended patch by patch).")


def output_grid(cfg, task: str, H: int, W: int) -> tuple[int, int]:
    """The output's rows and columns for images of H x W (embed: whole patches)."""
    if task != "embed":
        return H, W
    p = cfg.patch_dim
    if H < p or W < p:
        raise ValueError(f"images of {H} x {W} hold no whole {p} x {p} patch to embed.")
    return H // p, W // p


# ---- the loop ------------------------------------------------------------------------------

class OneProcess:
    """The tiles all in this process (:class:`dchag.inference.distributed.TileShare` shares them)."""
    rank, size, writes = 0, 1, True

    def gather(self, y: np.ndarray, counts: list[int]):
        return y


def predict_scene(model, task: str, read: Callable, num_images: int, H: int, W: int, emit: Callable, *,
                  options: dict, overlap: int = 0, batch_size: int = 8, progress: bool = False, finish: bool = True,
                  share=None, after_read: Callable | None = None) -> dict:
    """Predict ``num_images`` images of H x W pixels; ``read(i, rows, cols)`` gives float32
    [c, h, w] raw values of this process's model channels; ``emit(i, r0, r1, block)`` receives the
    stitched output rows [r0, r1) of image i, [planes, r1 - r0, W_out], in order (in the writing
    process only). ``finish=False``: the blended planes (segment: class probabilities).
    ``after_read()`` runs after each batch is read. Returns the time spent (seconds: the model,
    waiting for reads, gathering, waiting for writes; the whole) and the tile count."""
    from tqdm import tqdm
    share = share or OneProcess()
    cfg = model.cfg
    check_overlap(cfg, task, overlap)
    pred = TilePrediction.of(model, task, options)
    s = pred.scale
    Ho, Wo = output_grid(cfg, task, H, W)
    rows, cols = Axis.plan(Ho, cfg.img_h // s, overlap // s), Axis.plan(Wo, cfg.img_w // s, overlap // s)
    stitcher = Stitcher(pred.planes, rows, cols, emit, pred.finish if finish else None) if share.writes else None
    tiles = [(i, j, k) for i in range(num_images) for j in range(len(rows.starts)) for k in range(len(cols.starts))]
    h, w, c = cfg.img_h, cfg.img_w, len(model.channels)
    Hin, Win = Ho * s, Wo * s  # embed: the whole patches only
    per_round = batch_size * share.size

    def mine(b0: int) -> range:
        lo = min(b0 + share.rank * batch_size, len(tiles), b0 + per_round)
        return range(lo, min(lo + batch_size, len(tiles), b0 + per_round))

    def load(b0: int) -> np.ndarray:
        picked = mine(b0)
        x = np.full((max(len(picked), 1), c, h, w), np.nan, np.float32)  # an empty share runs one blank tile
        for n, t in enumerate(picked):
            i, j, k = tiles[t]
            r, q = rows.starts[j] * s, cols.starts[k] * s
            block = read(i, slice(r, min(r + h, Hin)), slice(q, min(q + w, Win)))
            x[n, :, :block.shape[1], :block.shape[2]] = block
        if after_read is not None:
            after_read()  # e.g. unmap the pages a memory-mapped file brought in (bounded memory)
        return x

    def stitch(first: int, ys) -> None:
        for t, yt in zip(range(first, first + len(ys)), ys):
            stitcher.add(*tiles[t], yt)

    stats = {"tiles": len(tiles), "read_wait": 0.0, "model": 0.0, "gather": 0.0, "write_wait": 0.0}
    clock = time.perf_counter
    start = clock()
    bar = tqdm(total=len(tiles), desc=f"predict {task}", unit="tile", disable=not (progress and share.writes),
               smoothing=0.1)
    try:  # three stages at once: the reader thread reads batch n + 1, the model runs n, the writer thread stitches n - 1
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="dchag-read") as reader, \
                ThreadPoolExecutor(max_workers=1, thread_name_prefix="dchag-write") as writer:
            ahead, written = reader.submit(load, 0), None
            for b0 in range(0, len(tiles), per_round):
                t0 = clock()
                x = ahead.result()
                t1 = clock()
                if b0 + per_round < len(tiles):
                    ahead = reader.submit(load, b0 + per_round)  # read the next batch while the model runs
                picked = mine(b0)
                index = np.arange(picked.start, picked.start + len(x))
                y = pred.run(x, index)[:len(picked)]
                t2 = clock()
                counts = [len(range(min(b0 + r * batch_size, len(tiles)), min(b0 + (r + 1) * batch_size, len(tiles))))
                          for r in range(share.size)]
                ys = share.gather(y, counts)
                t3 = clock()
                if written is not None:
                    written.result()  # at most one batch waits to be stitched: memory stays bounded
                t4 = clock()
                if stitcher is not None:
                    written = writer.submit(stitch, b0, ys)
                stats["read_wait"] += t1 - t0
                stats["model"] += t2 - t1
                stats["gather"] += t3 - t2
                stats["write_wait"] += t4 - t3
                bar.update(sum(counts))
            if written is not None:
                written.result()
        if stitcher is not None:
            stitcher.close()
    finally:
        bar.close()
    stats["seconds"] = clock() - start
    return stats


def describe_stats(stats: dict) -> str:
    """The closing line of a prediction: tiles per second, and where the time went."""
    t = max(stats["seconds"], 1e-9)
    parts = ", ".join(f"{name} {100 * stats[key] / t:.0f} %" for name, key in (
        ("model", "model"), ("waiting for reads", "read_wait"), ("gathering", "gather"),
        ("waiting for writes", "write_wait")))
    return f"> predicted {stats['tiles']:,} tiles in {t:.1f} s ({stats['tiles'] / t:.1f} tiles/s; {parts})"


# ---- files ---------------------------------------------------------------------------------

def predict_file(model, data_path: str, task: str, output: str, *, data_format: str = "auto",
                 mask_ratio: float | None = None, seed: int = 0, lead_time: float | None = None, batch_size: int = 8,
                 progress: bool = True, picture: str | None = None, complementary: bool = False,
                 allow_missing_channels: bool = False, overlap: int = 0, share=None, channels_last: bool = False):
    """Predict over every image of ``data_path`` with ``model`` (a :class:`PretrainedDChag`);
    writes ``output`` (.npy or .zarr) and returns it (read-only memory map / zarr array; None in a
    process that does not write). MAE: ``mask_ratio`` None = the training run's; ``complementary``
    = every patch predicted while hidden. The file's channels are matched to the model's by
    identity (:mod:`dchag.inference.channels`): read in the model's order, extra ones dropped,
    missing ones refused unless ``allow_missing_channels`` (then read as invalid values)."""
    from dchag.data import open_source
    from dchag.inference.output import open_output, output_metadata
    share = share or OneProcess()
    if task not in TASKS:
        raise ValueError(f"--task must be one of {TASKS}, got {task!r}.")
    cfg = model.cfg
    if task != "embed" and cfg.task != task:
        raise ValueError(f"--task {task}: this model was trained with --task {cfg.task}; use --task {cfg.task} "
                         "or embed.")
    check_overlap(cfg, task, overlap)
    src = open_source(data_path, data_format, channels_last=channels_last)  # --channels-last: [N, H, W, C] arrays
    cmap = file_channel_map(model, src, data_path, allow_missing_channels, quiet=not share.writes)
    N, _, H, W = src.shape
    if H is None:
        raise ValueError(f"{data_path} mixes image sizes; predict one file (or one image size) at a time.")
    try:
        Ho, Wo = output_grid(cfg, task, H, W)
    except ValueError as e:
        raise ValueError(f"{data_path}: {e}") from e
    planes = TilePrediction.of(model, task, {}).out_planes
    out = open_output(output, (N, planes, Ho, Wo), output_metadata(model, task, src, data_path)) \
        if share.writes else None
    options = {"mask_ratio": mask_ratio, "seed": seed, "lead_time": lead_time, "complementary": complementary}
    try:
        stats = predict_scene(model, task, lambda i, rows, cols: read_model_channels(src, cmap, i, rows, cols,
                                                                                    model.channels),
                      N, H, W, out.write if out is not None else None, options=options, overlap=overlap,
                      batch_size=batch_size, progress=progress, share=share, after_read=src.release_pages)
    except BaseException:
        if out is not None:
            out.abort()
        raise
    if out is None:
        return None
    result = out.close()
    if progress:
        print(describe_stats(stats), flush=True)
    if picture:
        save_picture(picture, read_model_channels(src, cmap, 0), result, task, model)
    return result


def predict_array(model, task: str, x, options: dict, *, overlap: int = 0, batch_size: int = 8,
                  finish: bool = True, progress: bool = False) -> np.ndarray:
    """``x`` [B, C, H, W] raw values in the model's channels (numpy or torch) -> the stitched output
    [B, planes, H, W] (embed: [B, D, H/p, W/p]) as a float32 numpy array, exactly as over a file."""
    import torch
    a = x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)
    B, _, H, W = a.shape
    cfg = model.cfg
    pred = TilePrediction.of(model, task, options)
    Ho, Wo = output_grid(cfg, task, H, W)
    out = np.empty((B, pred.out_planes if finish else pred.planes, Ho, Wo), np.float32)

    def emit(i, r0, r1, block):
        out[i, :, r0:r1] = block

    channels = model.channels
    predict_scene(model, task, lambda i, rows, cols: np.asarray(a[i, channels, rows, cols], np.float32), B, H, W,
                  emit, options=options, overlap=overlap, batch_size=batch_size, progress=progress, finish=finish)
    return out


def file_channel_map(model, src, data_path, allow_missing_channels: bool = False, quiet: bool = False):
    """How the channels of the data source ``src`` are read as the model's (by identity; by position
    when the file names none, then only with the model's channel count, channels first); what it
    says is printed once (not when ``quiet``)."""
    from dchag.data.readers.open import check_channel_axis
    from dchag.inference.channels import map_channels, source_channels
    given = source_channels(src)
    if given is None:  # positional: the model's channel count decides the axis (never a guess)
        check_channel_axis(src, model.cfg.num_channels, f"the model's {model.cfg.num_channels} channels")
    cmap = map_channels(model.cfg, given, src.num_channels, allow_missing=allow_missing_channels,
                        where=str(data_path))
    if not quiet:
        model.say(*cmap.lines)
    return cmap


def read_model_channels(src, cmap, index: int, rows: slice | None = None, cols: slice | None = None,
                        channels=None) -> np.ndarray:
    """float32 [c, h, w]: image ``index`` of ``src`` (window ``rows`` x ``cols``) as the model's
    channels ``channels`` (default all), in that order (``cmap``); a channel the file lacks is NaN
    (invalid input). Only those channels are read."""
    want = range(len(cmap.take)) if channels is None else list(channels)
    into = [n for n, m in enumerate(want) if cmap.take[m] is not None]
    block = src.read(index, [cmap.take[want[n]] for n in into], rows, cols)
    if len(into) == len(want):
        return block
    out = np.full((len(want),) + block.shape[1:], np.nan, np.float32)
    out[into] = block
    return out


def predict_plan(model, task: str, options: dict) -> str | None:
    """One line on how ``task`` will predict (MAE: the share of patches hidden and the passes), or None."""
    return None if task == "embed" else get_task(task).predict_plan(model, options)


def save_picture(path: str, x: np.ndarray, result, task: str, model) -> str:
    """PNG of the first image (``x``: its model channels, raw): input | output, false colour.
    Input and output share the stretch of ``dchag.data.visualize`` that training's picture uses:
    each colour spans its band's mean +- 2 std of the statistics saved with the model (without
    them: the input's percentiles); the embedding shows its first 3 principal components,
    stretched by their percentiles."""
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
