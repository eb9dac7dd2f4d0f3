# tether: make setup | run | demo | test | lint | bench
SHELL := /bin/bash
VENV  ?= .venv
BIN   := $(VENV)/bin
PY    := $(BIN)/python
STAMP := $(VENV)/.installed

# A Python 3.12: on PATH, or pyenv's 3.12 (its shim fails unless asked for).
PYTHON312 ?= $(shell \
	for c in python3.12 python3; do \
	  p=$$(command -v $$c 2>/dev/null) && $$p -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null && { echo $$p; exit 0; }; \
	done; \
	if command -v pyenv >/dev/null 2>&1; then \
	  for v in $$(pyenv versions --bare 2>/dev/null | grep '^3\.12' | sort -rV); do \
	    p=$$(PYENV_VERSION=$$v pyenv which python3.12 2>/dev/null) && [ -x "$$p" ] && { echo $$p; exit 0; }; \
	  done; \
	fi)

.PHONY: setup system-deps run demo test lint bench clean

$(STAMP): pyproject.toml
	@if [ -z "$(PYTHON312)" ]; then \
	  echo "error: tether needs Python 3.12 (mitmproxy 12 requires it) and none was found on PATH or in pyenv." >&2; \
	  echo "       install python3.12, or set PYTHON312=/path/to/python3.12" >&2; exit 1; fi
	$(PYTHON312) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

# Services and programs the tests run for real (Debian packages): redis-server, which the tests start
# and stop themselves, and chromium for the approvals page. This only installs what is missing.
system-deps:
	@missing=""; \
	command -v redis-server >/dev/null 2>&1 || missing="$$missing redis-server"; \
	[ -x /usr/bin/chromium ] || missing="$$missing chromium"; \
	[ -z "$$missing" ] || { \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "error: the tests need$$missing (apt-get install$$missing)" >&2; exit 1; fi; }

run: $(STAMP)
	$(BIN)/tether serve --config rules/tether.yaml

demo: $(STAMP)
	$(BIN)/tether demo

test: $(STAMP) system-deps
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check proxy tests bench
	$(BIN)/mypy
	$(BIN)/tether check rules/tether.yaml
	$(BIN)/tether test rules/tests/*.yaml

bench: $(STAMP)
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
