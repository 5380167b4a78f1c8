# Fresh machine: only python3.11 and pip are needed; everything else is installed into .venv.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
WORKDIR ?= workdirs/digits
CONFIG ?= configs/digits.py

.PHONY: install pretrain test clean

$(VENV)/.installed: setup.cfg pyproject.toml requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c requirements.lock -e '.[plot]'
	touch $@

# The tests also need pytest and PyTorch (the DINO import is checked against a PyTorch model).
$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install -q -c requirements.lock -e '.[test,plot,torch]'
	touch $@

install: $(VENV)/.installed

pretrain: install
	$(PY) -m kldino.main --config=$(CONFIG) --workdir=$(WORKDIR)

# Two test processes (pytest-xdist), each file's tests in one of them: the end-to-end tests wait
# on compiles and subprocesses, so two share a 2-core machine well; every process reuses the
# others' compilations (tests/conftest.py).
test: $(VENV)/.installed-test
	$(PY) -m pytest -q -n 2 --dist loadfile tests

clean:
	rm -rf $(VENV) workdirs
