#!/usr/bin/env python
"""Per-channel mean/std of a data set, written beside the data for normalization.

    python tools/compute_stats.py --data-path data/samples/fenix_450band/image.hdr
    python tools/compute_stats.py --data-path /scratch/era5/ --data-format netcdf --output era5_stats.json

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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-path", required=True, help="file, Zarr store or folder (PATH::SELECTOR allowed)")
    ap.add_argument("--data-format", default="auto", choices=FORMATS)
    ap.add_argument("--output", default=None, help="stats file (default: beside the data)")
    ap.add_argument("--max-images", type=int, default=None, help="use only the first N images / time steps")
    ap.add_argument("--force", action="store_true", help="overwrite an existing stats file")
    args = ap.parse_args(argv)
    try:
        out = args.output or stats_path_for(args.data_path)
        if os.path.exists(out) and not args.force:
            raise DataError(f"{out} already exists; pass --force to overwrite it.")
        src = open_source(args.data_path, args.data_format)
        t0 = time.time()
        last = [t0]

        def progress(done, total):  # a line every 5 s (and at the end) on large data
            now = time.time()
            if now - last[0] >= 5 or done == total:
                last[0] = now
                print(f"> {done:.2f}/{total} images, {src.bytes_read / 1e6:.1f} MB read ({now - t0:.0f} s)", flush=True)

        stats = compute_stats(src, max_images=args.max_images, progress=progress)
        save_stats(stats, out)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{src.describe()}: statistics of {src.num_channels} channels written to {out} "
          f"({src.bytes_read / 1e6:.1f} MB read in {time.time() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
