# tether: make setup | run | demo | test | lint | bench | k8s-validate | image | image-test
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

.PHONY: setup system-deps node-deps run demo test lint bench clean k8s-validate k8s-rules hadolint image image-test

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
# and stop themselves, chromium for the approvals page, iptables for transparent mode's
# redirect script, and rsyslog (with its GnuTLS driver) that the audit sink tests receive with.
# This only installs what is missing.
system-deps:
	@missing=""; \
	command -v redis-server >/dev/null 2>&1 || missing="$$missing redis-server"; \
	[ -x /usr/bin/chromium ] || missing="$$missing chromium"; \
	command -v iptables >/dev/null 2>&1 || [ -x /usr/sbin/iptables ] || missing="$$missing iptables"; \
	[ -x /usr/sbin/rsyslogd ] || missing="$$missing rsyslog"; \
	[ -e /usr/lib/x86_64-linux-gnu/rsyslog/lmnsd_gtls.so ] || [ -n "$$(find /usr/lib -name lmnsd_gtls.so 2>/dev/null)" ] || missing="$$missing rsyslog-gnutls"; \
	[ -z "$$missing" ] || { \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "error: the tests need$$missing (apt-get install$$missing)" >&2; exit 1; fi; }

# The node clients the end-to-end tests drive (tests/node: the Vercel AI SDK), from the npm
# registry at the versions its lock file pins; again only when the lock file changed.
node-deps:
	@if command -v npm >/dev/null 2>&1; then \
	  [ tests/node/node_modules/.package-lock.json -nt tests/node/package-lock.json ] || \
	    npm ci --prefix tests/node --no-audit --no-fund --loglevel=error; \
	else echo "note: no node/npm here: the Vercel AI SDK tests (tests/test_e2e_ai_sdk.py) are skipped" >&2; fi

run: $(STAMP)
	$(BIN)/tether serve --config rules/tether.yaml

# The janitor story, then its Azure leg (disk deletes judged by the tags tether looks up).
demo: $(STAMP)
	$(BIN)/tether demo
	@echo
	$(BIN)/tether demo --cloud azure

test: $(STAMP) system-deps node-deps
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check proxy tests bench
	$(BIN)/mypy
	$(BIN)/tether check rules/tether.yaml
	$(BIN)/tether test rules/tests/*.yaml
	$(BIN)/tether opa-test rules/opa
	$(BIN)/ruff check deploy/k8s/validate.py
	$(BIN)/mypy --strict deploy/k8s/validate.py
	$(MAKE) --no-print-directory hadolint k8s-validate

# The Dockerfile, linted; every finding is fixed or ignored inline with its reason.
hadolint: $(STAMP)
	$(BIN)/hadolint Dockerfile

# Render every Kubernetes overlay with kubectl's built-in kustomize (offline, no cluster) and
# validate each resource strictly: built-in kinds with kubernetes-validate --strict, the
# ServiceMonitor CRD against deploy/k8s/schemas/ (see deploy/k8s/validate.py).
K8S_OVERLAYS := sidecar transparent gateway
k8s-validate: $(STAMP)
	@command -v kubectl >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1 || [ "$$(id -u)" != 0 ] || \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq kubectl >/dev/null 2>&1 || true
	@command -v kubectl >/dev/null 2>&1 || { \
	  echo "error: k8s-validate needs kubectl (>= 1.27; it renders the overlays with its built-in kustomize, no cluster needed)" >&2; exit 1; }
	$(PY) deploy/k8s/validate.py $(addprefix deploy/k8s/overlays/,$(K8S_OVERLAYS))

# kustomize reads no file outside deploy/k8s/base, so the base holds a copy of the rule files
# the container config includes; tests/test_k8s.py fails when it drifts. This refreshes it.
k8s-rules:
	cp rules/janitor.yaml deploy/k8s/base/config/janitor.yaml

# The container image, built with buildah from the Dockerfile (no Docker engine needed); the
# base is PYTHON_IMAGE, else the Dockerfile's default from a registry, else Debian trixie made
# with mmdebstrap (see deploy/image/build.sh). IMAGE is the tag the manifests name.
IMAGE ?= tether:0.1.0
image:
	deploy/image/build.sh $(IMAGE)

# Runs the image as the sidecar manifest does (uid 10001, its volumes, its args) and checks
# it from outside: probes, metrics, governed calls, the CA init container, SIGTERM; then
# renders and validates the overlays. Needs `make image` first (tests/test_image.py).
image-test: $(STAMP)
	TETHER_IMAGE=$(IMAGE) $(BIN)/pytest -q -m image tests/test_image.py

bench: $(STAMP)
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
