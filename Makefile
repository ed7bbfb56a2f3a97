# Two entry points for a fresh machine (Python 3.11 + pip):
#   make demo   set up .venv, then run the main job (moevl compare) on the embedded data
#   make test   set up .venv, then lint and run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?= runs/demo

.PHONY: setup demo test lint bench test-lmms

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU pin first: a bare `torch` requirement would pull several GB of CUDA wheels.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	# DeepSpeed (ZeRO-2/3 tests on CPU): its own ops are compiled at run time when used, never here;
	# without build isolation, so that its build sees the CPU torch instead of pulling a CUDA one.
	DS_BUILD_OPS=0 $(PY) -m pip install -q --no-build-isolation "deepspeed==0.19.8"
	touch $@

demo: setup
	$(VENV)/bin/moevl compare --out $(OUT)

lint: setup
	$(VENV)/bin/ruff check src tests tests_lmms bench
	$(VENV)/bin/ruff format --check src tests tests_lmms bench

test: lint
	$(VENV)/bin/pytest -q -n 2 --dist loadfile

bench: setup
	$(PY) bench/bench_moe_layer.py

# lmms-eval integration (not in `make test`: +2.4 GB of dependencies; see pyproject's `lmms` extra).
test-lmms: setup
	$(PY) -m pip install -q -e ".[lmms]" torch==2.13.0
	$(PY) -m pip uninstall -q -y torchvision
	$(VENV)/bin/pytest -q tests_lmms
