# Two entry points for a fresh machine: `make bench` and `make test`. Each creates a virtual
# environment (unless one is active), installs what it needs, builds the extension, and runs.
# The CPU torch pin keeps dev/CI installs off the multi-GB CUDA wheel; the package itself accepts
# any torch >= 2.6 (a machine that already has torch keeps it).
SHELL := /bin/bash
VENV ?= .venv
TORCH_PIN ?= torch==2.13.0
ifeq ($(VIRTUAL_ENV),)
PY := $(VENV)/bin/python
$(PY):
	python3 -m venv $(VENV)
else
PY := $(VIRTUAL_ENV)/bin/python
endif
STAMP := $(dir $(PY)).dinov3_fast_installed

.PHONY: install bench test benchmarks-md clean

$(STAMP): pyproject.toml setup.py CMakeLists.txt $(wildcard csrc/*) $(wildcard kernels/*) | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q setuptools wheel "pybind11>=2.12" "cmake>=3.24" ninja
	$(PY) -m pip install -q --no-build-isolation -e ".[test,bench,train]"
	touch $@

install: $(STAMP)

bench: install
	$(PY) -m dinov3_fast.cli bench

test: install
	$(PY) -m pytest -q tests

benchmarks-md: install
	$(PY) tools/benchmarks_md.py

clean:
	rm -rf build $(VENV) dinov3_fast/_C*.so *.egg-info
