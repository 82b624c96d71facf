# Two commands do all the set-up on a fresh machine:
#   make demo   - create .venv, install, run a small D-CHAG MAE pretraining on the bundled cube (2 ranks, CPU)
#   make test   - create .venv, install, run the test suite
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# DeepSpeed's JIT-built ops (the CPU communication op: ~25 s to build) cached in this environment,
# not in ~/.cache/torch_extensions, where environments with other DeepSpeed sources rebuild each
# other's op on every start (the runs set the same default: dchag/training/launch.py).
export TORCH_EXTENSIONS_DIR := $(abspath $(VENV))/torch_extensions

$(STAMP): pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	# torch first, alone: the pinned CPU wheel (a bare resolver would pull a CUDA build).
	$(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q -e '.[test]'
	touch $(STAMP)

.PHONY: install test demo
install: $(STAMP)

test: $(STAMP)
	DS_ACCELERATOR=cpu $(VPY) -m pytest -q -x tests

demo: $(STAMP)
	bash examples/demo_cpu.sh
