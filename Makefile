# xendmop's entry points.  Each target installs what it needs by itself:
# system packages via tools/sysdeps.sh (Debian/Ubuntu), Python ones into .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: demo test lint typecheck check integration bench fuzz clean sysdeps

# The editable install is setuptools' "compat" mode: a .pth naming this directory, which mypy and
# other type checkers follow (the default mode, an import hook, hides py.typed from them) and which
# sees a new module without a reinstall (the "strict" mode's link tree does not).  setuptools calls
# the mode transitional at every install; that notice alone is silenced (if the mode goes, the
# install fails, loudly).
$(VENV)/.installed: setup.cfg pyproject.toml Makefile
	@./tools/sysdeps.sh
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	PYTHONWARNINGS='ignore:Compat editable installs' \
		$(PY) -m pip install -q -e '.[dev]' --config-settings editable_mode=compat
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
	$(VENV)/bin/ruff check xendmop tests integration fuzz examples bench tools
	$(VENV)/bin/mypy --strict xendmop

check: lint test

## integration: boot real Xen under QEMU and run integration/ in dom0
##   RELEASE=trixie for Xen 4.20 / Linux 6.12 (default bookworm: Xen 4.17 / Linux 6.1)
##   ARCH=arm64 for Xen/Arm on QEMU's virt board (default amd64); only ARCH given on the make
##   command line counts (an ARCH in the environment is often a kernel build's), else $XENDMOP_LAB_ARCH
RELEASE ?= $(or $(XENDMOP_LAB_RELEASE),bookworm)
LAB_ARCH := $(if $(filter command line,$(origin ARCH)),$(ARCH),$(or $(XENDMOP_LAB_ARCH),amd64))
integration: $(VENV)/.installed
	$(PY) integration/lab/run.py --release $(RELEASE) --arch $(LAB_ARCH) -- python3 integration/run_tests.py -p no:cacheprovider -q integration

bench: $(VENV)/.installed
	$(PY) -m bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info
