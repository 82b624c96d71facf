#!/usr/bin/env bash
# LoRA against a full fine-tune: optimizer state and peak memory per rank (docs/BENCHMARKS.md section 10).
#
# A model whose backbone dominates (6 layers, hidden 256, FFN 1024: 4.7 M of its 5.1 M parameters are
# the backbone's), pretrained for one iteration on 211 synthetic bands (only its shapes matter here) and
# exported, is fine-tuned on 13 Sentinel-2-like bands at T = P = 2 (ZeRO 1, fp32) for 4 iterations,
# twice: every parameter trains (a full fine-tune) and --lora-rank 8 --lora-alpha 16 (the base frozen).
# Each run saves at its end; the table gives what trains (the start-up table), the optimizer state
# (the ZeRO shards written: fp32 master copies + Adam's two moments of what trains) and the peak
# memory of rank 0 (VmHWM, the log line's "peak memory").
#
#     bash examples/lora_memory.sh          # about 2-4 min on 2 CPU cores; writes runs/lora_memory/
set -euo pipefail
cd "$(dirname "$0")/.."
source examples/common.sh
OUT=$(run_dir runs/lora_memory)
PORT=${MASTER_PORT:-29270}
PY=.venv/bin/python
MODEL="--num-layers 6 --hidden-size 256 --num-attention-heads 8 --ffn-hidden-size 1024 --patch-dim 4"
WORLD="height=64,width=64,wavelength_min=400,wavelength_max=2500,seed=0"
COMMON="--deepspeed --deepspeed_config ds_configs/zero1_fp32.json --img-h 16 --img-w 16 --micro-batch-size 4
        --global-batch-size 8 --lr 1e-3 --log-interval 4 --seed 1"
mkdir -p "$OUT"

MASTER_PORT=$PORT $PY pretrain_dchag.py $COMMON $MODEL --task mae --data-path "synthetic:num_images=2,$WORLD" --num-channels 211 \
    --dchag-aggregation linear --dchag-groups 8 --train-iters 1 --save "$OUT/pretrain" > "$OUT/pretrain.log" 2>&1
$PY tools/convert_checkpoint.py --load-dir "$OUT/pretrain" --save-dir "$OUT/export" --format consolidated \
    > "$OUT/export.log" 2>&1

for regime in full lora; do
    extra=""
    [ "$regime" = lora ] && extra="--lora-rank 8 --lora-alpha 16"
    $PY -m torch.distributed.run --nproc_per_node 2 --master_port "$PORT" pretrain_dchag.py $COMMON \
        --task mae --data-path "synthetic:bands=s2,num_images=2,$WORLD,scene_channels=211" --num-channels 13 \
        --finetune --pretrained-checkpoint "$OUT/export" --tensor-model-parallel-size 2 --channel-parallel-size 2 \
        --train-iters 4 --save "$OUT/$regime" $extra > "$OUT/$regime.log" 2>&1
done

$PY - "$OUT" <<'EOF'
import glob, os, re, sys
out = sys.argv[1]
rows = {}
for regime in ("full", "lora"):
    log = open(os.path.join(out, f"{regime}.log")).read()
    peak = float(re.findall(r"peak memory \(MB\): *([\d.]+)", log)[-1])
    share = re.search(r"trainable: ([\d,]+) of ([\d,]+) values", log)
    trains = int(share.group(1).replace(",", "")) if share else int(re.search(
        r"parameters [\d,]+ on rank 0, ([\d,]+) in total", log).group(1).replace(",", ""))
    total = int(share.group(2).replace(",", "")) if share else trains
    optim = sorted(glob.glob(os.path.join(out, regime, "iter_0000004", "*optim_states.pt")))
    rows[regime] = (trains, total, [os.path.getsize(p) / 2**20 for p in optim], peak)
print(f"{'':24}{'trains (values)':>18}{'optimizer state per rank (MiB)':>34}{'peak memory rank 0 (MB)':>26}")
for regime, (trains, total, optim, peak) in rows.items():
    label = "full fine-tune" if regime == "full" else "LoRA r8"
    print(f"{label:24}{trains:>12,} ({100 * trains / total:4.1f} %){' / '.join(f'{m:.2f}' for m in optim):>28}"
          f"{peak:>26.0f}")
(f_t, _, f_o, f_p), (l_t, _, l_o, l_p) = rows["full"], rows["lora"]
print(f"LoRA / full: trains {l_t / f_t:.3f}, optimizer state {sum(l_o) / sum(f_o):.3f}, peak memory {l_p / f_p:.3f}")
EOF
