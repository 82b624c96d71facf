#!/usr/bin/env python
"""Per-channel mean/std of a data set's training samples, written beside the data for normalization.

    python tools/compute_stats.py --data-path data/samples/fenix_450band/image.hdr --task mae --img-h 4 --img-w 4 \
        --valid-fraction 0.2
    python tools/compute_stats.py --data-path /scratch/era5/ --data-format netcdf --task forecast --lead-time 6

Training normalizes with statistics of its training samples only, never of the held-out ones: give
the split flags of the training run (--task; --img-h/--img-w for tiles; --valid-fraction; --lead-time
for a forecast) and the statistics cover exactly its training tiles or training period; the file
records them, and training uses it only for the same split and data (else it computes its own at
start-up, or asks for this command on data too large for that). Without --task the statistics
cover every sample (held-out ones included): for inspection, never used by training.

Reads the data channel block by channel block (never all channels of a large image at once),
leaves invalid values (NaN/Inf, the format's no-data value) out, and writes
``<data without extension>.stats.json`` beside a file or store, ``<folder>/stats.json`` for a
folder (or --output; ``.npz`` by extension). Training finds it there automatically.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dchag.data import DataError, compute_stats, open_source, save_stats, stats_path_for  # noqa: E402
from dchag.data.readers import FORMATS  # noqa: E402
from dchag.data.stats import TrainingSamples  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-path", required=True, help="file, Zarr store or folder (PATH::SELECTOR allowed)")
    ap.add_argument("--data-format", default="auto", choices=FORMATS)
    ap.add_argument("--output", default=None, help="stats file (default: beside the data)")
    ap.add_argument("--task", choices=("mae", "forecast", "regress", "segment"), default=None,
                    help="the training run's task: statistics of its training samples only (default: every sample, "
                         "for inspection; training does not use such a file)")
    ap.add_argument("--img-h", type=int, default=None, help="the training run's tile height (mae, regress, segment)")
    ap.add_argument("--img-w", type=int, default=None, help="the training run's tile width (mae, regress, segment)")
    ap.add_argument("--valid-fraction", type=float, default=0.1, help="the training run's --valid-fraction")
    ap.add_argument("--lead-time", type=int, default=1, help="the training run's --lead-time (forecast)")
    ap.add_argument("--max-images", type=int, default=None, help="without --task: only the first N images / time steps")
    ap.add_argument("--force", action="store_true", help="overwrite an existing stats file")
    args = ap.parse_args(argv)
    try:
        out = args.output or stats_path_for(args.data_path)
        if os.path.exists(out) and not args.force:
            raise DataError(f"{out} already exists; pass --force to overwrite it.")
        src = open_source(args.data_path, args.data_format)
        training = None
        if args.task is not None:
            if args.task != "forecast" and (args.img_h is None or args.img_w is None):
                raise DataError(f"--task {args.task} cuts tiles: give the training run's --img-h and --img-w.")
            training = TrainingSamples.of(src, args.task, args.img_h or 0, args.img_w or 0, args.valid_fraction,
                                          args.lead_time)
        t0 = time.time()
        last = [t0]

        def progress(done, total):  # a line every 5 s (and at the end) on large data
            now = time.time()
            if now - last[0] >= 5 or done == total:
                last[0] = now
                print(f"> {done:.2f}/{total} windows, {src.bytes_read / 1e6:.1f} MB read ({now - t0:.0f} s)", flush=True)

        stats = compute_stats(src, max_images=args.max_images, progress=progress, training=training)
        save_stats(stats, out)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    what = training.description if training is not None else "every sample (held-out ones included: not for training)"
    print(f"{src.describe()}: statistics of {src.num_channels} channels over {what} written to {out} "
          f"({src.bytes_read / 1e6:.1f} MB read in {time.time() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
