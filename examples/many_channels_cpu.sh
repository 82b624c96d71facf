#!/usr/bin/env bash
# Many channels on 2 CPU ranks: a short D-CHAG-L MAE pretraining on a synthetic 3,072-channel
# hyperspectral cube (dchag/data/readers/synthetic.py: generated per rank for its own channels,
# nothing on disk), T = P = 2 on 2 CPU ranks (gloo), so each rank tokenizes 1,536 channels.
# The channel stage (per-channel tokenization + partial aggregation to G = 8 groups) is streamed
# 64 channels at a time (--dchag-channel-chunk 64, each chunk recomputed in backward), so its
# memory does not grow with the channel count; the backbone is small, so the channel stage is
# most of the work. Every log line prints the peak memory (MB, max over the ranks); the README
# compares it with the unstreamed stage:
#
#   bash examples/many_channels_cpu.sh                           # streamed, K = 64
#   bash examples/many_channels_cpu.sh --dchag-channel-chunk 0   # the same run unstreamed
#
# Leaves under runs/many_channels: the final checkpoint (iter_0000030, latest), log.txt (the log
# lines), the TensorBoard log tb/ (peak-memory-mb, iteration-time, loss) and
# reconstruction_iter_0000030.png (held-out tiles: input | masked input | reconstruction).
# A rerun keeps runs/many_channels and writes to runs/many_channels-<time>. About 20 s streamed and
# 70 s unstreamed on 2 CPU cores, plus start-up (README, "Many channels": peak memory and time).
set -euo pipefail
cd "$(dirname "$0")/.."
source examples/common.sh
RUN_DIR=$(run_dir runs/many_channels)
.venv/bin/python -m torch.distributed.run --nproc_per_node 2 pretrain_dchag.py \
    --deepspeed --deepspeed_config ds_configs/zero1_fp32.json --task mae \
    --data-path synthetic:num_images=256 --num-channels 3072 \
    --img-h 16 --img-w 16 --patch-dim 2 --mask-ratio 0.5 \
    --num-layers 1 --hidden-size 64 --num-attention-heads 4 \
    --dchag-aggregation linear --dchag-groups 8 --dchag-channel-chunk 64 \
    --tensor-model-parallel-size 2 --channel-parallel-size 2 \
    --micro-batch-size 8 --global-batch-size 8 --train-iters 30 --lr 1e-3 --lr-warmup-iters 5 \
    --log-interval 10 --eval-interval 30 --eval-iters 1 \
    --save "$RUN_DIR" --log-file "$RUN_DIR/log.txt" --tensorboard-dir "$RUN_DIR/tb" "$@"
