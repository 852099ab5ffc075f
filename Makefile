# nvila-lab developer commands.
#
#   make setup       create .venv and install the project with its dev extra (idempotent)
#   make lab         start JupyterLab on nbs/
#   make test        run tests/ and every notebook (nbval) -- what CI runs (.ci/run)
#   make export      regenerate nvila_lab/ from the notebooks and clean the notebooks
#   make clean-venv  delete .venv
#
# Extra arguments: make test PYTEST_ARGS="-x -k tiling"    make lab LAB_ARGS="--port 9999"

SHELL := /bin/bash

VENV        := .venv
PY          := $(VENV)/bin/python
PIP         := $(PY) -m pip
CONSTRAINTS := $(VENV)/constraints.txt
STAMP       := $(VENV)/.installed
GPU_LOG     := $(VENV)/gpu-extra.log

# Same spec everywhere: a CPU wheel on machines whose pip config provides one, the CUDA build
# from PyPI on Linux otherwise. Installed first, then pinned so nothing else can swap it out.
TORCH_SPEC  := torch==2.13.*

PYTEST_ARGS ?=
LAB_ARGS    ?=
# Jupyter refuses to run as root unless told to (containers, CI).
ROOT_FLAG   := $(if $(filter 0,$(shell id -u)),--allow-root)

.PHONY: setup browser lab test export clean-venv

setup: $(STAMP)

# The venv itself: created once, never upgraded.
$(VENV)/pyvenv.cfg:
	@echo "==> creating $(VENV)"
	python3 -m venv $(VENV)

# Everything installed; redone only when pyproject.toml changes (or the venv is recreated).
$(STAMP): pyproject.toml $(VENV)/pyvenv.cfg
	@echo "==> installing $(TORCH_SPEC)"
	$(PIP) install --quiet "$(TORCH_SPEC)"
	@$(PY) -c 'import importlib.metadata as m; print("torch==" + m.version("torch"))' > $(CONSTRAINTS)
	@echo "==> pinned $$(cat $(CONSTRAINTS)) in $(CONSTRAINTS)"
	@# decord2 installs into the same decord/ folder as the old decord 0.6: drop the old one first.
	@$(PIP) uninstall -y -q decord 2>/dev/null || true
	@echo "==> installing nvila-lab[dev] (editable)"
	$(PIP) install --quiet -c $(CONSTRAINTS) -e ".[dev]"
	@# FlashAttention only on NVIDIA machines, and optional. It builds against the installed
	@# torch, hence --no-build-isolation (which needs a recent setuptools in the venv).
	@if command -v nvidia-smi >/dev/null 2>&1; then \
	  echo "==> NVIDIA GPU found: trying the [gpu] extra (flash-attn; slow if it must compile)"; \
	  { $(PIP) install -c $(CONSTRAINTS) "setuptools>=77" wheel packaging ninja psutil && \
	    $(PIP) install -c $(CONSTRAINTS) --no-build-isolation -e ".[gpu]"; } > $(GPU_LOG) 2>&1 \
	  && echo "==> flash-attn installed" \
	  || echo "note: flash-attn did not install (see $(GPU_LOG)); attention falls back to PyTorch SDPA"; \
	fi
	@touch $@
	@echo "==> setup done"

lab: setup
	$(VENV)/bin/jupyter lab nbs/ --ip=127.0.0.1 --no-browser --LabApp.app_settings_dir=$(CURDIR)/nbs/.jupyter/lab/settings $(ROOT_FLAG) $(LAB_ARGS)

# The dashboard's real-browser test drives Debian's chromium through Playwright (never `playwright install`).
# As root with apt-get (containers, CI) it is installed here; elsewhere the test skips with a note.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && [ -z "$$NVILA_NO_APT" ]; then \
	    echo "==> installing Debian's chromium for the browser test (NVILA_NO_APT=1 skips this)"; \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >/dev/null 2>&1 \
	      || echo "note: chromium did not install; the browser test will be skipped"; \
	  else echo "note: no chromium found; the browser test will be skipped (apt-get install chromium)"; fi; }

# pytest reads its options from pyproject.toml: tests/ plus nbs/ under nbval, which runs each
# notebook once; nbs/conftest.py skips `#| eval: false` and `#| slow`/`#| gpu` cells.
test: setup browser
	$(PY) -m pytest $(PYTEST_ARGS)

export: setup
	$(VENV)/bin/nbdev-export && $(VENV)/bin/nbdev-clean

clean-venv:
	rm -rf $(VENV)
