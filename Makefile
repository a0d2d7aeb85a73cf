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

.PHONY: demo test real lint bench publish env lock clean-env help gpu-wheels gpu-check
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

# The prepared GPU check (README "GPU check"). It runs on a bare GPU machine's own python (torch, transformers,
# accelerate there), not in .venv: the wheels it lacks come from `make gpu-wheels` (here, online) and are installed
# into GPU_SITE, first on PYTHONPATH, when that python cannot import diffusers. ARGS: e.g. --profile sample (the CPU
# self-check), --budget-s 300, --only annotate caption.
GPU_PYTHON ?= python3
GPU_SITE ?= /tmp/facecontrol-site
GPU_WHEELS ?= .whl
gpu-wheels: $(BIN)/.installed  ## download the wheels the GPU check needs on a bare GPU machine (python 3.12) into .whl/
	$(BIN)/python -m pipelines.gpucheck.wheels $(GPU_WHEELS)

gpu-check:  ## time every GPU path at the real models' sizes, offline, within 8 min (writes reports/bench/gpu/)
	if ! $(GPU_PYTHON) -c "import diffusers" 2>/dev/null; then \
	  test -d $(GPU_WHEELS) || { echo "gpu-check: $(GPU_PYTHON) has no diffusers and $(GPU_WHEELS)/ is missing: run make gpu-wheels first"; exit 2; }; \
	  $(GPU_PYTHON) -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $(GPU_SITE) $(GPU_WHEELS)/*.whl; \
	  export PYTHONPATH=$(GPU_SITE)$${PYTHONPATH:+:$$PYTHONPATH}; \
	fi; \
	PYTHONUNBUFFERED=1 $(GPU_PYTHON) -m stages.gpu_check $(ARGS)

clean-env:  ## remove the virtual environment
	rm -rf $(VENV)
