# Two commands do everything on a fresh machine:
#   make run    create .venv, install torch then the package, run the whole pipeline (dvc repro)
#   make plan   after adding a study / network to params.yaml: rewrite plans/ and dvc.yaml
#   make test   same set-up, then the test suite
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN    := $(CURDIR)/$(VENV)/bin
PYTEST_ARGS ?=

export PATH := $(BIN):$(PATH)
export DVC_NO_ANALYTICS := 1
export DVC_SITE_CACHE_DIR := $(CURDIR)/.dvc/tmp/site-cache
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export PYTHONUNBUFFERED := 1

.PHONY: install debian-datasets run plan test test-slow test-all paper full-cpu bench validate clean

install: $(VENV)/.installed

# torch first: the pinned version is a CPU build here and the CUDA build on a GPU machine.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev,real-data]"
	@$(MAKE) --no-print-directory debian-datasets
	touch $@

# Fashion-MNIST comes from Debian's dataset-fashion-mnist; installed where apt and root (or sudo)
# exist, else the pca study skips it and says so (python -m pipeline datasets prints the remedy).
debian-datasets:
	@if [ -d /usr/share/datasets/fashion-mnist ]; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || echo "note: apt-get install dataset-fashion-mnist failed; Fashion-MNIST will be skipped"; \
	elif command -v apt-get >/dev/null && sudo -n true 2>/dev/null; then \
	  sudo -n apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || echo "note: apt-get install dataset-fashion-mnist failed; Fashion-MNIST will be skipped"; \
	else echo "note: no apt (or no root): Fashion-MNIST will be skipped (Debian/Ubuntu: apt-get install dataset-fashion-mnist)"; fi

run: install
	$(BIN)/dvc repro

plan: install
	$(BIN)/python -m pipeline plan

test: install
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

test-slow: install  # the Ray cluster / sweep-resume tests (a few minutes)
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

test-all: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The paper-scale setting (TGMM: 12 layers, width 128, d in {2, 8, 32, 128}; linreg: Garg's 12 x 256, d = 20) as a DVC experiment.
paper: install
	eval $(BIN)/dvc exp run -n paper $$($(BIN)/python -m pipeline profile paper)

# The sizes before the 15-minute budget (about 48 min on 2 CPU cores): docs/results-full-cpu.md.
full-cpu: install
	eval $(BIN)/dvc exp run -n full-cpu $$($(BIN)/python -m pipeline profile full-cpu)

bench: install
	$(BIN)/python -m pipeline bench

validate: install
	$(BIN)/python -m pipeline validate

clean:
	rm -rf outputs dvc_plots data/tgmm data/robustness data/ablation data/linreg data/second_order data/logreg data/pca data/datasets data/clustering data/mixreg
