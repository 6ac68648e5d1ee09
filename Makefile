# xendmop's entry points.  Each target installs what it needs by itself:
# system packages via tools/sysdeps.sh (Debian/Ubuntu), Python ones into .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: demo test lint typecheck check integration bench fuzz clean sysdeps

$(VENV)/.installed: setup.cfg pyproject.toml
	@./tools/sysdeps.sh
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

sysdeps:
	@./tools/sysdeps.sh

## demo: the main job on the mock Xen (no Xen needed): a 16550A UART serving a simulated guest firmware
demo: $(VENV)/.installed
	$(PY) -m xendmop info
	$(PY) examples/uart16550.py

## test: the whole test suite (what .ci/run runs)
test: $(VENV)/.installed
	$(PY) -m pytest $(PYTEST_ARGS)

## lint: ruff and mypy --strict over the package
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check xendmop tests integration fuzz examples bench
	$(VENV)/bin/mypy --strict xendmop

check: lint test

## integration: boot real Xen under QEMU and run integration/ in dom0
integration: $(VENV)/.installed
	$(PY) integration/lab/run.py -- python3 -m pytest -p no:cacheprovider -q integration

bench: $(VENV)/.installed
	$(PY) -m bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info
