#!/usr/bin/env bash
# The first epochs of the CIFAR-10 recipes at ResNet-56 on 5,000 images (docs/results.md, "The recipe at
# ResNet-56: early stalls"): CT, the ST++ recipe, ST++ with lambda 1e-6 (the sub-network passes run, their
# gradient is negligible) and the old recipe (lambda 1 from step 0, KL-), seeds 1-3, with and without a
# learning-rate warm-up over 10 % of the run. Each run has the 10-epoch schedule and is stopped after its
# epoch-4 evaluation; two run at once, one intra-op thread each (about 5 minutes a run on 2 cores).
# Usage: bash bench/resnet56_early_phase.sh OUT   (a finished run is skipped: rerun to resume)
set -uo pipefail
OUT=${1:?usage: bash bench/resnet56_early_phase.sh OUT}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_EVALUATE_OFFLINE=1 OMP_NUM_THREADS=1
COMMON=(--max_train_samples 5000 --max_eval_samples 2000 --num_train_epochs 10 --save_strategy no
        --eval_strategy epoch --subnet_monitor_count 0 --num_eval_subnets 0 --dataloader_num_workers 0
        --report_to none --disable_tqdm true --warmup_steps 0)  # the recipes' own warm-up came later; runs with one set it

run() {  # NAME RECIPE ARGS...: train until the epoch-4 evaluation is logged
  local name=$1 recipe=$2; shift 2
  [ -f "$OUT/$name.done" ] && return
  python scripts/train.py "configs/$recipe.yaml" "${COMMON[@]}" "$@" --output_dir "$OUT/$name" >"$OUT/$name.log" 2>&1 &
  local pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    grep -q "'eval_accuracy'.*'epoch': '4'" "$OUT/$name.log" && { kill "$pid"; break; }
    sleep 5
  done
  wait "$pid" 2>/dev/null
  touch "$OUT/$name.done"
}

OLD=(--kl_coef 1 --kl_coef_schedule constant --kl_loss kl_direction)
lane1() {
  run ct_s1 cifar10_resnet56_ct --seed 1; run ct_s2 cifar10_resnet56_ct --seed 2; run ct_s3 cifar10_resnet56_ct --seed 3
  run tiny_s1 cifar10_resnet56_stpp --seed 1 --kl_coef 1e-6; run tiny_s2 cifar10_resnet56_stpp --seed 2 --kl_coef 1e-6
  run ct_s1_wu cifar10_resnet56_ct --seed 1 --warmup_steps 0.1; run ct_s2_wu cifar10_resnet56_ct --seed 2 --warmup_steps 0.1
}
lane2() {
  run stpp_s1 cifar10_resnet56_stpp --seed 1; run stpp_s2 cifar10_resnet56_stpp --seed 2; run stpp_s3 cifar10_resnet56_stpp --seed 3
  run old_s1 cifar10_resnet56_stpp --seed 1 "${OLD[@]}"
  run stpp_s1_wu cifar10_resnet56_stpp --seed 1 --warmup_steps 0.1; run stpp_s2_wu cifar10_resnet56_stpp --seed 2 --warmup_steps 0.1
}
lane1 & lane2 & wait

echo "| run | top-1 at epochs 1 / 2 / 3 / 4 | training CE at epochs 1.25 / 2.5 / 3.75 | collapse warning |"
echo "| --- | --- | --- | --- |"
for log in "$OUT"/*.log; do
  acc=$(grep -o "'eval_accuracy': '[0-9.]*'" "$log" | head -n 4 | cut -d"'" -f4 | paste -sd/)
  ce=$(grep -o "'ce_loss': '[0-9.]*'" "$log" | head -n 3 | cut -d"'" -f4 | paste -sd/)
  flag=$(grep -o "collapsed at step [0-9]*" "$log" | head -n 1)
  echo "| $(basename "$log" .log) | $acc | $ce | ${flag:-none} |"
done
