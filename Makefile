# hsm: `make demo` runs the main job on the embedded demo, `make test` the suite.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

.PHONY: install test demo bench clean torchvision-shim test-swift

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch first, so nothing resolves plain `torch` to a CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q torchvision==0.28.0
	# PyPI's torchvision is a CUDA build: let its Python transforms import on CPU torch (tools/torchvision_cpu.py).
	$(MAKE) --no-print-directory torchvision-shim VENV=$(VENV)
	$(BIN)/pip install -q -e '.[train,dev]'
	$(BIN)/pip install -q --no-build-isolation 'deepspeed>=0.16'
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -n 2 -q

demo: install
	$(BIN)/hsm demo

bench: install
	$(BIN)/python bench/planner.py

clean:
	rm -rf $(VENV) .cache demo_run

# Installs tools/torchvision_cpu.py into $(VENV) as a .pth import hook.
torchvision-shim:
	cp tools/torchvision_cpu.py "$$($(VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/_hsm_torchvision_cpu.py"
	echo "import _hsm_torchvision_cpu" > "$$($(VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/_hsm_torchvision_cpu.pth"
