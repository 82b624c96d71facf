#!/usr/bin/env bash
# The README's main job: a short D-CHAG-L MAE pretraining on the bundled 450-band Fenix cube,
# T = P = 2 on 2 CPU ranks (gloo). The cube is only 38 x 23 pixels, so it is cut into 4 x 4 tiles
# (45 tiles; the last 9, the bottom of the cube, are held out) with one-pixel patches: every token
# is one pixel's 450-band spectrum, and half of each tile's pixels are hidden. Leaves under
# runs/demo: checkpoints (iter_0000300, iter_0000600, latest), the TensorBoard log (tb/) and
# reconstruction_iter_0000600.png, a false-colour picture of 8 held-out tiles: input | masked input
# | reconstruction. A rerun keeps runs/demo and writes to runs/demo-<time>. The baselines it must
# beat: see README ("What the demo shows") and docs/PARITY.md.
set -euo pipefail
cd "$(dirname "$0")/.."
source examples/common.sh
RUN_DIR=$(run_dir runs/demo)
.venv/bin/python -m torch.distributed.run --nproc_per_node 2 pretrain_dchag.py \
    --deepspeed --deepspeed_config ds_configs/zero1_fp32.json --task mae \
    --data-path data/samples/fenix_450band/image.hdr --data-format envi \
    --img-h 4 --img-w 4 --patch-dim 1 --mask-ratio 0.5 --valid-fraction 0.2 \
    --num-layers 2 --hidden-size 64 --num-attention-heads 4 \
    --dchag-aggregation linear --dchag-groups 8 \
    --tensor-model-parallel-size 2 --channel-parallel-size 2 \
    --micro-batch-size 3 --global-batch-size 9 --train-iters 600 --lr 2e-3 --lr-warmup-iters 30 --weight-decay 0.05 \
    --log-interval 50 --eval-interval 100 --save-interval 300 \
    --save "$RUN_DIR" --tensorboard-dir "$RUN_DIR/tb" "$@"
