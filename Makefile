# Two commands do all the set-up on a fresh machine (Linux, CPU is enough):
#   make quickstart   # builds .venv, then trains IT and IM on a tiny local model and prints the loss table
#   make test         # builds .venv, then runs the test suite
# Both create the environment in .venv at the repo root the first time (~5 minutes), with the
# known-good versions in constraints.txt (the package itself only declares ranges).
# The default stack is Python 3.11 + Axolotl 0.19.0; the newest tested one is Python 3.12 + Axolotl 0.21.0:
#   make test PY=python3.12 VENV=.venv-py312    # constraints.txt picks the pins by Python version

PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONSTRAINTS := constraints.txt
PIP := $(BIN)/python -m pip
PYTEST_ARGS ?=
export AXOLOTL_DO_NOT_TRACK := 1
export DO_NOT_TRACK := 1
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export PATH := $(CURDIR)/$(BIN):$(PATH)

# pytest exits 5 when a selection holds no test (e.g. no slow test): not a failure here.
define pytest
	$(BIN)/python -m pytest $(1) $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest: no tests selected by '$(1)'"; rc=0; fi; exit $$rc
endef

.PHONY: quickstart test test-slow test-all layers bench clean-venv

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, alone: on Python 3.11 the pinned CPU wheel; a torch pulled in by Axolotl's
	# resolution could be a different build.
	$(PIP) install -q -c $(CONSTRAINTS) torch
	# DeepSpeed (test extra) comes as a source distribution: built without its C++/CUDA ops, which
	# the CPU tests do not use (the plugin only needs its ZeRO-3 partitioning in Python).
	DS_BUILD_OPS=0 DS_ACCELERATOR=cpu $(PIP) install -q -c $(CONSTRAINTS) -e ".[train,eval,test]"
	touch $(STAMP)

quickstart: $(STAMP)
	$(BIN)/python -m instruction_modelling.quickstart

test: $(STAMP)
	$(call pytest,-m "not slow")

test-slow: $(STAMP)
	$(call pytest,-m slow)

test-all: $(STAMP)
	$(call pytest,)

# The package's layer contracts (import-linter; pyproject.toml [tool.importlinter], docs/design.md).
layers: $(STAMP)
	$(BIN)/lint-imports

clean-venv:
	rm -rf $(VENV)
