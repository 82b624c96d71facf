#!/bin/bash
# docs/TRANSFER.md, "A real example": the bundled 450-band cube's model (demo flags, T = P = 1) fine-tuned on
# 13 Sentinel-2-like bands of the same cube, beside the same run from scratch. About 6 min on 2 CPU cores.
# Writes runs/fenix/ (pretrained, pretrained-export, fenix_s2.npy, s2-finetuned, s2-scratch).
set -euo pipefail
cd "$(dirname "$0")/.."
source examples/common.sh
D=${RUN_DIR:-runs/fenix}
if [ -e "$D" ]; then D=$D-$(date +%Y%m%d-%H%M%S); echo "an earlier run is kept; this one writes to $D" >&2; fi
mkdir -p "$D"
COMMON="--deepspeed --deepspeed_config ds_configs/zero1_fp32.json --img-h 4 --img-w 4 --patch-dim 1 --mask-ratio 0.5 --valid-fraction 0.2 --micro-batch-size 3 --global-batch-size 9 --lr 1e-3 --weight-decay 0.05 --log-interval 100 --eval-interval 100 --eval-iters 1 --seed 1"
# 1. pretrain (the demo's flags at T = P = 1)
.venv/bin/python pretrain_dchag.py $COMMON --task mae --data-path data/samples/fenix_450band/image.hdr --data-format envi \
    --num-layers 2 --hidden-size 64 --num-attention-heads 4 --dchag-aggregation linear --dchag-groups 8 \
    --train-iters 600 --lr-warmup-iters 30 --save $D/pretrained
.venv/bin/python tools/convert_checkpoint.py --load-dir $D/pretrained --save-dir $D/pretrained-export --format consolidated
# 2. the cube at Sentinel-2's 13 band centres (README's snippet)
.venv/bin/python - "$D" <<'PY'
import json, sys, numpy as np
from dchag.data import open_source
cube = open_source("data/samples/fenix_450band/image.hdr")
x = cube.read(0)
centres = [443, 490, 560, 665, 705, 740, 783, 842, 865, 945, 1375, 1610, 2190]
s2 = np.stack([np.apply_along_axis(lambda s: np.interp(c, cube.wavelengths, s), 0, x) for c in centres])
np.save(sys.argv[1] + "/fenix_s2.npy", s2.astype(np.float32))
names = ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12"]
json.dump({"channel_names": names, "wavelengths": centres}, open(sys.argv[1] + "/fenix_s2.channels.json", "w"))
PY
# 3. fine-tuned and from scratch, same flags and steps
.venv/bin/python pretrain_dchag.py $COMMON --finetune --pretrained-checkpoint $D/pretrained-export --task mae \
    --data-path $D/fenix_s2.npy --train-iters 300 --lr-warmup-iters 30 --save $D/s2-finetuned
.venv/bin/python pretrain_dchag.py $COMMON --task mae --data-path $D/fenix_s2.npy \
    --num-layers 2 --hidden-size 64 --num-attention-heads 4 --dchag-aggregation linear --dchag-groups 8 \
    --train-iters 300 --lr-warmup-iters 30 --save $D/s2-scratch
