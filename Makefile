# hsm: `make demo` runs the main job on the embedded demo, `make test` the suite.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

.PHONY: install test demo bench clean test-deps torchvision-shim test-swift

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch first, so nothing resolves plain `torch` to a CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q torchvision==0.28.0
	# PyPI's torchvision is a CUDA build: let its Python transforms import on CPU torch (tools/torchvision_cpu.py).
	$(MAKE) --no-print-directory torchvision-shim SHIM_VENV=$(VENV)
	# dev brings pytest, import-linter (tools/lint_layers.py runs it) and playwright (it drives Debian's chromium: no `playwright install`).
	$(BIN)/pip install -q -e '.[train,dev,trl]'
	$(BIN)/pip install -q --no-build-isolation 'deepspeed>=0.16'
	# DeepSpeed builds its shared-memory collective on first use on a CPU (about a minute): build it here, not in a test.
	$(BIN)/python -c "from deepspeed.accelerator import get_accelerator as g; b = g().create_op_builder('ShareMemCommBuilder'); b is not None and b.is_compatible() and b.load()"
	touch $(STAMP)

test: install test-deps
	$(BIN)/python tools/lint_layers.py
	$(BIN)/python -m pytest -n 2 -q --durations=15

# The report's browser test drives Debian's chromium headless; apt-get runs only when it is missing.
test-deps:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -q && apt-get install -y -q chromium; }

demo: install
	$(BIN)/hsm demo

bench: install
	$(BIN)/python bench/planner.py

clean:
	rm -rf $(VENV) .venv-swift .cache demo_run

# Installs tools/torchvision_cpu.py into $(SHIM_VENV) as a .pth import hook. Its own variable: a sub-make given
# VENV=.venv-swift would redefine the .venv-swift/.installed rule ("overriding recipe" warnings).
SHIM_VENV ?= $(VENV)
torchvision-shim:
	cp tools/torchvision_cpu.py "$$($(SHIM_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/_hsm_torchvision_cpu.py"
	echo "import _hsm_torchvision_cpu" > "$$($(SHIM_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/_hsm_torchvision_cpu.pth"

# hsm inside ms-swift: its own environment (ms-swift 4.6 pins transformers<5.20, trl<1.0, peft<0.21).
SWIFT_VENV := .venv-swift
$(SWIFT_VENV)/.installed: pyproject.toml
	$(PY) -m venv $(SWIFT_VENV)
	$(SWIFT_VENV)/bin/pip install -q --upgrade pip
	$(SWIFT_VENV)/bin/pip install -q torch==2.13.0
	$(SWIFT_VENV)/bin/pip install -q torchvision==0.28.0
	$(MAKE) --no-print-directory torchvision-shim SHIM_VENV=$(SWIFT_VENV)
	$(SWIFT_VENV)/bin/pip install -q ms-swift==4.6.0 'qwen_vl_utils>=0.0.14'
	$(SWIFT_VENV)/bin/pip install -q -e '.[train,dev]' 'transformers<5.20' 'trl<1.0' 'peft<0.21'
	touch $@

test-swift: $(SWIFT_VENV)/.installed
	$(SWIFT_VENV)/bin/python -m pytest -q -n 0 tests/integrations/test_swift.py
