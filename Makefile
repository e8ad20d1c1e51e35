# Relay: `make run` starts everything on this machine; `make test` runs the whole suite.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install run test test-faults lint bench bench-ingress clean

install: $(STAMP)

# Reinstalls when pyproject.toml changes; a fresh clone gets everything from PyPI.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: install
	@scripts/ensure-services
	@PATH="$(CURDIR)/$(BIN):$$PATH" scripts/run-local

test: install
	@scripts/ensure-services --postgres || echo "(continuing: the tests fall back to testcontainers)"
	@scripts/ensure-browser
	$(BIN)/pytest -m "not faults"

# The fault suite (kill -9, broker and PostgreSQL restarts, a network partition, a flapping
# endpoint) on a private broker node and PostgreSQL cluster, nodes of a private three-node
# RabbitMQ cluster stopped mid-stream, and the partition count changed mid-stream: about 9
# minutes. CI runs it after `make test` (.ci/run).
test-faults: install
	$(BIN)/pytest -m faults tests/test_faults.py tests/test_cluster.py tests/test_repartition.py

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy

# Every store, bot and run mode against the raw two-hop chain, then the ingress alone: about
# 10 minutes. Run it on an otherwise idle machine.
bench: install
	@scripts/ensure-services --postgres
	$(BIN)/python -m bench.e2e $(BENCH_ARGS)
	$(BIN)/python -m bench.http_floor
	$(BIN)/python -m bench.ingress_load

bench-ingress: install
	@scripts/ensure-services --postgres
	$(BIN)/python -m bench.ingress_load $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis *.egg-info
