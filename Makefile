# Two commands do all set-up on a fresh machine (see README):
#   make fit    # the main job on embedded data (ARGS="model=... strategy=..." to change it)
#   make test   # the test suite
# Both create .venv on first use. Without a torch already installed, the CPU wheel
# torch==2.13.0 is installed first (on a GPU machine, install your CUDA torch before).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
ARGS   ?= model=cnf strategy=reversible strategy.solver=rk4 strategy.steps=4
PYTEST_ARGS ?=

.PHONY: fit test bench clean

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

bench: $(STAMP)
	$(PY) -m nde_zoo bench $(NAME)

clean:
	rm -rf $(VENV) outputs multirun bench_out .pytest_cache
