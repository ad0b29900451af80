# `make demo` and `make test` each work from a fresh clone: they create .venv, install the pinned
# PyTorch and this package, and make sure Fashion-MNIST is present.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.bcssl-installed
TORCH  := torch==2.14.1 torchvision==0.29.1

.PHONY: demo demo-long test lint install data bench clean-runs

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

install: $(STAMP)

data: $(STAMP)
	@PYTHON=$(PY) sh scripts/get_fashion_mnist.sh

demo: install data
	$(VENV)/bin/bcssl demo

demo-long: install data
	$(VENV)/bin/bcssl demo --config demo_fmnist_long

test: install data
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check --select F,E9 --line-length 120 bcssl benchmarks tests

bench: install data
	$(PY) benchmarks/train_throughput.py

clean-runs:
	rm -rf runs
