# dataengine — two commands on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
DATA ?= ../shared/data
DEMO_ROOT ?= demo-corpus
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER ?= 0
export RAY_USAGE_STATS_ENABLED ?= 0
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export TOKENIZERS_PARALLELISM ?= false

ORT_WEB_VERSION ?= 1.30.0
ORT_DIR := pipeline/server/static/vendor/ort
ORT_FILES := ort.wasm.min.js ort-wasm-simd-threaded.mjs ort-wasm-simd-threaded.wasm

.PHONY: install demo test test-fast browser-deps web-deps clean

$(VENV)/.installed: pyproject.toml requirements.lock
	@command -v $(PYTHON) >/dev/null || { echo "needs $(PYTHON) on PATH"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# sam2 is an sdist whose build needs torch: build it against the pinned torch, without its
	# optional CUDA op (not used: no hole filling)
	$(PY) -m pip install -q setuptools wheel $$(grep -E '^torch==' requirements.lock)
	SAM2_BUILD_CUDA=0 $(PY) -m pip install -q --no-deps --no-build-isolation \
	  $$(grep -E '^sam2==' requirements.lock)
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps -e .
	touch $@

install: $(VENV)/.installed web-deps

## onnxruntime-web for the annotate page's in-browser SAM decoder (from the npm registry; the
## wasm file is 14 MB, so it is not in git). Without npm the server decodes every click itself.
web-deps: $(ORT_DIR)/.version-$(ORT_WEB_VERSION)

$(ORT_DIR)/.version-$(ORT_WEB_VERSION):
	@if command -v npm >/dev/null; then \
	  tmp=$$(mktemp -d) && (cd $$tmp && npm pack -q onnxruntime-web@$(ORT_WEB_VERSION) >/dev/null \
	    && tar xzf onnxruntime-web-$(ORT_WEB_VERSION).tgz) \
	  && mkdir -p $(ORT_DIR) && for f in $(ORT_FILES); do cp $$tmp/package/dist/$$f $(ORT_DIR)/; done \
	  && rm -f $(ORT_DIR)/.version-* && touch $@; rm -rf $$tmp; \
	else echo "npm not found: the annotate page decodes clicks on the server"; fi

## Runs the main job end to end on embedded defaults (local Ray, no Prefect server, local disk).
demo: install
	$(PY) -m dataengine demo --data $(DATA) --root $(DEMO_ROOT)

## Debian's Chromium for the browser tests (skipped by the tests when it is absent).
browser-deps:
	@if ! command -v chromium >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	      || echo "chromium could not be installed: browser tests will be skipped"; \
	  else echo "not root: install Debian's chromium to run the browser tests"; fi; \
	fi

test: install browser-deps
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(DEMO_ROOT) .pytest_cache
