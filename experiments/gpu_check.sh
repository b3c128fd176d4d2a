#!/usr/bin/env bash
# GPU checks in one script of <= 8 minutes on one H200, from the repository root (the device tool runs it
# there): the `gpu` tests (<= 3 min), then the throughput table of experiments/bench_gpu.py (<= 5 min):
# 125m and 1b at seq 2048 and 4096, bf16 eager / compiled / compiled + fused CE / FP8, with tokens/s, MFU
# (formula printed), peak memory, optimizer step time and first-step (compile) time. Rows run in order of
# importance (issue 18's targets first) until the time budget is spent.
#
#   bash experiments/gpu_check.sh --wheels   # here, with pip and network: put the packages the device lacks
#                                            # in .whl/ (hydra-core, omegaconf, antlr4, torchao, liger-kernel)
#   bash experiments/gpu_check.sh            # on the GPU machine (device tool: carry [".whl"]); $OUT gets
#                                            # the logs and gpu_table.json
#   bash experiments/gpu_check.sh --dry      # on CPU: the script's own parts (gpu tests skip, tiny table)
#
# .whl/ must be ignored by git: `echo /.whl/ >> .git/info/exclude` once.
set -u
MODE=${1:-run}
PY=${PYTHON:-python3}

if [ "$MODE" = "--wheels" ]; then
  mkdir -p .whl
  plat="--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64"
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $plat \
    -d .whl hydra-core==1.3.2 omegaconf==2.3.0 torchao==0.18.0 liger-kernel==0.8.5 || exit 1
  $PY -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3 || exit 1  # sdist only: built here
  ls -la .whl
  exit 0
fi

if [ -d .whl ] && [ "$MODE" != "--dry" ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_check}; mkdir -p "$OUT"

if [ "$MODE" = "--dry" ]; then
  echo "== gpu tests (skip without CUDA)"
  $PY -m pytest -q -p no:cacheprovider -m gpu tests/test_fast_paths.py tests/test_loss.py 2>&1 | tail -2
  echo "== throughput (dry: CPU, tiny model)"
  $PY experiments/bench_gpu.py --dry --json "$OUT/gpu_table.json"
  exit $?
fi

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)"
$PY -c "import torchao, liger_kernel; print('torchao', torchao.__version__, 'liger-kernel: yes')" 2>/dev/null \
  || echo "torchao or liger-kernel missing: FP8 rows skip, fused CE uses the torch path"
echo "== gpu tests"
timeout 180 $PY -m pytest -q -p no:cacheprovider -m gpu tests/ --continue-on-collection-errors --timeout 170 \
  > "$OUT/gpu_tests.log" 2>&1
echo "pytest -m gpu: exit $?"; tail -6 "$OUT/gpu_tests.log"
echo "== throughput (one H200: 989 TFLOP/s dense bf16)"
# progress lines as rows finish (a row killed by the timeout still leaves the earlier ones, and the json)
timeout 290 $PY experiments/bench_gpu.py --budget 250 --json "$OUT/gpu_table.json" 2>&1 | tee "$OUT/bench_gpu.log"
