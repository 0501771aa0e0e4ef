#!/usr/bin/env bash
# One device call: the CUDA build of this stop on the H200 — every family's forward and a DAS cell
# (frozen-tail backward) on CPU and CUDA, and `road run --gpus 1` (the local worker pool).
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
W=/tmp/road; mkdir -p $W
xz -dc .gpu/road.xz > $W/road && chmod +x $W/road
. "$(dirname "$0")/../gpu-libs.sh"
export CUDA_CACHE_PATH=$W/cuda-cache
ROAD=$W/road
nvidia-smi -L
for f in hf-tiny-llama-a hf-tiny-mistral hf-tiny-qwen2 hf-tiny-qwen3 hf-tiny-gemma2; do
  for dev in cpu cuda; do
    timeout 120 $ROAD --device $dev logits --model .gpu/fx/$f --prompt "a b c d e f g" --json --top 20 > $OUT/logits-$f-$dev.json 2> $OUT/logits-$f-$dev.err
    echo "logits $f $dev rc=$?"
    ROAD_OUT=$OUT/das-$dev timeout 300 $ROAD --device $dev run .gpu/das.toml --set "model.name=\".gpu/fx/$f\"" --set "task.path=\".gpu/fx/$f.pairs.jsonl\"" --set "name=\"das-$f\"" > $OUT/das-$f-$dev.log 2>&1
    echo "das $f $dev rc=$?"
  done
done
t0=$SECONDS
ROAD_OUT=$OUT/pool timeout 300 $ROAD run experiments/tiny-equality-das.toml --gpus 1 --run-id g1 > $OUT/pool.log 2>&1
echo "pool --gpus 1 rc=$? $((SECONDS-t0))s"
ROAD_OUT=$OUT/pool timeout 60 $ROAD run experiments/tiny-equality-das.toml --gpus 2 > $OUT/pool2.log 2>&1
echo "pool --gpus 2 (one GPU lent) rc=$?"; tail -2 $OUT/pool2.log
ls -R $OUT | head -50
