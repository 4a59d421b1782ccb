# Two commands do everything on a fresh machine:  make evaluate  and  make test.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DATA ?= data
# the best shipped model (README, "Results"); imgs/ is drawn from it
CHECKPOINT ?= best_models/glom_seed_hard.pt
CONSENSUS := best_models/glom_consensus.pt
SMALL := best_models/glom_small.pt
BEST := best_models/glom_best.pt
SCENES := best_models/glom_scenes.pt
# `make notebook` as root (a container): Jupyter refuses root without --allow-root, and there
# is no browser to open; listen on all addresses so that a published port reaches it
NOTEBOOK_ARGS ?= $(shell [ "$$(id -u)" = 0 ] && echo --allow-root --no-browser --ip=0.0.0.0)

.PHONY: setup data fashion-mnist evaluate figures test test-all train bench notebook clean-venv

$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c requirements.lock -e .
	@# the compiled networks (glom_mnist/native.py) and torch.compile (Glom.compile_steps)
	@# need a C++ compiler on a CPU
	@command -v g++ >/dev/null || command -v clang++ >/dev/null || \
	  { command -v apt-get >/dev/null && apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++ >/dev/null; } || \
	  echo "note: no C++ compiler, and g++ could not be installed: the model runs its slower pure-torch networks on the CPU"
	@# and the compiled networks need Python's C headers (a Debian python3 without python3-dev lacks them)
	@$(PY) -c "import sysconfig, os, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()['include'], 'Python.h')))" || \
	  { command -v apt-get >/dev/null && apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-dev >/dev/null; } || \
	  echo "note: no Python.h, and python3-dev could not be installed: the model runs its slower pure-torch networks on the CPU"
	@# build the compiled networks now (about 20 s, cached) rather than in the first run
	$(PY) -c "from glom_mnist import native; native.module()"
	touch $(STAMP)

setup: $(STAMP)            ## create .venv and install the pinned packages

data: setup                ## prepare MNIST under data/ (verified against the public MD5s)
	$(PY) -m glom_mnist data mnist --root $(DATA)

fashion-mnist: setup
	$(PY) -m glom_mnist data fashion-mnist --root $(DATA)

evaluate: data             ## the best model on the test set; metrics and figures in runs/evaluate/
	@if [ ! -f $(CHECKPOINT) ]; then \
	  echo "No trained model at $(CHECKPOINT): nothing to evaluate. Train one with 'make train'."; \
	else \
	  $(PY) -m glom_mnist evaluate --checkpoint $(CHECKPOINT) --root $(DATA) \
	    --json runs/evaluate/$(notdir $(basename $(CHECKPOINT))).json && \
	  $(PY) -m glom_mnist figures --root $(DATA) --checkpoint $(CHECKPOINT) \
	    --out runs/evaluate/$(notdir $(basename $(CHECKPOINT))); \
	fi

figures: data              ## redraw imgs/ and its folders consensus/, small/, best/, scenes/ (the one target that writes tracked files)
	$(PY) -m glom_mnist figures --root $(DATA) --checkpoint $(CHECKPOINT) --out imgs
	@if [ -f $(CONSENSUS) ]; then \
	  $(PY) -m glom_mnist figures --root $(DATA) --checkpoint $(CONSENSUS) --out imgs/consensus; \
	fi
	@if [ -f $(SMALL) ]; then \
	  $(PY) -m glom_mnist figures --root $(DATA) --checkpoint $(SMALL) --out imgs/small; \
	fi
	@if [ -f $(BEST) ]; then \
	  $(PY) -m glom_mnist figures --root $(DATA) --checkpoint $(BEST) --out imgs/best; \
	fi
	@# scenes of two test digits side by side, parsed by models never trained on scenes ...
	mkdir -p imgs/scenes
	$(PY) -m glom_mnist scenes --root $(DATA) --checkpoint $(CHECKPOINT) --kind pair --scenes 8 \
	  --figure imgs/scenes/seed_hard_pairs.png --force
	@if [ -f $(BEST) ]; then \
	  $(PY) -m glom_mnist scenes --root $(DATA) --checkpoint $(BEST) --kind pair --scenes 8 \
	    --figure imgs/scenes/best_pairs.png --force; \
	fi
	@# and by the model trained on random scenes, its islands in the objective
	@if [ -f $(SCENES) ]; then \
	  $(PY) -m glom_mnist scenes --root $(DATA) --checkpoint $(SCENES) --kind pair --scenes 8 \
	    --figure imgs/scenes/scenes_pairs.png --force; \
	  $(PY) -m glom_mnist scenes --root $(DATA) --checkpoint $(SCENES) --kind random --scenes 8 \
	    --batch-size 25 --figure imgs/scenes/scenes_random.png --force; \
	fi

test: data                 ## the whole test suite, notebooks (smoke mode) included
	GLOM_SMOKE=1 MPLBACKEND=Agg $(PY) -m pytest -q

test-all: data             ## also the slow tests
	GLOM_SMOKE=1 MPLBACKEND=Agg $(PY) -m pytest -q -m ""

train: data                ## train the seed preset (see README for the shipped recipe)
	$(PY) -m glom_mnist train --root $(DATA)

bench: setup               ## fast model vs the naive oracle, side by side (a few minutes)
	$(PY) benchmarks/bench_model.py --json runs/bench/cpu.json

notebook: data             ## Jupyter on notebooks/ (as root too: see NOTEBOOK_ARGS)
	$(VENV)/bin/jupyter notebook $(NOTEBOOK_ARGS) notebooks/
