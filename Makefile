# Everything runs from the project's own virtualenv, created on first use.
# torch is installed first and pinned to the CPU build: an unpinned torch would pull a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
INSTALLED := $(VENV)/.installed
TORCH := torch==2.13.0

.PHONY: install demo test lint bench clean

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(TORCH)
	$(PIP) install --quiet -e '.[test,bench]'
	touch $(INSTALLED)

install: $(INSTALLED)

demo: $(INSTALLED)
	$(PY) -m tools.demo

# Coverage of the installed packages, including what the service tests run in server and worker subprocesses
# (tests/service/coverage.toml).
test: $(INSTALLED)
	$(PY) -m pytest --cov=adapter_merge --cov-config=tests/service/coverage.toml --cov-report=term

lint: $(INSTALLED)
	$(VENV)/bin/ruff check .

bench: $(INSTALLED)
	$(PY) -m tools.bench

clean:
	rm -rf demo-data build *.egg-info .pytest_cache .ruff_cache
