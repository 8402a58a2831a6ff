# The two commands of the README: `make demo` and `make test`. Each sets up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench gpu-check clean

$(STAMP): requirements-dev.txt setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	$(BIN)/python -m pip install -q --no-build-isolation -e ".[train]"
	touch $(STAMP)

setup: $(STAMP)

# CDCL with the small preset on the bundled DSB2018 sample (1/4 labeled), then the held-out test
# images: runs/demo/metrics.md, metrics.json and overlays/ (see docs/training.md). One thread: the
# small model gains little from more, and on a busy 2-core machine extra threads made it 5-10x slower.
demo: $(STAMP)
	$(BIN)/python train.py --data data/dsb2018_sample --preset small --method cdcl \
		--labeled-fraction 1/4 --epochs 50 --unsup-start-epoch 6 --lr 1e-3 --ema-alpha 0.99 --threads 1 --out runs/demo

test: $(STAMP)
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q tests

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run --sizes paper --device cpu

clean:
	rm -rf build *.egg-info $(VENV)
