# The two commands of the README: `make demo` and `make test`. Each sets up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench clean

$(STAMP): requirements-dev.txt setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	$(BIN)/python -m pip install -q --no-build-isolation -e ".[train]"
	touch $(STAMP)

setup: $(STAMP)

# CDCL with the small preset on the bundled DSB2018 sample (1/2 labeled): 450 steps on 128-pixel
# crops at native resolution, then the held-out test images with Otsu's threshold beside the model:
# runs/demo/metrics.md, metrics.json and overlays/ (see docs/training.md). SEED=1 make demo: another seed.
SEED ?= 0
DEMO_OUT ?= runs/demo
demo: $(STAMP)
	$(BIN)/python train.py --data data/dsb2018_sample --preset small --method cdcl --seed $(SEED) \
		--labeled-fraction 1/2 --epochs 45 --iters-per-epoch 10 --unsup-start-epoch 4 --lr 1e-3 \
		--ema-alpha 0.99 --threads 2 --out $(DEMO_OUT)

test: $(STAMP)
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q tests

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run --sizes paper --device cpu

clean:
	rm -rf build *.egg-info $(VENV)
