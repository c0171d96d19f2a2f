# Two commands on a fresh machine: `make run` and `make test`. Everything else is a helper.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat requirements.lock pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: run test install lint format typecheck pytest bench bench-tenancy bench-http bench-journey bench-loyalty bench-offers bench-billing openapi lock clean

$(STAMP): requirements.lock pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "Python 3.11+ is required")'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --require-hashes -r requirements.lock
	@rm -f $(VENV)/.installed-*
	@touch $(STAMP)

install: $(STAMP)

run: install ## start embedded PostgreSQL, migrate, seed the demo shop, serve on :8000 + the worker
	$(PY) -m api serve --with-worker

test: install lint typecheck pytest ## lint, type check and the whole test suite

lint: install
	$(VENV)/bin/ruff check api tests bench
	$(VENV)/bin/ruff format --check api tests bench

format: install
	$(VENV)/bin/ruff format api tests bench
	$(VENV)/bin/ruff check --fix api tests bench

typecheck: install
	$(VENV)/bin/mypy

pytest: install
	$(PY) -m pytest

bench-tenancy: install ## provision 1,000 shops, add a migration, migrate them all
	$(PY) -m bench.tenancy

bench-http: install ## the real server: auth cost, ingest (single, batch), profile reads, ceilings
	$(PY) -m bench.http

bench-journey: install ## 100k customers / 2M touchpoints: stage cost, RFM time, analytics p95
	$(PY) -m bench.journey

bench-loyalty: install ## loyalty programme vs none: single-purchase ingest (alternating, medians), redemption p99 hot/many
	$(PY) -m bench.loyalty

bench-offers: install ## 100k customers, 20 campaigns: offer decisions (dry run) and issuing, req/s and p99; webhook delivery
	$(PY) -m bench.offers

bench-billing: install ## ingest with usage counting on vs off (target: at most 5 % lower)
	$(PY) -m bench.billing

bench: bench-tenancy bench-http bench-journey bench-loyalty bench-offers bench-billing

openapi: install ## regenerate the committed spec
	$(PY) -m api openapi > openapi/openapi.json

lock: install ## re-resolve requirements.lock from pyproject.toml
	$(PY) -m pip install --quiet uv==0.13.8
	$(VENV)/bin/uv pip compile pyproject.toml --extra dev --generate-hashes \
		--python-version 3.11 --index-url https://pypi.org/simple -o requirements.lock

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
