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

.PHONY: demo test real lint bench publish env lock clean-env help
help:  ## list targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*##/ -/'

# The environment comes from requirements.lock (every package pinned with its hashes), never from a fresh
# resolution, so every machine gets the versions that were tested and the committed dvc.lock reproduces.
$(BIN)/.installed: requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --no-deps --require-hashes -r requirements.lock 2>&1 | { grep -v "^WARNING: Location" || true; }
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e . 2>&1 | { grep -v "^WARNING: Location" || true; }
	$(BIN)/python -c "import torch, torchvision, transformers, datasets, spiga.models.spiga, dvc"
	touch $@

# torch at the release the project's CI machines have on disk (no multi-GB download there); the rest as resolved.
UV ?= $(BIN)/uv
LOCK_PINS := torch==2.14.1 torchvision==0.29.1
lock: $(BIN)/.installed  ## refresh requirements.lock after editing pyproject.toml (make lock ARGS=--upgrade: newest of everything)
	printf '%s\n' $(LOCK_PINS) > $(VENV)/lock-pins.txt
	$(UV) pip compile pyproject.toml --extra dev --universal --python-version 3.10 --generate-hashes \
	  --constraints $(VENV)/lock-pins.txt --custom-compile-command "make lock" --quiet $(ARGS) -o requirements.lock
	grep -q "^spiga==" requirements.lock || { echo "# spiga: installed without its dependencies (see README)"; \
	  echo "spiga==$(SPIGA_VERSION)" | $(UV) pip compile - --no-deps --universal --generate-hashes --no-header --quiet; } >> requirements.lock

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
