# The two commands a newcomer needs:
#   make demo   # create the environment if missing, then `dvc repro` the whole pipeline (offline sample)
#   make test   # create the environment if missing, then run the test suite
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# dvc.yaml runs `python -m stages.<name>`: put the environment first on PATH so that is ours.
export PATH := $(abspath $(BIN)):$(PATH)
SPIGA_VERSION := 0.0.6

.PHONY: demo test real lint bench publish env clean-env help
help:  ## list targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*##/ -/'

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip "setuptools<81" wheel
	$(BIN)/python -m pip install --quiet -e ".[dev]" 2>&1 | { grep -v "^WARNING: Location" || true; }
	$(BIN)/python -m pip install --quiet --no-deps spiga==$(SPIGA_VERSION) 2>&1 | { grep -v "^WARNING: Location" || true; }
	$(BIN)/python -c "import torch, torchvision, transformers, datasets, spiga.models.spiga, dvc"
	touch $@

env: $(BIN)/.installed  ## create the virtual environment (.venv)

demo: $(BIN)/.installed  ## run the whole pipeline on the embedded sample with stand-in models (offline, CPU)
	$(BIN)/dvc repro

real: $(BIN)/.installed  ## the real configuration: official data and weights (needs internet; a GPU advised)
	$(BIN)/dvc exp run --set-param base.profile=real

test: $(BIN)/.installed  ## run the tests
	$(BIN)/python -m pytest -n 2 --dist loadfile tests

lint: $(BIN)/.installed  ## ruff
	$(BIN)/ruff check pipelines stages tests

bench: $(BIN)/.installed  ## re-measure the benchmarks (reports/bench/): annotate/caption/draw, training, COCO selection
	$(BIN)/dvc repro --force --single-item bench_facesynthetics bench_train_controlnet bench_coco_select

publish: $(BIN)/.installed  ## upload a dataset to the Hub (side effects; not in dvc repro): make publish ARGS="--repo-id user/name [--dry-run]"
	$(BIN)/python -m stages.publish $(ARGS)

clean-env:  ## remove the virtual environment
	rm -rf $(VENV)
