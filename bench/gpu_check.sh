#!/usr/bin/env bash
# The GPU check of issue 6 in one run (about 10 minutes on an H200: run it in two calls, naming benchmarks): step cost and CUDA peak memory of both backward strategies
# (benchmarks 1 and 4), framework overhead (2) and data pipeline (3), on one GPU. Each benchmark writes its JSON
# to $OUT (default bench/out/gpu); everything printed also goes to $OUT/gpu_check.log.
#
#   bash bench/gpu_check.sh        # needs shared/data/cifar10/{train,test}.parquet inside the repo
#   bash bench/gpu_check.sh framework_overhead framework_overhead_workers2 model_walks compile_blocks  # ~5 min
#
# Missing Python packages can come as wheels in .whl/ (installed into /tmp/site first).
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

# --twice: each configuration again with the same draws, every input size warm (cuDNN sets up each new shape once)
run step_cost_resnet50 150 bench/step_cost.py --model resnet50 --batch 128 --image-size 224 --steps 15 --warmup 5 --twice
# framework overhead also counts the host-device synchronisations of the trainer's steps (0 expected)
run framework_overhead 120 bench/framework_overhead.py --depth 56 --batch 128 --warmup 30 --steps 100 --repeats 3
run framework_overhead_workers2 120 bench/framework_overhead.py --depth 56 --batch 128 --warmup 30 --steps 100 \
  --repeats 3 --workers 2
run model_walks 60 bench/model_walks.py
# does torch.compile per residual block pay on the GPU? (it does not on the CPU)
run compile_blocks 240 bench/compile_blocks.py --steps 30 --warmup 5
run data_pipeline 200 bench/data_pipeline.py --cifar-dir shared/data/cifar10 --warmup 30 --steps 100 --repeats 3 \
  --loader-batches 150 --jpeg-workers 0,8 --jpeg-count 1600 --jpeg-batch 64
echo "=== done ($(date -u +%T))" | tee -a "$LOG"
