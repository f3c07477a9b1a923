# The two commands: `make run` and `make test`. Both create .venv when it is missing.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch pinned to the CPU wheel these machines hold locally; a bare `torch` pulls a multi-GB CUDA build
TORCH_PIN ?= torch==2.13.0
PIP := $(BIN)/python -m pip --disable-pip-version-check
QUIET_PIP := { grep -v "is ignored: it is neither a file nor a directory" || true; }

.PHONY: help venv test test-fast run lint clean system-deps bench

help:
	@echo "make run    open napari with the Segment and Fine-tune widgets and a sample retina (creates .venv if needed)"
	@echo "            make run ARGS=\"--screenshot shot.png\" segments, saves a screenshot and exits"
	@echo "make test   run the whole test suite headless (creates .venv if needed)"
	@echo "make bench  CPU performance ratios (roofline, eager PyTorch, 8192^2, training, GUI) -> docs/BENCHMARKS.md"
	@echo "make lint   ruff"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(PIP) install -q "$(TORCH_PIN)" 2>&1 | $(QUIET_PIP)
	$(PIP) install -q -e ".[test]" "$(TORCH_PIN)" 2>&1 | $(QUIET_PIP)
	$(BIN)/python -c "import torch, src_models; print('installed: torch', torch.__version__)"
	touch $(STAMP)

venv: $(STAMP)

# Xvfb for the GUI tests: installed when we are root and it is missing, otherwise we say what to install.
system-deps:
	@if command -v Xvfb >/dev/null 2>&1; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing Xvfb (apt-get)"; \
		apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			xvfb xauth libxcb-icccm4 libxcb-keysyms1 libxcb-xinerama0 libxcb-image0 libxcb-render-util0 \
			libxcb-randr0 libxcb-shape0 libxkbcommon-x11-0 libgl1 libegl1 libfontconfig1 libdbus-1-3 >/dev/null \
			|| echo "WARNING: could not install Xvfb; GUI tests will be skipped"; \
	else \
		echo "NOTE: Xvfb is missing and we are not root: GUI tests will be skipped. Install it with:"; \
		echo "  sudo apt-get install -y xvfb xauth libxcb-icccm4 libxcb-keysyms1 libxcb-xinerama0"; \
	fi

test: $(STAMP) system-deps
	@if command -v Xvfb >/dev/null 2>&1; then $(BIN)/python -m pytest -q; \
	else echo "Xvfb missing: GUI tests skipped"; $(BIN)/python -m pytest -q -m "not gui" -p no:xvfb; fi

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

# About 10 minutes on 2 cores; uses xvfb-run for the GUI part when it is installed.
bench: $(STAMP)
	$(BIN)/python benchmarks/bench.py $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src_models napari_r2unet tests benchmarks

# napari with the Segment widget and the retina sample. Headless check:
#   make run ARGS="--screenshot shot.png"    (segments, saves the window, exits; uses xvfb-run without a display)
ARGS ?=
run: $(STAMP)
	@if [ -z "$$DISPLAY" ] && [ -z "$$WAYLAND_DISPLAY" ] && command -v xvfb-run >/dev/null 2>&1; then \
		echo "no display: running under xvfb-run"; xvfb-run -a -s "-screen 0 1400x900x24" $(BIN)/python -m napari_r2unet $(ARGS); \
	else $(BIN)/python -m napari_r2unet $(ARGS); fi

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
