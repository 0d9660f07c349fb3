# `make demo` and `make test` each do all the set-up they need on a machine with only Python 3.11.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo test lint bench setup clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e '.[test,demo]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/timm-dec demo

lint: setup
	$(VENV)/bin/ruff check .

test: setup lint
	OMP_NUM_THREADS=1 $(PY) -m pytest -n 2 -q tests

bench: setup
	$(VENV)/bin/timm-dec bench warp
	$(VENV)/bin/timm-dec bench overhead

clean:
	rm -rf $(VENV) build *.egg-info
