#!/usr/bin/env python
"""Measure tools/predict.py: peak memory against scene size, speed against the model's forward, seams.

  memory  peak resident memory (VmHWM) of tools/predict.py over HDF5 scenes of growing size
          (default 512 x 512 and 2,048 x 2,048, 13 bands), each in a fresh process:
            python tools/benchmark_predict.py memory --output-dir runs/predict_bench
  speed   tiles per second of tools/predict.py (reading, stitching, writing overlapped with the model)
          against the model's forward alone on the same batches (the limit), at 1 and 2 processes:
            python tools/benchmark_predict.py speed --output-dir runs/predict_bench
  seams   how visible tile borders are in a trained model's output, with and without --overlap
          (a seam ratio: the mean jump between neighbouring pixels across a tile border over the mean
          jump elsewhere; 1 = no seam), and a figure:
            python tools/benchmark_predict.py seams --load EXPORT --data-path SCENE --output-dir runs/predict_bench

memory and speed build a model of their own (random weights: what is measured does not depend on
them) unless --load names one. Results: OUTPUT_DIR/<command>.json (+ seams.png).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env():
    return {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}


def make_export(path: str, channels: int, tile: int, patch: int, hidden: int, layers: int, task: str = "regress"):
    """An export of an untrained model (fixed random weights) with named channels and statistics."""
    import numpy as np
    from dchag.checkpointing import consolidated, shards
    from dchag.inference.runtime import build_serial_model
    from dchag.model.config import DChagConfig
    if consolidated.is_consolidated(path):
        return path
    names = tuple(f"band{c:03d}" for c in range(channels))
    cfg = DChagConfig(num_channels=channels, img_h=tile, img_w=tile, patch_dim=patch, hidden_size=hidden,
                      num_layers=layers, num_attention_heads=4, aggregation="linear", groups=4, task=task,
                      num_outputs=2 if task == "regress" else None, channel_names=names)
    model = build_serial_model(cfg)
    norm = {"normalized": True, "num_channels": channels, "mean": [0.2] * channels, "std": [0.1] * channels}
    consolidated.write(path, dict(model.named_parameters()), {"model": consolidated.config_to_dict(cfg),
                                                               "normalization": norm, "parameters":
                                                               shards.param_specs(model), "iteration": 0})
    return path


SCENE_EXT = {"hdf5": ".h5", "npy": ".npy", "envi": ".hdr", "zarr": ".zarr", "netcdf": ".nc"}


def make_scene(path: str, channels: int, size: int, fmt: str = "hdf5", seed: int = 0) -> str:
    """A scene [1, C, size, size] of random reflectance-like values with named channels, in ``fmt``,
    written 256 rows at a time (HDF5/Zarr chunked by 256 x 256 windows; NetCDF: one variable per
    channel on a lat/lon grid)."""
    import numpy as np
    if os.path.exists(path):
        return path
    rng = np.random.default_rng(seed)
    names = [f"band{c:03d}" for c in range(channels)]
    tmp = path + ".tmp" + SCENE_EXT[fmt]

    def rows():
        for r in range(0, size, 256):
            yield r, rng.uniform(0, 0.4, (channels, min(256, size - r), size)).astype(np.float32)

    if fmt == "hdf5":
        import h5py
        with h5py.File(tmp, "w") as f:
            d = f.create_dataset("data", (1, channels, size, size), dtype="float32",
                                 chunks=(1, channels, min(size, 256), min(size, 256)))
            d.attrs["channel_names"] = names
            for r, block in rows():
                d[0, :, r:r + block.shape[1]] = block
    elif fmt == "npy":
        a = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(1, channels, size, size))
        for r, block in rows():
            a[0, :, r:r + block.shape[1]] = block
            a.flush()
        del a
        with open(path[:-4] + ".channels.json", "w") as f:
            json.dump({"channel_names": names}, f)
    elif fmt == "envi":
        data = path[:-4] + ".img"
        a = np.memmap(data, mode="w+", dtype=np.float32, shape=(channels, size, size))  # BSQ
        for r, block in rows():
            a[:, r:r + block.shape[1]] = block
            a.flush()
        del a
        with open(tmp, "w") as f:
            f.write(f"ENVI\nsamples = {size}\nlines = {size}\nbands = {channels}\nheader offset = 0\n"
                    "file type = ENVI Standard\ndata type = 4\ninterleave = bsq\nbyte order = 0\n"
                    "map info = {UTM, 1.000, 1.000, 500000.000, 4000000.000, 10.0, 10.0, 33, North, WGS-84}\n"
                    "band names = {" + ", ".join(names) + "}\n")
    elif fmt == "zarr":
        import zarr
        z = zarr.open_array(tmp, mode="w", shape=(1, channels, size, size), dtype="float32",
                            chunks=(1, channels, min(size, 256), min(size, 256)))
        z.attrs["channel_names"] = names
        for r, block in rows():
            z[0, :, r:r + block.shape[1]] = block
    elif fmt == "netcdf":
        import xarray as xr
        lat, lon = np.linspace(60, 50, size), np.linspace(0, 10, size)
        full = np.concatenate([b for _, b in rows()], axis=1)
        ds = xr.Dataset({n: (("lat", "lon"), full[c]) for c, n in enumerate(names)}, coords={"lat": lat, "lon": lon})
        ds.to_netcdf(tmp, engine="h5netcdf", encoding={n: {"chunksizes": (min(size, 256), min(size, 256))}
                                                       for n in names})
    else:
        raise SystemExit(f"--format {fmt}: one of {', '.join(SCENE_EXT)}")
    os.replace(tmp, path)
    return path


# ---- memory ------------------------------------------------------------------------------------

MEASURE = """
import json, sys, time
sys.path.insert(0, "tools")
import predict
t0 = time.time()
rc = predict.main(sys.argv[1:])
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
print("MEASURE", json.dumps({"rc": rc, "vm_hwm_kb": hwm, "seconds": time.time() - t0}))
"""


def _measure(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, "-c", MEASURE, *args], cwd=REPO, env=_env(), capture_output=True,
                          text=True)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("MEASURE")), None)
    if proc.returncode or line is None:
        raise SystemExit(f"tools/predict.py {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(line.split(" ", 1)[1])


def memory(a) -> dict:
    os.makedirs(a.output_dir, exist_ok=True)
    export = a.load or make_export(os.path.join(a.output_dir, "model"), a.channels, a.tile, 4, 64, 2)
    rows = []
    for size in a.sizes:
        scene = make_scene(os.path.join(a.output_dir, f"scene_{size}{SCENE_EXT[a.format]}"), a.channels, size,
                           a.format)
        out = os.path.join(a.output_dir, f"pred_{a.format}_{size}.npy")
        for f in (out, out[:-4] + ".meta.json", out[:-4] + ".channels.json"):
            if os.path.exists(f):
                os.remove(f)
        r = _measure(["--load", export, "--data-path", scene, "--task", "regress", "--output", out, "--no-progress",
                      "--batch-size", str(a.batch_size), "--overlap", str(a.overlap)])
        r.update(size=size, scene_mb=4 * a.channels * size * size / 2**20)
        rows.append(r)
        print(f"{a.format} {size:5d} x {size:<5d} scene {r['scene_mb']:7.1f} MB: peak resident {r['vm_hwm_kb'] / 1024:7.1f} MB "
              f"({r['seconds']:.1f} s)", flush=True)
    base = rows[0]["vm_hwm_kb"]
    for r in rows:
        r["vs_smallest"] = r["vm_hwm_kb"] / base - 1
    print("peak memory vs the smallest scene: " + ", ".join(f"{r['size']}: {r['vs_smallest']:+.1%}" for r in rows))
    return {"rows": rows, "format": a.format, "channels": a.channels, "tile": a.tile, "overlap": a.overlap,
            "batch_size": a.batch_size}


# ---- speed -------------------------------------------------------------------------------------

SPEED = """
import json, os, sys, time
import numpy as np
sys.path.insert(0, "tools")
from dchag.inference import distributed
from dchag.inference.predict import TilePrediction, predict_file, read_model_channels, OneProcess
from dchag.data import open_source
export, scene, out, batch = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
many = distributed.launched()
if many:
    from dchag.device import run_device
    distributed.start(1, 1)
    model = distributed.load_model(export, run_device())
    share = distributed.TileShare(run_device())
else:
    from dchag.inference import load_pretrained
    model, share = load_pretrained(export, device="cpu"), OneProcess()
import torch.distributed as dist
def barrier():
    if many:
        dist.barrier()
# The limit: the model's forward alone on the same batches (this rank's share), read into memory first;
# timed before and after the prediction (the mean), both after one warm-up batch.
src = open_source(scene)
from dchag.inference.predict import file_channel_map
cmap = file_channel_map(model, src, scene, quiet=True)
cfg = model.cfg
_, _, H, W = src.shape
h = cfg.img_h
tiles = [(r, c) for r in range(0, H - h + 1, h) for c in range(0, W - h + 1, h)]
mine = [t for n, t in enumerate(tiles) if (n // batch) % share.size == share.rank]
batches = [np.stack([read_model_channels(src, cmap, 0, slice(r, r + h), slice(c, c + h)) for r, c in mine[b:b + batch]])
           for b in range(0, len(mine), batch)]
pred = TilePrediction.of(model, "regress", {})
pred.run(batches[0], np.arange(len(batches[0])))
def forward_alone():
    barrier()
    t0 = time.perf_counter()
    for x in batches:
        pred.run(x, np.arange(len(x)))
    return time.perf_counter() - t0
def predict_once(k):
    target = out[:-4] + f"_{k}.npy"
    barrier()
    t0 = time.perf_counter()
    predict_file(model, scene, "regress", target, batch_size=batch, progress=share.writes and k == rounds - 1,
                 share=share)
    barrier()
    return time.perf_counter() - t0
rounds = int(sys.argv[5])
forwards, walls = [], []
for k in range(rounds):  # alternating, best of each: the machine's load changes from second to second
    forwards.append(forward_alone())
    walls.append(predict_once(k))
wall, forward = min(walls), min(forwards)
times = [None] * (dist.get_world_size() if many else 1)
if many:
    dist.all_gather_object(times, forward)
else:
    times = [forward]
if not many or dist.get_rank() == 0:
    print("SPEED", json.dumps({"tiles": len(tiles), "wall": wall, "forward": max(times), "ranks": len(times)}))
if many:
    distributed.stop()
"""


def speed(a) -> dict:
    from tests.distributed import free_port
    os.makedirs(a.output_dir, exist_ok=True)
    export = a.load or make_export(os.path.join(a.output_dir, "speed_model"), a.channels, a.tile, 4, a.hidden,
                                   a.layers)
    scene = make_scene(os.path.join(a.output_dir, f"scene_{a.speed_size}.h5"), a.channels, a.speed_size)
    rows = []
    for n in a.nproc:
        out = os.path.join(a.output_dir, f"speed_{n}.npy")
        script = os.path.join(a.output_dir, "speed_child.py")
        with open(script, "w") as f:
            f.write(f"import sys\nsys.path.insert(0, {REPO!r})\n" + SPEED)
        launch = [sys.executable] if n == 1 else [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                                                   str(n), "--master_port", str(free_port())]
        for k in range(a.rounds):
            for f in (f"_{k}.npy", f"_{k}.meta.json", f"_{k}.channels.json"):
                if os.path.exists(out[:-4] + f):
                    os.remove(out[:-4] + f)
        proc = subprocess.run([*launch, script, export, scene, out, str(a.batch_size), str(a.rounds)], cwd=REPO,
                              env=_env(), capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("SPEED")), None)
        if proc.returncode or line is None:
            raise SystemExit(f"{n} process(es) failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
        r = json.loads(line.split(" ", 1)[1])
        r["stats"] = next((ln for ln in proc.stdout.splitlines() if ln.startswith("> predicted")), "")
        r.update(nproc=n, predict_tiles_per_s=r["tiles"] / r["wall"], limit_tiles_per_s=r["tiles"] / r["forward"])
        r["share_of_limit"] = r["predict_tiles_per_s"] / r["limit_tiles_per_s"]
        rows.append(r)
        print(f"{n} process(es): predict {r['predict_tiles_per_s']:.1f} tiles/s, forward alone "
              f"{r['limit_tiles_per_s']:.1f} tiles/s: {r['share_of_limit']:.0%} of the limit\n  rank 0: {r['stats']}",
              flush=True)
    return {"rows": rows, "channels": a.channels, "tile": a.tile, "hidden": a.hidden, "layers": a.layers,
            "size": a.speed_size, "batch_size": a.batch_size, "rounds": a.rounds,
            "load_average": os.getloadavg()}


# ---- seams -------------------------------------------------------------------------------------

def seam_ratio(y, tile: int, overlap: int, patch: int = 1) -> float:
    """Mean |jump| between horizontally and vertically neighbouring pixels across the borders of the
    tiles (each tile's first and last pixel: where its output starts or stops counting), over the mean
    |jump| across the other borders between patches (a patch-token model's output changes more there
    than inside a patch). y [planes, H, W]; 1 = no seam."""
    import numpy as np
    from dchag.inference.tiling import tile_starts
    _, H, W = y.shape
    ratios = []
    for axis, size in ((1, H), (2, W)):
        jump = np.abs(np.diff(y, axis=axis))  # between pixel i and i + 1 along the axis
        border = np.zeros(size - 1, bool)
        for s in tile_starts(size, tile, tile - overlap):
            for edge in (s - 1, s + tile - 1):  # the pair (edge, edge + 1) straddles a tile border
                if 0 <= edge < size - 1:
                    border[edge] = True
        other = np.zeros(size - 1, bool)
        other[patch - 1::patch] = True  # pairs straddling a patch border
        other &= ~border
        sel = [slice(None)] * 3
        sel[axis] = border
        at = np.nanmean(jump[tuple(sel)])
        sel[axis] = other
        ratios.append(at / np.nanmean(jump[tuple(sel)]))
    return float(np.mean(ratios))


def seams(a) -> dict:
    import numpy as np
    import dchag
    from dchag.data import open_source
    os.makedirs(a.output_dir, exist_ok=True)
    model = dchag.load_pretrained(a.load, device="cpu")
    src = open_source(a.data_path)
    x = np.stack([src.read(i) for i in range(src.num_images)])
    cfg = model.cfg
    task = cfg.task if cfg.task in ("regress", "forecast", "mae") else "regress"
    run = {"regress": model.regress, "forecast": model.forecast, "mae": model.reconstruct}[task]
    rows, outs = [], {}
    for overlap in a.overlaps:
        y = np.asarray(run(x, overlap=overlap, **({"complementary": True} if task == "mae" else {})))
        outs[overlap] = y
        p = cfg.patch_dim
        r = {"overlap": overlap, "seam_ratio": float(np.mean([seam_ratio(yi, cfg.img_h, overlap, p) for yi in y])),
             "seam_ratio_at_plain_borders": float(np.mean([seam_ratio(yi, cfg.img_h, 0, p) for yi in y]))}
        rows.append(r)
        print(f"--overlap {overlap:3d}: seam ratio {r['seam_ratio']:.3f} at its own tile borders, "
              f"{r['seam_ratio_at_plain_borders']:.3f} at the borders of the tiles without overlap", flush=True)
    _seam_figure(os.path.join(a.output_dir, "seams.png"), outs, cfg.img_h, cfg.patch_dim)
    return {"rows": rows, "load": a.load, "data_path": a.data_path, "task": task, "tile": cfg.img_h}


def _seam_figure(path: str, outs: dict, tile: int, patch: int) -> None:
    """Top: each column pair's mean |jump| (over rows, planes and images), one line per overlap, the
    tile borders without overlap dotted; bottom: a 3 x 3-tile crop of plane 0 per overlap."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from dchag.inference.tiling import tile_starts
    keys = list(outs)
    fig = plt.figure(figsize=(3.3 * len(keys), 6.4))
    grid = fig.add_gridspec(2, len(keys), height_ratios=[1, 1.1])
    ax = fig.add_subplot(grid[0, :])
    for k in keys:
        y = np.asarray(outs[k], np.float64)
        profile = np.nanmean(np.abs(np.diff(y, axis=3)), axis=(0, 1, 2))  # [W - 1]
        ax.plot(np.arange(len(profile)) + 0.5, profile, lw=1, label=f"--overlap {k}")
    W = outs[keys[0]].shape[3]
    for s in tile_starts(W, tile)[1:]:
        ax.axvline(s - 0.5, color="0.5", ls=":", lw=0.8)
    ax.set_xlim(0, min(W, 6 * tile))
    ax.set_xlabel(f"column (dotted: tile borders without overlap; patches of {patch})")
    ax.set_ylabel("mean |jump| to the next column")
    ax.legend(fontsize=8)
    crop = slice(0, min(3 * tile, W))
    first = np.asarray(outs[keys[0]])[0, 0, crop, crop]
    lo, hi = np.nanpercentile(first, [2, 98])
    for col, k in enumerate(keys):
        a = fig.add_subplot(grid[1, col])
        a.imshow(np.asarray(outs[k])[0, 0, crop, crop], vmin=lo, vmax=hi, cmap="viridis", interpolation="nearest")
        a.set_title(f"--overlap {k}: 3 x 3 tiles of plane 0", fontsize=9)
        a.set_axis_off()
    fig.suptitle(f"tiles of {tile} x {tile}: the jump at tile borders, without and with overlap", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=("memory", "speed", "seams"))
    p.add_argument("--output-dir", default="runs/predict_bench")
    p.add_argument("--load", default=None, help="an export (memory, speed: default a model of their own)")
    p.add_argument("--data-path", default=None, help="seams: the scene")
    p.add_argument("--sizes", type=lambda s: [int(v) for v in s.split(",")], default=[512, 2048])
    p.add_argument("--format", default="hdf5", choices=("hdf5", "npy", "envi", "zarr", "netcdf"),
                   help="memory: the scenes' format (default hdf5)")
    p.add_argument("--channels", type=int, default=13)
    p.add_argument("--tile", type=int, default=32)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--speed-size", type=int, default=512)
    p.add_argument("--rounds", type=int, default=3, help="speed: alternating rounds (forward alone, predict), best of each")
    p.add_argument("--nproc", type=lambda s: [int(v) for v in s.split(",")], default=[1, 2])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--overlap", type=int, default=0, help="memory: --overlap of the runs")
    p.add_argument("--overlaps", type=lambda s: [int(v) for v in s.split(",")], default=[0, 4, 8])
    a = p.parse_args(argv)
    if a.command == "seams" and not (a.load and a.data_path):
        p.error("seams needs --load EXPORT (a trained model) and --data-path SCENE")
    result = {"memory": memory, "speed": speed, "seams": seams}[a.command](a)
    result["command"] = " ".join(["python tools/benchmark_predict.py"] + (argv if argv is not None else sys.argv[1:]))
    name = f"memory_{a.format}" if a.command == "memory" else a.command
    with open(os.path.join(a.output_dir, f"{name}.json"), "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
