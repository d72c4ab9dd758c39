#!/usr/bin/env bash
# Does the study runner, killed mid-run (SIGKILL after an epoch checkpoint) and started again, give the
# numbers and the weights of one run straight through? Usage: bash bench/full_network_study_resume_check.sh [DIR]
cd "$(dirname "$0")/.."
R=$(realpath -m "${1:-outputs/full_network_study_resume_check}")
mkdir -p "$R"
rm -rf $R/straight $R/split $R/rep_*
opts=(--plan smoke --curve-every 2 --curve-samples 256 --test-samples 1000 --num-subnets 2 --recalibrate-bn 256)
python bench/full_network_study.py "${opts[@]}" --out $R/straight --report-dir $R/rep_straight > $R/straight.log 2>&1
# split: start, kill the training process once its epoch-2 checkpoint (step 4) is complete, start again
python bench/full_network_study.py "${opts[@]}" --out $R/split --report-dir $R/rep_split > $R/split1.log 2>&1 &
runner=$!
until [ -f $R/split/stpp_l1_kl-_step0_seed1/checkpoint-4/stim_hf_checkpoint.json ] || [ -f $R/split/stpp_l1_kl-_step0_seed1/checkpoint-4/trainer_state.json ]; do sleep 0.05; done
pkill -9 -f "output_dir $R/split"; kill -9 $runner
ls $R/split/stpp_l1_kl-_step0_seed1/ > $R/after_kill.txt
python bench/full_network_study.py "${opts[@]}" --out $R/split --report-dir $R/rep_split > $R/split2.log 2>&1
python - "$R" <<'PY'
import json, hashlib
import sys; R=sys.argv[1]
a=json.load(open(f"{R}/straight/stpp_l1_kl-_step0_seed1/result.json")); b=json.load(open(f"{R}/split/stpp_l1_kl-_step0_seed1/result.json"))
keys=["full_top1","subnet_top1_recalibrated","subnet_top1_inherited","curve_eval_top1","curve_train_ce"]
print({k:(a[k]==b[k]) for k in keys}, "sessions", a["sessions"], b["sessions"])
h=lambda p: hashlib.sha256(open(p,'rb').read()).hexdigest()[:16]
print("weights", h(f"{R}/straight/stpp_l1_kl-_step0_seed1/model.safetensors"), h(f"{R}/split/stpp_l1_kl-_step0_seed1/model.safetensors"))
PY
