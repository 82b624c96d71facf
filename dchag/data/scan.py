"""``--data-strict``: read every sample once before training, so invalid data is refused at
start-up (naming the file, image, tile and channels) rather than when the bad tile is first drawn."""

from __future__ import annotations

import time


def scan(datasets, progress=None, every_s: float = 5.0) -> int:
    """Read every item of ``datasets`` (strict ``TileDataset``s raise ``DataError`` at the first
    invalid value). ``progress(done, total, seconds)`` is called every ``every_s`` seconds and at
    the end. Returns the number of items read."""
    total = sum(len(d) for d in datasets)
    done, t0 = 0, time.time()
    last = t0
    for ds in datasets:
        for i in range(len(ds)):
            ds[i]
            done += 1
            now = time.time()
            if progress is not None and now - last >= every_s:
                progress(done, total, now - t0)
                last = now
    if progress is not None:
        progress(done, total, time.time() - t0)
    return done
