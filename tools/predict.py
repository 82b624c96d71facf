#!/usr/bin/env python
"""Run a trained D-CHAG model over a whole data file: in one process (CPU or one GPU), or over many
ranks where training ran (torchrun, srun, deepspeed).

  python tools/predict.py --load export --data-path cube.hdr --task mae --output recon.npy --picture recon.png
  python tools/predict.py --load runs/demo ...          # the training's --save folder (or an iter_* folder)
  torchrun --nproc_per_node 4 tools/predict.py --load runs/demo --tensor-model-parallel-size 2 \
      --channel-parallel-size 2 --data-path scene.h5 --task regress --output maps.npy

--load takes the consolidated export (tools/convert_checkpoint.py --format consolidated) or a
training checkpoint of any layout (its shards merged as conversion merges them). Under a launcher
the ranks form --tensor-model-parallel-size T and --channel-parallel-size P as in training (default
1), the world / T replicas share the tiles, each rank reads only its tiles and its channels, and
rank 0 writes the one output, equal to the one-process prediction. Each rank computes on its own
device (its LOCAL_RANK's GPU; DS_ACCELERATOR=cpu for the CPU).

--task mae       the model's reconstruction of every pixel, [N, C, H, W]: --mask-ratio of each tile's
                 patches are hidden from the model first (default: the ratio it trained with; 0
                 hides none, which it never trained on); with --complementary-masks every patch
                 is predicted from its context, in ceil(1 / ratio) passes whose hidden patches
                 together cover the tile (what a whole-image reconstruction wants)
--task forecast  from every time step, the state --lead-time steps ahead, [N, V, H, W]
--task regress   the K target maps in the targets' units, [N, K, H, W]
--task segment   the class index of every pixel, [N, 1, H, W] (float32)
--task embed     the backbone's token of every patch as a feature map, [N, D, H/p, W/p] (a model of any task)

The file may be any format the training reads (npy, ENVI, HDF5, Zarr, NetCDF) and larger than the
model's tile: it is cut into tiles (the last ones shifted back to the edge, so no pixel is
dropped) and the outputs stitched back; --overlap PIXELS overlaps neighbouring tiles and blends
their outputs (a linear ramp falling towards each tile's edge, normalized by the summed weights).
Values are normalized with the statistics saved at training and returned in data units (regress:
the targets' units); invalid input values (NaN, no-data) stay NaN in the output (regress, segment:
where no channel of the pixel is valid). Memory does not grow with the scene: tiles are read window
by window (a background thread reads ahead) and rows written as soon as they are final. The output
(.npy or .zarr, a new path) keeps the input's coordinates (lat/lon, times, ENVI map info) and the
planes' channel names (.zarr attributes; beside a .npy, OUT.meta.json and OUT.channels.json).
The last line says how fast it went and where the time went.

Channels are matched by identity, never by position when both sides know theirs: the file's
channel names (ENVI band names, HDF5/Zarr attributes, NetCDF variables, a .npy sidecar
FILE.channels.json) are matched to the model's by name, then by wavelength, and read in the
model's order; channels the model does not know are dropped (one line says which). A model
channel the file lacks is refused, naming it, unless --allow-missing-channels (then it is
zero-filled as invalid input, as training does, and named). A file that names no channels is
taken in the model's channel order, and the output says so.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_parser() -> argparse.ArgumentParser:
    from dchag.inference.predict import TASKS
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--load", required=True,
                   help="a consolidated export (tools/convert_checkpoint.py --format consolidated), or a training "
                        "checkpoint: a --save folder (its latest complete checkpoint) or one of its iter_* folders")
    p.add_argument("--data-path", required=True, help="the data file (or folder / selector, as for training)")
    p.add_argument("--data-format", default="auto", help="as pretrain_dchag.py --data-format (default: detected)")
    p.add_argument("--channels-last", action="store_true",
                   help="as pretrain_dchag.py --channels-last: plain arrays stored [H, W, C] / [N, H, W, C]")
    p.add_argument("--task", required=True, choices=TASKS,
                   help="the model's own task (mae, forecast, regress, segment), or embed (any model)")
    p.add_argument("--output", required=True, help="OUT.npy or OUT.zarr (a new path)")
    p.add_argument("--mask-ratio", type=float, default=None,
                   help="mae: share of patches hidden per tile (default: the model's training --mask-ratio)")
    p.add_argument("--complementary-masks", action="store_true",
                   help="mae: reconstruct every patch while hidden: ceil(1 / ratio) passes with complementary masks, "
                        "each patch taken from the pass that hid it")
    p.add_argument("--seed", type=int, default=0, help="mae: seed of the hidden patches")
    p.add_argument("--lead-time", type=float, default=None, help="forecast: steps ahead (default: the training's)")
    p.add_argument("--batch-size", type=int, default=8, help="tiles per forward (default 8)")
    p.add_argument("--overlap", type=int, default=0, metavar="PIXELS",
                   help="neighbouring tiles overlap by PIXELS and their outputs are blended with a linear ramp that "
                        "falls towards each tile's edge, normalized by the summed weights (seamless stitching); 0 "
                        "(default): tiles side by side, each pixel from the last tile covering it")
    p.add_argument("--device", default=None, help="one process: cpu, cuda, cuda:1 ... (default: a GPU if present, else "
                                                  "the CPU); under a launcher each rank takes its LOCAL_RANK's GPU")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1,
                   help="under a launcher: T, as in training (default 1)")
    p.add_argument("--channel-parallel-size", type=int, default=1,
                   help="under a launcher: P, P | T and P | G, as in training (default 1); the world / T replicas "
                        "share the tiles")
    p.add_argument("--allow-missing-channels", action="store_true",
                   help="predict even when the file lacks some of the model's channels (matched by name, then "
                        "wavelength): they are zero-filled as invalid input, and named (default: refused, naming them)")
    p.add_argument("--picture", default=None, help="also write a PNG of the first image: input | output")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine|cuda_graph_scope).*")
    from dchag.checkpointing.errors import CheckpointError
    from dchag.data.errors import DataError
    from dchag.inference import distributed
    from dchag.inference.output import check_new
    from dchag.parallel.partition import LayoutError
    from dchag.training.launch import LaunchError
    T, P = args.tensor_model_parallel_size, args.channel_parallel_size
    many = distributed.launched() or T * P > 1
    try:
        check_new(args.output)  # on every rank, before anything is started
        if many and args.device:
            raise ValueError("--device applies to one process; under a launcher each rank computes on its "
                             "LOCAL_RANK's GPU (DS_ACCELERATOR=cpu for the CPU).")
        if many:
            from dchag.device import run_device
            distributed.start(T, P)
            device = run_device()
            model = distributed.load_model(args.load, device)
            share = distributed.TileShare(device)
        else:
            from dchag.inference import load_pretrained
            model, share = load_pretrained(args.load, device=args.device), None
        out = predict(model, args, share)
    except (CheckpointError, DataError, LayoutError, LaunchError, ValueError, FileExistsError) as e:
        if distributed.rank() == 0:
            print(f"error: {e}", file=sys.stderr)
        return 1
    if many:
        distributed.stop()
    if out is not None:
        print(f"> wrote {args.output} {tuple(out.shape)}" + (f" and {args.picture}" if args.picture else ""))
    return 0


def predict(model, args, share):
    from dchag.inference.predict import predict_file, predict_plan
    plan = predict_plan(model, args.task, {"mask_ratio": args.mask_ratio, "complementary": args.complementary_masks})
    if plan and (share is None or share.writes):
        print(plan)
    return predict_file(model, args.data_path, args.task, args.output, data_format=args.data_format,
                        mask_ratio=args.mask_ratio, seed=args.seed, lead_time=args.lead_time,
                        batch_size=args.batch_size, progress=not args.no_progress, picture=args.picture,
                        complementary=args.complementary_masks, allow_missing_channels=args.allow_missing_channels,
                        channels_last=args.channels_last,
                        overlap=args.overlap, share=share)


if __name__ == "__main__":
    sys.exit(main())
