# One-command set-up: every target creates what it needs (virtualenv, pip and apt installs).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.diffugts-installed
# Debian packages the tests use: dciodvfy (DICOM validator) and a real Pushgateway.
APT_PACKAGES := dicom3tools prometheus-pushgateway
OUT ?= local_outputs

.PHONY: help venv system-deps run test compile bench clean

help:
	@echo "make run      - run the study pipeline locally (kfp.local) on the embedded demo, offline"
	@echo "make test     - run the test suite"
	@echo "make compile  - write the pipeline YAML to build/pipelines/"
	@echo "make bench    - run the CPU benchmarks"
	@echo "make clean    - remove build outputs and local runs (keeps .venv)"

venv: $(STAMP)

$(STAMP): pyproject.toml requirements/constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip==26.3
	$(PIP) install --quiet -c requirements/constraints.txt -e '.[kfp,dev]'
	@touch $@

# apt installs only what is missing; needs root (CI) or sudo.
system-deps:
	@missing=""; \
	command -v dciodvfy >/dev/null || missing="$$missing dicom3tools"; \
	command -v prometheus-pushgateway >/dev/null || missing="$$missing prometheus-pushgateway"; \
	if [ -n "$$missing" ]; then \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO="sudo"; \
	  echo "installing Debian packages:$$missing"; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

run: $(STAMP)
	$(PY) -m pipelines.run_local --out $(OUT)

test: $(STAMP) system-deps
	@$(PY) -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

compile: $(STAMP)
	$(PY) -m pipelines.compile --out build/pipelines

bench: $(STAMP)
	$(PY) benchmarks/ingest_throughput.py

clean:
	rm -rf build $(OUT) .pytest_cache
	find . -name __pycache__ -not -path './$(VENV)/*' -prune -exec rm -rf {} +
