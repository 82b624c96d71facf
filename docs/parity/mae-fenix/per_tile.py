"""The held-out MAE loss of an exported Fenix model tile by tile, beside the visible-pixel mean.

    python tools/convert_checkpoint.py --load-dir runs/demo --save-dir runs/demo-export --format consolidated
    python docs/parity/mae-fenix/per_tile.py runs/demo-export

The demo's split (4 x 4 tiles, --valid-fraction 0.2, --mask-ratio 0.5, --seed 1234): the masks
evaluation uses (iteration 0), the squared error over each tile's hidden valid pixels.
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))

import dchag  # noqa: E402
from dchag.data import build_datasets  # noqa: E402
from dchag.tasks.mae import _visible_mean, patch_mask, pixel_mask  # noqa: E402

model = dchag.load_pretrained(sys.argv[1], device="cpu")
_, valid = build_datasets("data/samples/fenix_450band/image.hdr", task="mae", img_h=4, img_w=4, valid_fraction=0.2)
print("| held-out tile (rows, columns of the cube) | model | visible-pixel mean | hidden valid pixels |")
print("|---|---:|---:|---:|")
by_rows = {}  # tile rows -> [model's squared error, baseline's, scored values]
for i in range(len(valid)):
    item, tile = valid[i], valid.index.tile(valid.samples[i])
    x, ok = item["images"][None], item["valid"][None]
    mask = patch_mask(item["index"][None], 16, 0.5, 1234, 0)
    hidden = pixel_mask(mask, (4, 4), 1).expand_as(x)
    with torch.no_grad():
        pred = model.forward_normalized(x, patch_mask=mask).float()
    scored = hidden & ok
    n = int(scored.sum())
    err = float(((pred - x) ** 2)[scored].sum()) / max(n, 1)
    base = float(((_visible_mean(x, ok, hidden) - x) ** 2)[scored].sum()) / max(n, 1)
    r, c = tile.read_rows, tile.read_cols
    print(f"| {r.start}-{r.stop - 1}, {c.start}-{c.stop - 1} | {err:.3f} | {base:.3f} | {n // x.shape[1]} |")
    s = by_rows.setdefault(f"{r.start}-{r.stop - 1}", [0.0, 0.0, 0])
    s[0], s[1], s[2] = s[0] + err * n, s[1] + base * n, s[2] + n
for rows, (err, base, n) in by_rows.items():
    print(f"rows {rows}, all tiles: model {err / n:.3f}, visible-pixel mean {base / n:.3f} ({n} values)")
total = [sum(s[k] for s in by_rows.values()) for k in range(3)]
print(f"all held-out tiles: model {total[0] / total[2]:.4f}, visible-pixel mean {total[1] / total[2]:.4f} (the validation line's)")

# The cube's last 2 rows (36-37) in the padded tile evaluation uses (2 real rows, 2 of padding) and in
# a tile shifted back to end at the edge (rows 34-37, what tools/predict.py cuts): random masks (20 x
# 6 tile positions), the squared error over the hidden valid pixels of rows 36-37 only.
import numpy as np  # noqa: E402

from dchag.data import open_source  # noqa: E402

z = open_source("data/samples/fenix_450band/image.hdr").read(0).astype(np.float64)
z = (z - valid.stats.safe_mean[:, None, None]) / valid.stats.safe_std[:, None, None]
sums = {"padded": [0.0, 0.0, 0], "shifted back": [0.0, 0.0, 0]}
for k in range(20):
    mask = patch_mask(torch.tensor([1000 + k]), 16, 0.5, 7, 0)
    hidden = pixel_mask(mask, (4, 4), 1)[0, 0]
    for c0 in (0, 4, 8, 12, 16, 19):
        for kind, r0 in (("padded", 36), ("shifted back", 34)):
            block = z[:, r0:r0 + 4, c0:c0 + 4]
            x = torch.zeros(1, 450, 4, 4)
            ok = torch.zeros(1, 450, 4, 4, dtype=torch.bool)
            x[0, :, :block.shape[1]] = torch.from_numpy(np.nan_to_num(block)).float()
            ok[0, :, :block.shape[1]] = torch.from_numpy(np.isfinite(block))
            last_rows = torch.zeros(4, 4, dtype=torch.bool)
            last_rows[36 - r0:38 - r0] = True
            scored = ok & (hidden & last_rows)
            with torch.no_grad():
                pred = model.forward_normalized(x, patch_mask=mask).float()
            base = _visible_mean(x, ok, hidden[None, None].expand_as(x))
            s = sums[kind]
            s[0] += float(((pred - x) ** 2)[scored].sum())
            s[1] += float(((base - x) ** 2)[scored].sum())
            s[2] += int(scored.sum())
for kind, (err, base, n) in sums.items():
    print(f"rows 36-37 in a {kind} tile: model {err / n:.3f}, visible-pixel mean {base / n:.3f} ({n} values)")
