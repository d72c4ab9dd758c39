#!/usr/bin/env bash
# The first 2 epochs of the CIFAR-10 ResNet-56 recipes on all 50,000 training images (issue 27; docs/results.md,
# "The recipe at ResNet-56 on all of CIFAR-10: the start"): the ST++ recipe, seeds 1-3, without a warm-up (as it
# shipped before this check) and with a one-epoch linear warm-up (391 steps at batch 128, the ~400 iterations He et
# al. warm ResNet-110 up for on CIFAR; the recipes have it since, as warmup_steps 0.005 of 200 epochs). Each run
# keeps the recipe's 200-epoch cosine schedule and is stopped after its evaluation at step 800 (2.05 epochs); it
# evaluates 2,000 test images every 100 steps, so a stall inside the first epoch shows. Two runs at once, one
# intra-op thread each (about 25 minutes a run on 2 cores).
# Usage: bash bench/resnet56_full_data_start.sh OUT   (a finished run is skipped: rerun to resume; a killed run restarts)
set -uo pipefail
OUT=${1:?usage: bash bench/resnet56_full_data_start.sh OUT}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_EVALUATE_OFFLINE=1 OMP_NUM_THREADS=1
COMMON=(--max_eval_samples 2000 --save_strategy no --eval_strategy steps --eval_steps 100 --logging_steps 50
        --subnet_monitor_count 0 --num_eval_subnets 0 --dataloader_num_workers 0 --report_to none --disable_tqdm true
        --warmup_steps 0)  # the runs with a warm-up set their own
STOP_AT=8  # evaluations: steps 100 .. 800

run() {  # NAME RECIPE ARGS...: train until the STOP_AT-th evaluation is logged
  local name=$1 recipe=$2; shift 2
  [ -f "$OUT/$name.done" ] && return
  python scripts/train.py "configs/$recipe.yaml" "${COMMON[@]}" "$@" --output_dir "$OUT/$name" >"$OUT/$name.log" 2>&1 &
  local pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    evals=$(grep -c "'eval_accuracy'" "$OUT/$name.log" 2>/dev/null)  # the log may not exist yet
    [ "${evals:-0}" -ge "$STOP_AT" ] && { kill "$pid"; break; }
    sleep 5
  done
  wait "$pid" 2>/dev/null
  touch "$OUT/$name.done"
}

lane1() {
  run stpp_s1 cifar10_resnet56_stpp --seed 1; run stpp_s2 cifar10_resnet56_stpp --seed 2
  run stpp_s3 cifar10_resnet56_stpp --seed 3
}
lane2() {
  run stpp_s1_wu1 cifar10_resnet56_stpp --seed 1 --warmup_steps 391
  run stpp_s2_wu1 cifar10_resnet56_stpp --seed 2 --warmup_steps 391
  run stpp_s3_wu1 cifar10_resnet56_stpp --seed 3 --warmup_steps 391
}
lane1 & lane2 & wait

echo "| run | test top-1 (2,000 images) at steps 100 / 200 / ... / 800 | training CE at steps 50 / 100 / 200 / 400 / 800 | collapse warning |"
echo "| --- | --- | --- | --- |"
for log in "$OUT"/*.log; do
  acc=$(grep -o "'eval_accuracy': '[0-9.]*'" "$log" | head -n "$STOP_AT" | cut -d"'" -f4 | paste -sd/)
  ce=$(grep -o "'ce_loss': '[0-9.]*'" "$log" | sed -n '1p;2p;4p;8p;16p' | cut -d"'" -f4 | paste -sd/)
  flag=$(grep -o "collapsed at step [0-9]*" "$log" | head -n 1)
  echo "| $(basename "$log" .log) | $acc | $ce | ${flag:-none} |"
done
