# slurm-charlie developer entry points.  `make demo` and `make test` work on a
# fresh Debian 12/13 machine as root: they install what is missing, build the
# shim, bring up the sandbox cluster and run things on it.
SHELL := /bin/bash
PYTHON_SYS ?= /usr/bin/python3
VENV ?= .venv
CACHE ?= .cache
SB := $(VENV)/bin/slurm-charlie
PYTEST_ARGS ?=
# Debian packages the sandbox, the shim and the tests need
APT_PACKAGES := slurmctld slurmd slurm-client munge libslurm-dev libpmi2-0-dev \
	iproute2 util-linux gcc make python3-venv

.PHONY: all deps venv shim sandbox-up sandbox-down demo test unit cluster bench \
	docs docs-gen clean

all: shim venv

deps: $(CACHE)/deps.stamp
$(CACHE)/deps.stamp: Makefile
	@mkdir -p $(CACHE)
	@missing=$$(for p in $(APT_PACKAGES); do \
		dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing: $$missing"; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	fi
	@touch $@

venv: $(SB)
$(SB): pyproject.toml | deps
	$(PYTHON_SYS) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -e '.[test]'
	@touch $@

shim: spank/charlie.so
spank/charlie.so: spank/charlie.c spank/charlie_options.h spank/charlie.map | deps
	$(MAKE) -C spank

sandbox-up: all
	$(SB) sandbox up --nodes 3

sandbox-down:
	@if [ -x $(SB) ]; then $(SB) sandbox down; fi

demo: sandbox-up
	@bash docs/examples/demo.sh

# The full suite on the sandbox; the sandbox is stopped afterwards whatever
# the result (CI must stop what it started).
test: all
	@rc=0; $(SB) sandbox up --nodes 3 || rc=$$?; \
	if [ $$rc -eq 0 ]; then $(VENV)/bin/python -m pytest -ra $(PYTEST_ARGS) tests/unit tests/cluster || rc=$$?; fi; \
	$(SB) sandbox down || true; exit $$rc

unit: venv
	$(VENV)/bin/python -m pytest -ra $(PYTEST_ARGS) tests/unit

bench: sandbox-up
	$(VENV)/bin/python tests/bench/run.py

docs-gen: venv
	$(SB) gen options-rst > docs/options.rst
	$(SB) gen config-example > docs/charlie.toml.example
	$(SB) gen config-rst > docs/config.rst
	$(SB) gen header > spank/charlie_options.h

docs: venv
	$(VENV)/bin/pip install -q --disable-pip-version-check sphinx
	$(VENV)/bin/sphinx-build -W -q -b html docs docs/_build/html

clean: sandbox-down
	$(MAKE) -C spank clean
	rm -rf $(VENV) $(CACHE) docs/_build
