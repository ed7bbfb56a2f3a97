# Two entry points for a fresh machine (Python 3.11 + pip):
#   make demo   set up .venv, then run the main job (moevl compare) on the embedded data
#   make test   set up .venv, then lint, check that constraints/lmms.txt resolves, and run the test suite
# The set-up installs the versions in constraints/main.txt (pip -c), `make test-lmms` those in
# constraints/lmms.txt. `make lock` refreshes both from pyproject.toml's requirements in a fresh temporary
# venv (constraints/refresh.sh); run `make test` and `make test-lmms` before committing them.
VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?= runs/demo
# CONSTRAINTS= (empty) installs the newest versions pyproject.toml allows (what `make lock` does).
CONSTRAINTS ?= constraints/main.txt
LMMS_CONSTRAINTS ?= constraints/lmms.txt
# torch and torchvision together (torchvision pins the torch it was built for; the processors of Qwen2-VL,
# Qwen2.5-VL, LLaVA-OneVision, SmolVLM ... need it: their video processors). Installed first, in one command, when no torch
# is importable: a bare `torch` requirement would pull several GB of CUDA wheels from the internet.
TORCH_PIN := torch==2.14.1 torchvision==0.29.1
pip_c = $(if $(1),-c $(1))

.PHONY: setup demo test lint bench test-lmms check-lmms-lock lock

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The torch + torchvision pins first (TORCH_PIN).
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_PIN) $(call pip_c,$(CONSTRAINTS))
	$(PY) -m pip install -q -e ".[dev]" $(call pip_c,$(CONSTRAINTS))
	# DeepSpeed (ZeRO-2/3 tests on CPU; its version is in the constraints): its own ops are compiled at run
	# time when used, never here; without build isolation, so that its build sees the installed torch instead
	# of pulling another one.
	DS_BUILD_OPS=0 $(PY) -m pip install -q --no-build-isolation deepspeed $(call pip_c,$(CONSTRAINTS))
	touch $@

demo: setup
	$(VENV)/bin/moevl compare --out $(OUT)

lint: setup
	$(VENV)/bin/ruff check src tests tests_lmms bench
	$(VENV)/bin/ruff format --check src tests tests_lmms bench

test: lint check-lmms-lock
	$(VENV)/bin/pytest -q -n 2 --dist loadfile

bench: setup
	$(PY) bench/bench_moe_layer.py

# lmms-eval integration (not in `make test`: +2.4 GB of dependencies; see pyproject's `lmms` extra).
test-lmms: setup
	$(PY) -m pip install -q -e ".[lmms]" $(TORCH_PIN) -c $(LMMS_CONSTRAINTS)
	$(VENV)/bin/pytest -q tests_lmms

# In `make test`: the lmms extra still resolves to exactly constraints/lmms.txt. Resolver only: --dry-run
# installs nothing and pip reads most wheels' metadata from the index without downloading them.
check-lmms-lock: setup
	$(PY) -m pip install -q --dry-run --ignore-installed -e ".[lmms]" $(TORCH_PIN) -c $(LMMS_CONSTRAINTS)

# Refresh constraints/main.txt and constraints/lmms.txt (several minutes; see constraints/refresh.sh).
lock:
	TORCH_PIN="$(TORCH_PIN)" constraints/refresh.sh
