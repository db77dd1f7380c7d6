# Two commands do all set-up on a fresh machine (see README):
#   make fit    # the main job on embedded data (ARGS="model=... strategy=..." to change it)
#   make test   # the test suite (the full one: what CI runs)
#   make check  # the fast tier, before every commit: unit and numerical tests, no end-to-end runs
# Both create .venv on first use. Without a torch already installed, the CPU wheel
# torch==2.13.0 is installed first (on a GPU machine, install your CUDA torch before).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
ARGS   ?= model=cnf strategy=reversible
PYTEST_ARGS ?=

.PHONY: fit test check test-all bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

fit: $(STAMP)
	$(PY) -m nde_zoo fit $(ARGS)

test: $(STAMP)
	bash tests/run_tests.sh $(PY) $(PYTEST_ARGS)

check: $(STAMP)
	NDE_ZOO_TEST_TIER=check bash tests/run_tests.sh $(PY) $(PYTEST_ARGS)

# the full suite and the minutes-long runs marked `manual`
test-all: $(STAMP)
	bash tests/run_tests.sh $(PY) $(PYTEST_ARGS)
	$(PY) -m pytest -m manual $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m nde_zoo bench $(NAME)

clean:
	rm -rf $(VENV) outputs multirun bench_out .pytest_cache
