# Relay: `make run` starts everything on this machine; `make test` runs the whole suite.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# The locks: exact versions with their hashes, for Python 3.11 to 3.13. runtime.txt is what the
# image installs; dev.txt is runtime.txt (the same pins) and the [dev] tools.
RUNTIME_LOCK := requirements/runtime.txt
DEV_LOCK := requirements/dev.txt

.PHONY: install lock run test test-faults test-stack lint bench bench-ingress clean docs docs-build

install: $(STAMP)

# Installs the dev lock, then Relay itself without resolving anything; again whenever a lock or
# pyproject.toml changes. A lock that no longer fits pyproject.toml fails
# tests/test_dependencies.py.
$(STAMP): pyproject.toml $(RUNTIME_LOCK) $(DEV_LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --require-hashes -r $(DEV_LOCK)
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

# Writes both locks from pyproject.toml, keeping every pin that still fits; LOCK_ARGS=--upgrade
# (or --upgrade-package NAME) moves pins to the newest releases. The runtime lock is resolved
# within the dev lock, so the image runs exactly the versions the tests ran.
LOCK_ARGS ?=
COMPILE = $(BIN)/uv pip compile pyproject.toml --quiet --universal --generate-hashes \
	--custom-compile-command 'make lock' $(LOCK_ARGS)
lock: install
	$(COMPILE) --extra dev --output-file $(DEV_LOCK)
	$(COMPILE) --constraint $(DEV_LOCK) --output-file $(RUNTIME_LOCK)

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

# The suite on the second stack (RabbitMQ 4, PostgreSQL 17, Python 3.13 from Debian trixie, in a
# chroot that scripts/ensure-stack builds and starts; bookworm's older stack on a Debian 13
# host): everything but the fault suite, and its kill -9 and broker-restart scenarios. Not the
# browser tests (the chroot has no chromium), nor those no stack changes (the OpenAPI and fuzz
# runs against the edge, the deploy files, the locks, the layout): about 12 minutes (a first
# build adds 2-3); CI runs it after `make test-faults`. Both runs go on when one fails; the
# target fails if either did.
STACK := scripts/ensure-stack
STACK_FAULTS := test_kill_9_of_each_role_mid_stream or test_broker_stop_app_start_app_three_times
STACK_SKIPS := test_chat_page test_console_page test_schemathesis test_fuzz test_openapi_tools \
	test_deploy test_dependencies test_layout test_docs
test-stack:
	@$(STACK)
	@status=0; \
	$(STACK) run pytest -m "not faults" $(STACK_SKIPS:%=--ignore=tests/%.py) || status=1; \
	$(STACK) run pytest -m faults tests/test_faults.py -k "$(STACK_FAULTS)" || status=1; \
	exit $$status

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy

# Every store, bot and run mode against the raw two-hop chain and the Celery relay, each
# case then profiled (py-spy: where each process's CPU goes, its stacks in bench-profiles/),
# then the HTTP floor and the ingress alone: about 15 minutes. Run it on an idle machine.
BENCH_PROFILES := bench-profiles
bench: install
	@scripts/ensure-services --postgres
	$(BIN)/python -m bench.e2e --profile $(BENCH_PROFILES) $(BENCH_ARGS)
	$(BIN)/python -m bench.http_floor
	$(BIN)/python -m bench.ingress_load

bench-ingress: install
	@scripts/ensure-services --postgres
	$(BIN)/python -m bench.ingress_load $(BENCH_ARGS)

# The docs site (mkdocs.yml, docs/): `make docs` serves it on 127.0.0.1:8000 and rebuilds on
# every change; `make docs-build` builds it into site/ with warnings as errors, as CI does.
DOCS := NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs
docs: install
	$(DOCS) serve --dev-addr 127.0.0.1:8000

docs-build: install
	$(DOCS) build --strict --site-dir site

clean:
	rm -rf $(VENV) bench-profiles .pytest_cache .mypy_cache .ruff_cache .hypothesis *.egg-info
