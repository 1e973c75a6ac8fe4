# Everything runs from the project's own virtualenv, created on first use.
# torch is installed first and pinned to the CPU build: an unpinned torch would pull a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
INSTALLED := $(VENV)/.installed
TORCH := torch==2.13.0

.PHONY: install demo test lint bench bench-8b bench-service clean

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

# Issue #12's targets are judged on medians of at least 5 interleaved runs.
BENCH_RUNS ?= 5

bench: $(INSTALLED)
	$(PY) -m tools.bench --runs $(BENCH_RUNS)

# Issue #12's 8B-class target, not in CI: a 16 GB Llama-3-8B-shaped base (generated once into bench-data/), ours
# against cp -r, and PEFT once per adapter in a memory cgroup (needs root and cgroup v1's memory controller).
bench-8b: $(INSTALLED)
	$(PY) -m tools.bench_8b

# Issue #12's target 4: a merge whose base comes from S3 (moto, in a process of its own) overlapping the base's
# download, against the download alone and the local merge alone (tools/bench_overlap.py).
.PHONY: bench-overlap
bench-overlap: $(INSTALLED)
	$(PY) -m tools.bench_overlap

# The same with the S3 server behind a 50 MB/s link (tests/registries/throttle.py), as a registry across a network.
.PHONY: bench-overlap-link
bench-overlap-link: $(INSTALLED)
	$(PY) -m tools.bench_overlap --link-mb-per-s 50

# Issue #12's service target: the 1.1B merge as a job (embedded, then Celery on a private redis-server) against
# the CLI with --fsync, quiet and with a CPU hog on core 0; reused requests; GET /jobs/{id} during two merges.
bench-service: $(INSTALLED)
	$(PY) -m tools.bench_service --runs $(BENCH_RUNS)

# The MLflow tracking server that tests/registries runs (the fixture runs this target on first use): the full
# `mlflow` (~850 MB) lives in a venv of its own, so its pins never meet the project's; the project's venv has
# only the client, mlflow-skinny. The '*' .gitignore keeps the venv out of git, as newer `python -m venv` does.
MLFLOW_VENV ?= .venv-mlflow
MLFLOW_SPEC ?= mlflow>=3,<4

.PHONY: mlflow-venv
mlflow-venv: $(MLFLOW_VENV)/.installed

$(MLFLOW_VENV)/.installed:
	$(PYTHON) -m venv $(MLFLOW_VENV)
	echo '*' > $(MLFLOW_VENV)/.gitignore
	$(MLFLOW_VENV)/bin/pip install --quiet --upgrade pip
	$(MLFLOW_VENV)/bin/pip install --quiet '$(MLFLOW_SPEC)'
	touch $@

clean:
	rm -rf demo-data build *.egg-info .pytest_cache .ruff_cache
