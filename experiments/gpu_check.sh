#!/usr/bin/env bash
# GPU checks, run on a machine with a CUDA GPU from the repository root (the device tool runs it there):
# the `gpu` tests, then training throughput and MFU of the 125m and 1b presets (bf16-mixed, seq 2048), the 1b
# also with strategy.compile=true (torch.compile per block) — issue 5's target is MFU >= 45% for the 1b.
# Hydra and OmegaConf travel as wheels in .whl/ where the machine lacks them (see experiments/LEDGER.md).
set -u
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
OUT=${OUT:-/tmp/gpu_check}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)"
python3 -m llmforge.prepare output_dir=/tmp/llmforge-data > "$OUT/prepare.log" 2>&1 || { tail -20 "$OUT/prepare.log"; exit 1; }
echo "== gpu tests"
python3 -m pytest -q -p no:cacheprovider -m gpu tests/ 2>&1 | tail -4
echo "== throughput"
for spec in "125m 16 125m" "1b 8 1b" "1b 8 1b-compile strategy.compile=true"; do
  set -- $spec
  name=$3; extra=${4:-}
  python3 -m llmforge.train model=$1 hardware=gpu precision=bf16-mixed data.path=/tmp/llmforge-data $extra \
    data.seq_len=2048 data.batch_size=$2 trainer.max_steps=40 trainer.val_check_interval=1000 \
    trainer.limit_val_batches=0 trainer.ckpt_every_n_steps=100000 trainer.enable_progress_bar=false \
    +callbacks.throughput.warmup=10 callbacks.sample_text=null run_dir=/tmp/runs/$name \
    hydra.run.dir=/tmp/runs/$name > "$OUT/train_$name.log" 2>&1 \
    || { grep -E "Error|error" "$OUT/train_$name.log" | tail -3; continue; }
  cp /tmp/runs/$name/perf.json "$OUT/perf_$name.json"
done
python3 - "$OUT" <<'PY'
import json, sys, pathlib
print(f"{'run':<12}{'batch':>6}{'tokens/s':>12}{'ms/step':>10}{'MFU':>8}")
for p in sorted(pathlib.Path(sys.argv[1]).glob("perf_*.json")):
    d = json.loads(p.read_text())
    mfu = f"{100 * d['mfu']:.1f}%" if d.get("mfu") else "n/a"
    print(f"{p.stem[5:]:<12}{d['tokens_per_step'] // 2048:>6}{d['tokens_per_s']:>12.0f}{1e3 * d['median_step_s']:>10.1f}{mfu:>8}")
print("MFU = flops_per_token * tokens/s / 989e12 (H100/H200 dense bf16); flops_per_token = 6N + 12*L*d*seq")
PY
