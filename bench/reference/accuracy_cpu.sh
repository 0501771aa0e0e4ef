#!/usr/bin/env bash
# The efficiency table's accuracy column (issue 21): for each method and seed, the full-budget
# `road finetune experiments/sentiment-<kind>.toml --set seed=S` and its peft / pyreft
# counterpart (peft_sentiment.py / pyreft_sentiment.py --seed S) on the same split and settings.
# Accuracy does not depend on machine load, so this may run beside other work; seconds and memory
# come from efficiency_cpu.sh on a quiet machine.
#
# Usage (repository root): bench/reference/accuracy_cpu.sh ROAD GGUF OUT_DIR "SEEDS" [KINDS...]
#   e.g. bench/reference/accuracy_cpu.sh /tmp/road ~/.cache/road-dii/models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf /tmp/acc "0 1 2"
#   SIDES=road or SIDES=ref runs one side only (default both); rows already in OUT_DIR/rows.tsv
#   are not re-run (so a killed call resumes), and the summary averages whatever each side has.
#   EXTRA_SETS: more overrides for both sides, e.g. EXTRA_SETS="model=qwen2.5-coder-0.5b" (GGUF = that
#   model's file); its runs are then named acc-<model>-<kind>-s<seed>.
# Writes OUT_DIR/<kind>.s<seed>.{road,ref}.out and appends one TSV row per (method, seed) to
# OUT_DIR/rows.tsv:  kind  seed  road_test_acc  road_dev_acc  ref_impl  ref_test_acc  ref_dev_acc
# then prints mean ± s.d. (sample, n−1) per method and side.
set -euo pipefail
ROAD=$1 GGUF=$2 OUT=$3 SEEDS=$4
shift 4
KINDS=${*:-road1 road4 lora dora oft boft loreft}
PY=${PY:-/tmp/torchbench/venv/bin/python}
SETS=()
for e in ${EXTRA_SETS:-}; do SETS+=(--set "$e"); done
TAG=$(printf '%s' "${EXTRA_SETS:-}" | sed -n 's/.*model=\([^ ]*\).*/\1-/p')
mkdir -p "$OUT"
touch "$OUT/rows.tsv"
field() { sed -n "s/.*\"$1\": *\([0-9.]*\).*/\1/p" "$2" | tail -1; }
for k in $KINDS; do
  for s in $SEEDS; do
    if grep -q "^$k	$s	" "$OUT/rows.tsv"; then continue; fi # done in an earlier (killed) call
    name=acc-$TAG$k-s$s
    road_test=- road_dev=- impl=- ref_test=- ref_dev=-
    if [ "${SIDES:-both}" != ref ]; then
      "$ROAD" finetune "experiments/sentiment-$k.toml" --set name=$name --set seed=$s "${SETS[@]}" >"$OUT/$k.s$s.road.out" 2>&1
      sum=$(ls -td notebooks-out/$name/*/ | head -1)summary.json
      road_test=$(tr -d '\n ' <"$sum" | sed -n 's/.*"test":{[^}]*"accuracy":\([0-9.]*\).*/\1/p')
      road_dev=$(field dev_accuracy "$sum")
    fi
    if [ "${SIDES:-both}" != road ]; then
      if [ "$k" = loreft ]; then
        ref=(bench/reference/pyreft_sentiment.py); impl="pyreft 0.1.0"
      else
        ref=(bench/reference/peft_sentiment.py --kind "$k"); impl="peft 0.21.2"
      fi
      "$PY" "${ref[@]}" --road "$ROAD" --model "$GGUF" --threads 2 --seed "$s" "${SETS[@]}" >"$OUT/$k.s$s.ref.out" 2>"$OUT/$k.s$s.ref.err" || true
      ref_test=$(field test_accuracy "$OUT/$k.s$s.ref.out"); ref_dev=$(field dev_accuracy "$OUT/$k.s$s.ref.out")
    fi
    printf "%s\t%s\t%s\t%s\t%s\t%s\t%s\n" "$k" "$s" "$road_test" "$road_dev" "$impl" "${ref_test:-failed}" "${ref_dev:--}" >>"$OUT/rows.tsv"
  done
done
awk -F'\t' '
  function stat(sum, sq, n) { m = sum / n; v = n > 1 ? (sq - n * m * m) / (n - 1) : 0; return sprintf("%.3f ± %.3f (n=%d)", m, v > 0 ? sqrt(v) : 0, n) }
  { seen[$1] = 1; if ($3 ~ /^[0-9.]+$/) { r[$1] += $3; r2[$1] += $3 * $3; rn[$1]++ }; if ($6 ~ /^[0-9.]+$/) { f[$1] += $6; f2[$1] += $6 * $6; fn[$1]++; impl[$1] = $5 } }
  END { printf "kind\troad test acc\treference test acc\n"; for (k in seen) printf "%s\t%s\t%s\n", k, rn[k] ? stat(r[k], r2[k], rn[k]) : "-", fn[k] ? impl[k] " " stat(f[k], f2[k], fn[k]) : "-" }
' "$OUT/rows.tsv"
