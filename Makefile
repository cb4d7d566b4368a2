# Two entry points (see README): `make demo` and `make test`.
# Both create .venv from the pinned stack if it is missing or out of date, then run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.stfusion-installed
FLAGFILE ?= configs/synthetic_motion.flags
PYTEST_ARGS ?=
# Two pytest workers (pytest-xdist), whole files per worker so module fixtures (one trained
# tiny run shared by several tests) are built once: much of the suite is single-threaded
# (subprocess start-up, graph tracing), so two workers fill 2 cores.  TEST_WORKERS=0: serial.
TEST_WORKERS ?= 2
XDIST := $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

export TF_CPP_MIN_LOG_LEVEL ?= 2
# seqeval (a Model Garden dependency) ships only an sdist whose legacy build breaks
# with current setuptools_scm; building it through PEP 517 works.
export PIP_USE_PEP517 = 1
export PIP_DISABLE_PIP_VERSION_CHECK = 1

.PHONY: env demo test test-fast bench clean-env

env: $(STAMP)

$(STAMP): setup.cfg constraints.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt pip setuptools wheel
	$(PY) -m pip install -q -c constraints.txt -e '.[test,video]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m stfusion_tf.main --flagfile=$(FLAGFILE)

test: $(STAMP)
	$(PY) -m pytest $(XDIST) $(PYTEST_ARGS)

# Skips the files tests.bzl lists as SLOW (end-to-end, distributed, export, entry point).
test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow" $(XDIST) $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/train_step.py

clean-env:
	rm -rf $(VENV)
