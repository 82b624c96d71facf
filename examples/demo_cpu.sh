#!/usr/bin/env bash
# The README's main job: a short D-CHAG-L MAE pretraining on the bundled 450-band Fenix cube,
# T = P = 2 on 2 CPU ranks (gloo). Leaves under runs/demo: checkpoints (iter_0000150, iter_0000300,
# latest), the TensorBoard log (tb/) and reconstruction_iter_0000300.png, a false-colour picture of
# a held-out tile: input | masked input | reconstruction. A rerun keeps runs/demo and writes to
# runs/demo-<time>.
set -euo pipefail
cd "$(dirname "$0")/.."
source examples/common.sh
RUN_DIR=$(run_dir runs/demo)
.venv/bin/python -m torch.distributed.run --nproc_per_node 2 pretrain_dchag.py \
    --deepspeed --deepspeed_config ds_configs/zero1_fp32.json --task mae \
    --data-path data/samples/fenix_450band/image.hdr --data-format envi \
    --img-h 8 --img-w 8 --patch-dim 2 --mask-ratio 0.5 \
    --num-layers 2 --hidden-size 64 --num-attention-heads 4 \
    --dchag-aggregation linear --dchag-groups 8 \
    --tensor-model-parallel-size 2 --channel-parallel-size 2 \
    --micro-batch-size 2 --global-batch-size 4 --train-iters 300 --lr 3e-3 --lr-warmup-iters 10 \
    --log-interval 20 --eval-interval 50 --eval-iters 1 --save-interval 150 \
    --save "$RUN_DIR" --tensorboard-dir "$RUN_DIR/tb" "$@"
