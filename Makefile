# The two commands of the README: `make demo` and `make test`. Each sets up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# the demo needs requirements.txt only; the tests add requirements-dev.txt (Triton, pytest, lint)
RUN_STAMP := $(VENV)/.installed-run
DEV_STAMP := $(VENV)/.installed-dev

.PHONY: setup demo test lint bench clean

$(RUN_STAMP): requirements.txt setup.py pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt
	$(BIN)/python -m pip install -q --no-build-isolation -e ".[train]"
	touch $@

$(DEV_STAMP): $(RUN_STAMP) requirements-dev.txt
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	touch $@

setup: $(DEV_STAMP)

# CDCL with the small preset on the bundled DSB2018 sample (1/2 labeled): 900 steps on 128-pixel
# crops at native resolution, then the held-out test images with Otsu's threshold beside the model:
# runs/demo/metrics.md, metrics.json and overlays/ (see docs/training.md). SEED=1 make demo: another seed.
SEED ?= 0
DEMO_OUT ?= runs/demo
demo: $(RUN_STAMP)
	$(BIN)/python train.py --data data/dsb2018_sample --preset small --method cdcl --seed $(SEED) \
		--labeled-fraction 1/2 --epochs 90 --iters-per-epoch 10 --unsup-start-epoch 4 --lr 1e-3 \
		--ema-alpha 0.99 --threads 2 --out $(DEMO_OUT)

test: $(DEV_STAMP) lint
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q tests

lint: $(DEV_STAMP)
	$(BIN)/ruff check .

bench: $(DEV_STAMP)
	$(BIN)/python -m benchmarks.run --sizes paper --device cpu

clean:
	rm -rf build *.egg-info $(VENV)
