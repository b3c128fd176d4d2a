# Quick start:  make demo   (venv + install + corpus + tokenizer + shards + a few minutes of CPU training)
#               make test   (the test suite, as CI runs it)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The project's machines keep a CPU build of torch on disk; elsewhere pip resolves torch from PyPI.
WHEELS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)

STDLIB  = $(shell $(PYTHON) -c "import sysconfig; print(sysconfig.get_paths()['stdlib'])")
CODE    = pipeline=text input='$(STDLIB)/*.py' clean.enabled=false val_fraction=0.05

.PHONY: venv demo demo-mixture test test-fast lint bench clean slurm-up slurm-down ray-up ray-down

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(WHEELS) -e '.[dev]'
	touch $@

demo: venv
	$(BIN)/python -m llmforge.prepare
	$(BIN)/python -m llmforge.train experiment=demo resume=auto
	$(BIN)/python -m llmforge.plot runs/demo
	@echo
	@echo "Demo finished. Curves: runs/demo/curves.png   TensorBoard: $(BIN)/tensorboard --logdir runs/demo"
	@echo "Checkpoint: runs/demo/checkpoints/last.ckpt   Config and manifest: runs/demo/{config.yaml,run_manifest.json}"

# Two sources, one tokenizer, 70/30 (conf/experiment/mixture.yaml): the demo crawl and the stdlib's code.
demo-mixture: venv
	$(BIN)/python -m llmforge.prepare
	$(BIN)/python -m llmforge.prepare $(CODE) output_dir=data/code
	$(BIN)/python -m llmforge.tokenizer data/mix-tokenizer data/demo=0.7 data/code=0.3 --vocab-size 8192
	$(BIN)/python -m llmforge.prepare output_dir=data/mix-web tokenizer.path=data/mix-tokenizer
	$(BIN)/python -m llmforge.prepare $(CODE) output_dir=data/mix-code tokenizer.path=data/mix-tokenizer
	$(BIN)/python -m llmforge.train experiment=mixture resume=auto
	$(BIN)/python -m llmforge.plot runs/demo-mixture
	@echo "TensorBoard: $(BIN)/tensorboard --logdir runs/demo-mixture   (val/web/*, val/code/*, data/*/epoch)"

test: venv
	$(BIN)/python -m pytest -q

test-fast: venv
	$(BIN)/python -m pytest -q -m "not slow"

# A real single-node SLURM on this machine (root; as in CI): the tests marked `slurm` then run.
slurm-up:
	.ci/slurm-up.sh

slurm-down:
	.ci/slurm-down.sh

# A real single-node Ray head on this machine (address in /tmp/llmforge-ray/address): the tests marked `ray` run.
ray-up: venv
	RAY=$(BIN)/ray .ci/ray-up.sh

ray-down:
	.ci/ray-down.sh

lint: venv
	$(BIN)/ruff check .

bench: venv
	$(BIN)/pip install -q $(WHEELS) -e '.[dev,hf]'
	$(BIN)/python experiments/bench_model_vs_hf.py
	$(BIN)/python experiments/bench_overhead.py

clean:
	rm -rf runs data outputs multirun lightning_logs
