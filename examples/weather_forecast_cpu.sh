#!/usr/bin/env bash
# Forecasting on the bundled ERA5 sample (5 surface variables t2m, u10, v10, msl, tp on the
# 5.625-degree 32 x 64 grid, 24 hourly steps): input state at t -> state at t + 6 h,
# latitude-weighted MSE; evaluation reports val loss and per-variable latitude-weighted RMSE/ACC.
# D-CHAG-C (cross-attention partial aggregation), T = P = 2 on 2 CPU ranks (gloo).
# Leaves checkpoints and the TensorBoard log under runs/weather (a new runs/weather-<time> when
# runs/weather already holds a run).
#
#   bash examples/weather_forecast_cpu.sh [extra flags, e.g. --train-iters 400]
set -euo pipefail
cd "$(dirname "$0")/.."
source examples/common.sh
RUN_DIR=$(run_dir runs/weather)
.venv/bin/python -m torch.distributed.run --nproc_per_node 2 pretrain_dchag.py \
    --deepspeed --deepspeed_config ds_configs/zero1_fp32.json --task forecast --lead-time 6 \
    --data-path data/samples/era5_5.625deg.nc --data-format netcdf \
    --img-h 32 --img-w 64 --patch-dim 4 \
    --num-layers 2 --hidden-size 64 --num-attention-heads 4 \
    --dchag-aggregation cross --dchag-groups 4 \
    --tensor-model-parallel-size 2 --channel-parallel-size 2 \
    --micro-batch-size 2 --global-batch-size 4 --train-iters 100 --lr 1e-3 --lr-warmup-iters 10 \
    --log-interval 10 --eval-interval 50 --save-interval 100 \
    --save "$RUN_DIR" --tensorboard-dir "$RUN_DIR/tb" "$@"
