# The README's two commands:  `make run` (the whole job) and `make test`.
# Both set up everything they need on a fresh machine, then do their work.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Where the four MNIST .gz files are, when there is no network (a folder or a base URL).
# Unset, they are downloaded from the public mirrors into ~/.cache/mnistflow.
export MNISTFLOW_MNIST_MIRROR

.PHONY: setup run test test-fast lint datasets browser java wrk bench clean stack team-tools tour

# The venv is rebuilt when the requirements change. constraints.txt pins every package
# (torch included: an unpinned torch would pull a multi-GB CUDA build). uv installs the same
# pinned set as pip in a third of the time (1.8 vs 5.4 minutes on the 2-core build machine:
# it unpacks in parallel), and `make test` counts set-up.
# uv does not read pip's configuration, so the indexes and wheel folders pip is configured
# with are handed to it, every index weighed alike as pip does.
# Bytecode is compiled at install, as pip does: where PYTHONDONTWRITEBYTECODE is set (it is on
# our build machines) nothing would ever write it, and every Python process (each mnistflow
# command, each `mlflow server`, each test's child) would compile MLflow's and torch's sources
# again: a small `mnistflow train` took 40 s of CPU without it, 23 s with it, and `make test`'s
# pytest 28 minutes without, 18 with (README, "Test durations").
UV_VERSION   := 0.13.9
PIP_INDEXES  := $(shell $(PYTHON) -m pip config get global.extra-index-url 2>/dev/null)
PIP_WHEELS   := $(PIP_FIND_LINKS) $(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null)
UV_SOURCES   := $(foreach u,$(PIP_INDEXES),--extra-index-url $(u)) \
                $(foreach d,$(sort $(PIP_WHEELS)),--find-links $(d)) --index-strategy unsafe-best-match
$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)
	$(BIN)/uv pip install --quiet --compile-bytecode --python $(BIN)/python $(UV_SOURCES) \
	  -c constraints.txt -e ".[dev]"
	$(BIN)/python -m compileall -q src
	touch $@

setup: $(BIN)/.installed

## The main job: train, track, register, promote, classify sample digits; then say where to look.
run: setup
	@$(MAKE) --no-print-directory datasets || echo "Going on without them: no nondigit_* metrics."
	$(BIN)/mnistflow pipeline

## Every test, the full-MNIST one included, three at a time: most of a test's time is spent
## waiting on a server, a child process or a timeout, so three workers keep two cores busy.
## Tests that share the team stack or the Spark session stay in one worker (conftest.py).
test: setup datasets browser team-tools java
	$(BIN)/python -m pytest -n 3 --dist loadgroup

## The fast ones only, for the edit-test loop: nothing that trains a model or runs over a few
## seconds (the slow marker, see tests/conftest.py), no server processes, no browser.
test-fast: setup datasets
	$(BIN)/python -m pytest -n 2 -m "not slow and not server and not browser"

lint: setup
	$(BIN)/ruff check src tests benchmarks scripts notebooks/*.py
	$(BIN)/ruff format --check src tests benchmarks scripts notebooks/*.py
	$(BIN)/mypy

## The learner's tour of MLflow: run notebooks/mlflow_tour.py top to bottom on a fresh store
## and save it, outputs included, as notebooks/mlflow_tour.ipynb (7 minutes of CPU time).
tour: setup
	$(BIN)/python scripts/tour.py

## The team stack by hand, as the tests start it: PostgreSQL + S3 (moto) + MLflow with logins.
stack: setup
	$(BIN)/python scripts/stack.py

# The team-stack tests start PostgreSQL 15's server programs and parse deploy/ with Debian's
# docker-compose (no Docker needed): both from Debian.
team-tools:
	@{ command -v docker-compose >/dev/null && ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; } || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get install -y -qq docker-compose postgresql >/dev/null || \
	    { apt-get update -qq && apt-get install -y -qq docker-compose postgresql >/dev/null; }; \
	  else echo "The team-stack tests need: sudo apt-get install docker-compose postgresql"; exit 1; fi; }

# What every run measures its model on besides MNIST, from Debian: Fashion-MNIST's images are
# the non-digits the abstain flag is scored against (MNISTFLOW_NONDIGITS, data/__init__.py);
# four handwriting fonts write the other-writers digits (data/writers.py).
DATASETS := dataset-fashion-mnist fonts-bwht fonts-dkg-handwriting fonts-breip fonts-rufscript
datasets:
	@dpkg -s $(DATASETS) >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get install -y -qq $(DATASETS) >/dev/null || \
	    { apt-get update -qq && apt-get install -y -qq $(DATASETS) >/dev/null; }; \
	  else echo "The measures beyond MNIST need: sudo apt-get install $(DATASETS)"; exit 1; fi; }

# The page test drives Debian's Chromium through Playwright (never a downloaded browser).
browser:
	@command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get install -y -qq chromium >/dev/null || \
	    { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; }; \
	  else echo "The page test needs Debian's chromium: sudo apt-get install chromium"; exit 1; fi; }

## Benchmarks (over an hour): the whole command, training, tracking, inference, serving, engines,
## baseline, team stack, outages, sweeps.
bench: setup datasets wrk team-tools java
	$(BIN)/python benchmarks/bench_command.py --fp32
	$(BIN)/python benchmarks/bench_training.py
	$(BIN)/python benchmarks/bench_presets.py
	$(BIN)/python benchmarks/bench_inference.py
	$(BIN)/python benchmarks/bench_spark.py
	$(BIN)/python benchmarks/bench_serving.py
	$(BIN)/python benchmarks/bench_serving.py --preset quality
	$(BIN)/python benchmarks/bench_engines.py
	$(BIN)/python benchmarks/bench_baseline.py
	$(BIN)/python benchmarks/bench_stack.py
	$(BIN)/python benchmarks/bench_outage.py
	$(BIN)/python benchmarks/soak_spool.py
	$(BIN)/python benchmarks/bench_sweep.py

# Spark (`predict --engine spark`, its tests and benchmark) runs on a Java runtime, from Debian.
java:
	@command -v java >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get install -y -qq openjdk-17-jre-headless >/dev/null || \
	    { apt-get update -qq && apt-get install -y -qq openjdk-17-jre-headless >/dev/null; }; \
	  else echo "The Spark tests need a Java runtime: sudo apt-get install openjdk-17-jre-headless"; exit 1; fi; }

# The serving benchmark loads the servers with wrk, from Debian.
wrk:
	@command -v wrk >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get install -y -qq wrk >/dev/null || \
	    { apt-get update -qq && apt-get install -y -qq wrk >/dev/null; }; \
	  else echo "The serving benchmark needs wrk: sudo apt-get install wrk"; exit 1; fi; }

clean:
	rm -rf $(VENV) mlruns mlartifacts mlflow.db sample-digits benchmarks/results \
	  notebooks/tour-store
