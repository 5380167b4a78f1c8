# Fresh machine: only python3.11 and pip are needed; everything else is installed into .venv.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
WORKDIR ?= workdirs/digits
CONFIG ?= configs/digits.py

.PHONY: install pretrain test test-unit lint clean

$(VENV)/.installed: setup.cfg pyproject.toml requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c requirements.lock -e '.[plot]'
	touch $@

# The tests also need pytest and PyTorch (the DINO import is checked against a PyTorch model).
$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install -q -c requirements.lock -e '.[test,plot,torch]'
	touch $@

# The formatter and the linter, pinned (setup.cfg's lint extra; settings in pyproject.toml).
$(VENV)/.installed-lint: $(VENV)/.installed
	$(PY) -m pip install -q -c requirements.lock -e '.[lint]'
	touch $@

install: $(VENV)/.installed

pretrain: install
	$(PY) -m kldino.main --config=$(CONFIG) --workdir=$(WORKDIR)

# The formatter's check (it prints what it would change) and the linter, on every Python file.
LINTED := kldino configs tests launch benchmarks sweeps
lint: $(VENV)/.installed-lint
	$(VENV)/bin/yapf --diff --recursive --parallel $(LINTED)
	$(VENV)/bin/ruff check $(LINTED)

# Two test processes (pytest-xdist), each file's tests in one of them: the end-to-end tests wait
# on compiles and subprocesses, so two share a 2-core machine well; every process reuses the
# others' compilations (tests/conftest.py).
test: $(VENV)/.installed-test
	$(PY) -m pytest -q -n 2 --dist loadfile tests

# The unit tests only: everything but tests/e2e/ (which trains or starts processes).
test-unit: $(VENV)/.installed-test
	$(PY) -m pytest -q -n 2 --dist loadfile tests --ignore=tests/e2e

clean:
	rm -rf $(VENV) workdirs
