#!/usr/bin/env bash
# The GPU check of issue 6 on one GPU: step cost and CUDA peak memory of both backward strategies (benchmarks 1
# and 4), framework overhead (2), data pipeline (3), and cudnn.benchmark. Each benchmark writes its JSON to $OUT
# (default bench/out/gpu); everything printed also goes to $OUT/gpu_check.log. Its time limits add up to 15 minutes
# (with the retired parts below it took about 17 on an H200), more than one device call may run: name the
# benchmarks to run a part, most important first (each part at most 7.5 minutes by its limits):
#
#   bash bench/performance/gpu_check.sh framework_overhead framework_overhead_workers2 framework_overhead_paired \
#     step_cost_cifar56 step_cost_cifar56_cudnn
#   bash bench/performance/gpu_check.sh step_cost_resnet50 data_pipeline
#
# Retired one-off benchmarks that once ran here (the optimizer step, the model walks, per-block compilation, the
# JPEG steps) rerun from history: bench/README.md, "Retired".
# The data pipeline needs shared/data/cifar10/{train,test}.parquet inside the repo. Missing Python packages can
# come as wheels in .whl/ (installed into /tmp/site first).
set -u
OUT_DIR=${OUT:-bench/out/gpu}
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_check.log"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_EVALUATE_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:$PWD"
fi
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, transformers, accelerate, datasets; print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'datasets', datasets.__version__)"
} 2>&1 | tee "$LOG"

ONLY=" $* "
run() {  # run NAME SECONDS SCRIPT ARGS...: one benchmark under a time limit, its output appended to the log
  local name=$1 limit=$2
  shift 2
  if [ "$ONLY" != "  " ] && [[ "$ONLY" != *" $name "* ]]; then return; fi
  echo "=== $name: python3 $* ($(date -u +%T))" | tee -a "$LOG"
  timeout "$limit" python3 "$@" --json "$OUT_DIR/$name.json" 2>&1 | grep -v -i -E "warn|^\s*$|it/s\]|examples/s\]" \
    | tee -a "$LOG" | tail -n 40
}

# framework overhead also counts the host-device synchronisations of the trainer's steps (0 expected)
run framework_overhead 120 bench/performance/framework_overhead.py --depth 56 --batch 128 --warmup 30 --steps 100 --repeats 3
run framework_overhead_workers2 120 bench/performance/framework_overhead.py --depth 56 --batch 128 --warmup 30 --steps 100 \
  --repeats 3 --workers 2
# the same, steps interleaved one by one (each timed to completion): steadier on a shared machine
run framework_overhead_paired 60 bench/performance/framework_overhead.py --depth 56 --batch 128 --warmup 30 --steps 100 --paired
# CIFAR ResNet-56 is launch-bound on a GPU: does cudnn.benchmark (fastest kernel per shape) change that?
run step_cost_cifar56 75 bench/performance/step_cost.py --model cifar_resnet56 --batch 128 --image-size 32 --steps 30 \
  --warmup 10 --twice --configs "CT,ST++ K=1,ST++ K=6,CT unfused"
run step_cost_cifar56_cudnn 75 bench/performance/step_cost.py --model cifar_resnet56 --batch 128 --image-size 32 --steps 30 \
  --warmup 10 --twice --configs "CT,ST++ K=1,ST++ K=6" --cudnn-benchmark
# --twice: each configuration again with the same draws, every input size warm (cuDNN sets up each new shape once)
run step_cost_resnet50 150 bench/performance/step_cost.py --model resnet50 --batch 128 --image-size 224 --steps 15 --warmup 5 --twice
run data_pipeline 300 bench/performance/data_pipeline.py --cifar-dir shared/data/cifar10 --warmup 30 --steps 100 --repeats 3 \
  --loader-batches 150 --jpeg-workers 0,8 --jpeg-count 1600 --jpeg-batch 64
echo "=== done ($(date -u +%T))" | tee -a "$LOG"
