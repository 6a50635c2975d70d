# Two commands for a newcomer: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION := 2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
STAMP := $(VENV)/.installed

.PHONY: install demo test clean

install: $(STAMP)

# Every version comes from constraints.txt (the tested set; scripts/lock.sh refreshes it).
# torch goes in alone first, the CPU build: a local +cpu wheel when pip finds one, else PyTorch's CPU
# index; then the project with every runtime; pip check must be clean.
$(STAMP): pyproject.toml Makefile constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c constraints.txt --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q -c constraints.txt torch==$(TORCH_VERSION)+cpu \
	  || $(PIP) install -q -c constraints.txt torch==$(TORCH_VERSION)+cpu --index-url $(TORCH_INDEX)
	$(PIP) install -q -c constraints.txt -e '.[all,dev]'
	$(PIP) check
	touch $(STAMP)

demo: install
	$(VENV)/bin/edgeres demo

# The suite in parallel: one pytest-xdist worker per core (at most 4), a test module's tests on one worker,
# the slowest modules sent first (tests/conftest.py); TEST_WORKERS=0 runs it in this one process.
TEST_WORKERS ?= logical
test: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) --maxprocesses 4 --dist loadscope --no-loadscope-reorder; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

clean:
	rm -rf $(VENV) build *.egg-info demo-out
