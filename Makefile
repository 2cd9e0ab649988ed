# hsm: `make demo` runs the main job on the embedded demo, `make test` the suite.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

.PHONY: install test demo bench clean test-deps

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch first, so nothing resolves plain `torch` to a CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[train,dev]'
	$(BIN)/pip install -q --no-build-isolation 'deepspeed>=0.16'
	touch $(STAMP)

test: install test-deps
	$(BIN)/python -m pytest -n 2 -q

# The report's browser test drives Debian's chromium headless; apt-get runs only when it is missing.
test-deps:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -q && apt-get install -y -q chromium; }

demo: install
	$(BIN)/hsm demo

bench: install
	$(BIN)/python bench/planner.py

clean:
	rm -rf $(VENV) .cache demo_run
