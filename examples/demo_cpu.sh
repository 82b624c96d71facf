#!/usr/bin/env bash
# The README's main job: a short D-CHAG-L MAE pretraining on the bundled 450-band Fenix cube,
# T = P = 2 on 2 CPU ranks (gloo), with a checkpoint and TensorBoard log under runs/demo.
set -euo pipefail
cd "$(dirname "$0")/.."
export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1
.venv/bin/python -m torch.distributed.run --nproc_per_node 2 pretrain_dchag.py \
    --deepspeed --deepspeed_config ds_configs/zero1_fp32.json --task mae \
    --data-path data/samples/fenix_450band/image.hdr --data-format envi \
    --img-h 8 --img-w 8 --patch-dim 2 --mask-ratio 0.5 \
    --num-layers 2 --hidden-size 32 --num-attention-heads 4 \
    --dchag-aggregation linear --dchag-groups 8 \
    --tensor-model-parallel-size 2 --channel-parallel-size 2 \
    --micro-batch-size 2 --global-batch-size 4 --train-iters 40 --lr 1e-3 --lr-warmup-iters 4 \
    --log-interval 5 --eval-interval 20 --eval-iters 1 --save-interval 20 \
    --save runs/demo --tensorboard-dir runs/demo/tb "$@"
