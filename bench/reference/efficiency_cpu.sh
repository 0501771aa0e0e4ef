#!/usr/bin/env bash
# The efficiency table's speed and memory columns (issue 21), on this CPU: for each method, a short
# `road finetune experiments/sentiment-<kind>.toml` and right after it its peft / pyreft counterpart
# (peft_sentiment.py / pyreft_sentiment.py) on the same split and settings, each under
# /usr/bin/time -v (peak RSS of the whole process, model included). Training seconds per step are
# the mean over steps 2..N (step 1 pays one-off allocation): road's from train_log.csv, the
# reference's from its JSON line. Accuracy needs the full 32-step runs; this measures cost only.
#
# Usage (repository root): bench/reference/efficiency_cpu.sh ROAD GGUF OUT_DIR [STEPS=4] [KINDS...]
#   e.g. bench/reference/efficiency_cpu.sh target/release/road ~/.cache/road-dii/models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf /tmp/eff
#   Qwen2.5-0.5B: EXTRA_SETS=model=qwen2.5-coder-0.5b bench/reference/efficiency_cpu.sh target/release/road ~/.cache/road-dii/models/qwen2.5-coder-0.5b/*.gguf /tmp/effq
# Writes OUT_DIR/<kind>.{road,ref}.{out,err} and prints one TSV row per method:
#   kind  road_trainable  road_s_per_step  road_max_rss_mib  ref_impl  ref_s_per_step  ref_max_rss_mib
set -euo pipefail
ROAD=$1 GGUF=$2 OUT=$3 STEPS=${4:-4}
shift $(( $# < 4 ? $# : 4 ))
KINDS=${*:-road1 road4 lora dora oft boft loreft}
PY=${PY:-/tmp/torchbench/venv/bin/python}
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$OUT"
SETS=(--set train.steps="$STEPS" --set train.eval_every=0 --set data.dev_examples=8 --set data.test_examples=8)
# EXTRA_SETS: more overrides for both sides, e.g. EXTRA_SETS="model=qwen2.5-coder-0.5b" (GGUF = that model's file).
for e in ${EXTRA_SETS:-}; do SETS+=(--set "$e"); done
rss() { awk -F: '/Maximum resident/ {printf "%.0f", $2/1024}' "$1"; }
printf "kind\troad_trainable\troad_s_per_step\troad_max_rss_mib\tref_impl\tref_s_per_step\tref_max_rss_mib\tload_avg\n"
for k in $KINDS; do
  name=eff-$k
  /usr/bin/time -v "$ROAD" finetune "experiments/sentiment-$k.toml" --set name=$name "${SETS[@]}" >"$OUT/$k.road.out" 2>"$OUT/$k.road.err"
  run=$(ls -td notebooks-out/$name/*/ | head -1)
  road_sps=$(awk -F, 'NR==2 {a=$5} END {printf "%.2f", ($5-a)/(NR-2)}' "$run/train_log.csv")
  road_n=$(sed -n 's/.*"trainable_params":\([0-9]*\).*/\1/p' "$OUT/$k.road.out")
  if [ "$k" = loreft ]; then
    ref=(bench/reference/pyreft_sentiment.py); impl="pyreft 0.1.0"
  else
    ref=(bench/reference/peft_sentiment.py --kind "$k" --no-test); impl="peft 0.21.2"
  fi
  /usr/bin/time -v "$PY" "${ref[@]}" --road "$ROAD" --model "$GGUF" --threads 2 "${SETS[@]}" >"$OUT/$k.ref.out" 2>"$OUT/$k.ref.err" || true
  ref_sps=$(sed -n 's/.*"secs_per_step_after_first": \([0-9.]*\).*/\1/p' "$OUT/$k.ref.out")
  [ -n "$ref_sps" ] || ref_sps=$(sed -n 's/.*"train_secs": \([0-9.]*\).*/\1/p' "$OUT/$k.ref.out" | awk -v n="$STEPS" '{printf "%.2f (mean of all %d)", $1/n, n}')
  printf "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n" "$k" "$road_n" "$road_sps" "$(rss "$OUT/$k.road.err")" "$impl" "${ref_sps:-failed}" "$(rss "$OUT/$k.ref.err")" "$(cut -d' ' -f1-3 /proc/loadavg)"
done
