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
# Lint tools (hadolint, kubernetes-validate, hera, checkov) live in their own venv:
# checkov's pins conflict with ours.
LINT_VENV ?= .venv-lint
LINT_STAMP := $(LINT_VENV)/.diffugts-lint-installed
IMAGE_VERSION := $(shell sed -n 's/^VERSION = "\(.*\)"/\1/p' components/images.py)
IMAGE_REPO ?= ghcr.io/diffugts

.PHONY: help venv lint-venv system-deps run test test-fast lint demo-model demo-heads demo-model-2d compile bench images clean

help:
	@echo "make run      - run the cohort pipeline locally (kfp.local) on the embedded demo, offline"
	@echo "make test     - run the test suite"
	@echo "make test-fast - the tests not marked slow (under 2 min on 2 CPU cores): the edit loop; CI runs make test"
	@echo "make lint     - ruff check, ruff format --check and mypy"
	@echo "make compile  - write the pipeline YAML to build/pipelines/"
	@echo "make bench    - run the CPU benchmarks (GPU: python benchmarks/gpu_stages.py)"
	@echo "make demo-model - retrain the shipped demo model from scratch (about 3 h on 2 CPU cores)"
	@echo "make demo-heads - retrain only its heads on the committed backbone (about 2.5 h: organ grounding 50 min, AOVA 40-65, refinement 45, verifier 20)"
	@echo "make demo-model-2d - retrain the shipped 2D demo model (about 22 min on 2 CPU cores)"
	@echo "make images   - build the CPU image and the CUDA 13 and CUDA 12 images (needs a Docker engine)"
	@echo "make clean    - remove build outputs and local runs (keeps .venv)"

venv: $(STAMP)

$(STAMP): pyproject.toml requirements/constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip==26.3
	$(PIP) install --quiet -c requirements/constraints.txt -e '.[kfp,dev]'
	@touch $@

lint-venv: $(LINT_STAMP)

$(LINT_STAMP): requirements/lint.txt
	@test -x $(LINT_VENV)/bin/python || $(PYTHON) -m venv $(LINT_VENV)
	$(LINT_VENV)/bin/pip install --quiet --upgrade pip==26.3
	$(LINT_VENV)/bin/pip install --quiet -r requirements/lint.txt
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

test: $(STAMP) $(LINT_STAMP) system-deps
	@$(PY) -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

# The edit loop: the tests not marked slow (training, model quality, kfp.local and other end-to-end runs).
test-fast: $(STAMP) $(LINT_STAMP) system-deps
	@$(PY) -m pytest -q -m "not slow"; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

# Runs all three checks and fails if any did (configuration in pyproject.toml).
lint: $(STAMP)
	@rc=0; \
	echo "ruff check"; $(VENV)/bin/ruff check . || rc=1; \
	echo "ruff format --check"; $(VENV)/bin/ruff format --check . || rc=1; \
	echo "mypy"; $(VENV)/bin/mypy || rc=1; \
	exit $$rc

# Not part of CI: trains the shipped demo model (about 3 h on 2 CPU cores), then verifies it.
demo-model: $(STAMP)
	$(PY) -m diffugts train demo --out src/diffugts/data/models/demo --seed 0
	$(VENV)/bin/diffugts models verify src/diffugts/data/models/demo

# Not part of CI: retrains the demo model's heads and organ network on its committed backbone (about 2.5 h on
# 2 CPU cores, one thread: what made the shipped heads), then verifies the package.
demo-heads: $(STAMP)
	$(PY) benchmarks/train_heads.py 0 src/diffugts/data/models/demo --backbone src/diffugts/data/models/demo
	$(VENV)/bin/diffugts models verify src/diffugts/data/models/demo

# Not part of CI: trains the shipped 2D diffusers-family demo model (about 22 min on 2 CPU cores).
demo-model-2d: $(STAMP)
	$(PY) -m diffugts train demo --config demo-2d --out src/diffugts/data/models/demo-2d --seed 0
	$(VENV)/bin/diffugts models verify src/diffugts/data/models/demo-2d

compile: $(STAMP)
	$(PY) -m pipelines.compile --out build/pipelines

bench: $(STAMP)
	$(PY) benchmarks/ingest_throughput.py
	$(PY) benchmarks/cpu_study.py

images:
	docker build -f images/cpu/Dockerfile -t $(IMAGE_REPO)/diffugts-cpu:$(IMAGE_VERSION) \
	  --build-arg VERSION=$(IMAGE_VERSION) --build-arg VCS_REF=$$(git rev-parse HEAD) \
	  --build-arg BUILD_DATE=$$(date -u +%Y-%m-%dT%H:%M:%SZ) .
	docker build -f images/cuda/Dockerfile -t $(IMAGE_REPO)/diffugts-cuda:$(IMAGE_VERSION) \
	  --build-arg VERSION=$(IMAGE_VERSION) --build-arg VCS_REF=$$(git rev-parse HEAD) \
	  --build-arg BUILD_DATE=$$(date -u +%Y-%m-%dT%H:%M:%SZ) .
	docker build -f images/cuda/Dockerfile -t $(IMAGE_REPO)/diffugts-cuda:$(IMAGE_VERSION)-cu128 \
	  --build-arg TORCH_CUDA=cu128 --build-arg VERSION=$(IMAGE_VERSION) --build-arg VCS_REF=$$(git rev-parse HEAD) \
	  --build-arg BUILD_DATE=$$(date -u +%Y-%m-%dT%H:%M:%SZ) .

clean:
	rm -rf build $(OUT) .pytest_cache
	find . -name __pycache__ -not -path './$(VENV)/*' -prune -exec rm -rf {} +
