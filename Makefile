# Every command the README shows. `make install` then `make test` sets up and checks everything.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned so pip takes the local CPU wheel where one lies on disk (and the regular
# CUDA build from PyPI on a GPU machine) instead of resolving a newer multi-GB build.
TORCH ?= torch==2.13.0
RECIPE ?= recipes/gpt2/124m_full_elon-musk.yaml
ARGS ?=
NPROC ?= 1
RUN ?=
PYTEST_ARGS ?=
ELON_URL := https://uploads-ssl.webflow.com/60b2f56a556ad23e9c414ec8/61591f6661b89431b78faf3b_elon-musk.txt

.PHONY: install test test-fast lint format data finetune notebook docs clean

install: $(BIN)/finetune

$(BIN)/finetune: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	@touch $@

test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check finetune tests bench
	$(BIN)/ruff format --check finetune tests bench

format: install
	$(BIN)/ruff format finetune tests bench
	$(BIN)/ruff check --fix finetune tests bench

data: data/elon-musk.txt

data/elon-musk.txt:
	@$(PYTHON) -c "import sys, urllib.request; \
	data = urllib.request.urlopen('$(ELON_URL)', timeout=10).read(); \
	open('$@.tmp', 'wb').write(data)" 2>/dev/null \
	&& mv $@.tmp $@ && echo "downloaded $@" \
	|| { rm -f $@.tmp; echo "make data: cannot download $(ELON_URL) (offline?)." >&2; \
	     echo "Download it by hand and save it as $@, or try: make finetune RECIPE=recipes/offline-demo.yaml" >&2; exit 2; }

finetune: install
ifeq ($(NPROC),1)
	$(BIN)/finetune train $(RECIPE) $(ARGS)
else ifneq ($(shell $(BIN)/python -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null),1)
	$(BIN)/torchrun --nproc_per_node $(NPROC) -m finetune train $(RECIPE) $(ARGS)
else
	$(BIN)/accelerate launch --num_processes $(NPROC) --multi_gpu -m finetune train $(RECIPE) $(ARGS)
endif

notebook: install
	@test -n "$(RUN)" || { echo "usage: make notebook RUN=runs/NAME" >&2; exit 2; }
	$(BIN)/python -m finetune.notebook $(RUN)

docs: install
	$(BIN)/python -m finetune.docs README.md

clean:
	rm -rf runs .pytest_cache .ruff_cache
