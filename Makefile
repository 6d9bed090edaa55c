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
	iproute2 util-linux gcc libc6-dev make python3-venv charliecloud-runtime mpich libmpich-dev \
	busybox-static squashfs-tools qemu-system-x86 qemu-utils cpio debootstrap e2fsprogs kmod \
	openmpi-bin libopenmpi-dev extlinux syslinux-common nftables iputils-ping \
	docker-registry skopeo umoci squashfuse apache2-utils zstd fuse3 \
	slurmdbd slurmrestd slurm-wlm-jwt-plugin mariadb-server mariadb-client lua5.1 lua5.4

TRIXIE_ARGS ?=
.PHONY: all guest trixie-node test-trixie test-trixie-vm print-apt-packages deps venv shim shim-other-slurm sandbox-up sandbox-down demo test unit cluster bench churn \
	docs docs-gen clean gpu-host-kit

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

print-apt-packages:
	@echo $(APT_PACKAGES)

venv: $(SB)
$(SB): pyproject.toml | deps
	$(PYTHON_SYS) -m venv $(VENV)
	# compat: a plain path in a .pth file.  The default editable finder
	# costs every Python start (each prolog and epilog) ~12 ms of imports.
	$(VENV)/bin/pip install -q --disable-pip-version-check -e '.[test]' \
		--config-settings editable_mode=compat
	@touch $@

shim: spank/charlie.so
spank/charlie.so: spank/charlie.c spank/charlie_options.h spank/charlie.map | deps
	$(MAKE) -C spank

# The shim must build against both Slurm releases we support (22.05 in
# Debian 12, 24.11 in Debian 13).  This fetches the other release's
# libslurm-dev with apt (same mirror as the machine's own sources, private
# lists under $(CACHE)) and builds against its headers.
OTHER_SUITE := $(shell . /etc/os-release 2>/dev/null; [ "$$VERSION_CODENAME" = trixie ] && echo bookworm || echo trixie)
OTHER_APT := $(CACHE)/apt-$(OTHER_SUITE)
OTHER_INC := $(CACHE)/slurm-$(OTHER_SUITE)/usr/include
APT_OPTS = -o Dir::Etc::sourcelist=$(abspath $(OTHER_APT))/sources.list -o Dir::Etc::sourceparts=- \
	-o Dir::State::Lists=$(abspath $(OTHER_APT))/lists -o Dir::Cache=$(abspath $(OTHER_APT))/cache \
	-o Debug::NoLocking=1 -q
$(OTHER_INC)/slurm/spank.h:
	@mkdir -p $(OTHER_APT)/lists/partial $(OTHER_APT)/cache/archives/partial
	@mirror=$$(tests/debian-mirror.sh) && \
	echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $$mirror $(OTHER_SUITE) main" > $(OTHER_APT)/sources.list
	apt-get $(APT_OPTS) update >/dev/null
	cd $(OTHER_APT) && rm -f libslurm-dev_*.deb && apt-get $(APT_OPTS) download libslurm-dev 2>&1 | grep -v unsandboxed || true
	dpkg-deb -x $(OTHER_APT)/libslurm-dev_*.deb $(CACHE)/slurm-$(OTHER_SUITE)

shim-other-slurm: $(OTHER_INC)/slurm/spank.h
	$(MAKE) -C spank OUT=charlie-$(OTHER_SUITE).so SLURM_INCLUDE=$(abspath $(OTHER_INC))
	@for h in /usr/include $(abspath $(OTHER_INC)); do \
		v=$$(sed -n 's/^#define SLURM_VERSION_NUMBER 0x\(..\)\(..\)\(..\)/\1 \2 \3/p' $$h/slurm/slurm_version.h); \
		echo "shim builds with -Werror against Slurm $$(printf '%d.%02d.%d' $$(for x in $$v; do echo 0x$$x; done)) headers ($$h)"; done

# The test guest (kernel, initrd, root disk), cached under $(CACHE)/vm
VMC := $(CACHE)/vm
guest: $(VMC)/guest.qcow2 $(VMC)/initrd.img $(VMC)/vmlinux $(VMC)/guest-boot.qcow2 $(VMC)/debian.sqfs
$(VMC)/guest.qcow2 $(VMC)/initrd.img $(VMC)/vmlinux $(VMC)/guest-boot.qcow2 $(VMC)/debian.sqfs &: tests/vm/build_guest.sh slurm_charlie/guest/initrd-init \
		slurm_charlie/vmbuild.py | venv
	sh tests/vm/build_guest.sh $(VMC) $(abspath $(SB))

# The Debian 13 node of the cgroup v2 lane (Slurm 24.11), cached under
# $(CACHE)/trixie; make test-trixie boots it and runs tests/trixie inside
TRIXIE := $(CACHE)/trixie
# build.sh itself decides: it rebuilds when its NODE_VERSION or the package
# list changed, and returns at once otherwise
trixie-node: | venv
	sh tests/trixie/build.sh $(TRIXIE) $(abspath $(SB))
test-trixie: trixie-node
	$(PYTHON_SYS) tests/trixie/run.py $(TRIXIE) $(TRIXIE_ARGS)
# one VM job inside the lane node: tcg inside tcg, too slow for make test
test-trixie-vm: trixie-node
	CHARLIE_TRIXIE_TIMEOUT=3600 $(PYTHON_SYS) tests/trixie/run.py $(TRIXIE) tests/trixie/nested

# the sandbox's registry gets two stock images (busybox, debian-mpi), built
# once into an OCI layout under $(CACHE)/images (tests/helpers/registry.py)
SEED := PYTHONPATH=tests $(VENV)/bin/python -m helpers.registry $(CACHE)/images $(VMC)/debian.sqfs

sandbox-up: all guest
	$(SB) sandbox up --nodes 3 --guest-dir $(VMC)
	$(SEED)

sandbox-down:
	@if [ -x $(SB) ]; then $(SB) sandbox down; fi

demo: sandbox-up
	@bash docs/examples/demo.sh

# The full suite on the sandbox; the sandbox is stopped afterwards whatever
# the result (CI must stop what it started).
# the Debian 13 lane first (it has the machine to itself), then this host's
test: all shim-other-slurm
	@# the test guest and the Debian 13 node side by side: each is mostly
	@# downloads and disk work, a few minutes of CI's time when both are new
	$(MAKE) --no-print-directory -j2 --output-sync=target guest trixie-node
	@lane=0; rm -f $(CACHE)/lane-summary; \
	CHARLIE_TRIXIE_SUMMARY=$(CACHE)/lane-summary $(PYTHON_SYS) tests/trixie/run.py $(TRIXIE) $(TRIXIE_ARGS) || lane=$$?; \
	rc=0; $(SB) sandbox up --nodes 3 --guest-dir $(VMC) && $(SEED) || rc=$$?; \
	if [ $$rc -eq 0 ]; then $(VENV)/bin/python -m pytest -ra --durations=25 $(PYTEST_ARGS) tests/unit tests/cluster tests/adversarial tests/vm || rc=$$?; fi; \
	$(SB) sandbox down || true; \
	if [ $$lane -ne 0 ]; then echo "make test: the Debian 13 lane failed (its log is above):"; \
		cat $(CACHE)/lane-summary 2>/dev/null; fi; \
	if [ $$rc -ne 0 ]; then exit $$rc; fi; exit $$lane

unit: venv
	$(VENV)/bin/python -m pytest -ra $(PYTEST_ARGS) tests/unit

# 200 jobs of every type with faults injected; prints what was left behind
churn: sandbox-up
	PYTHONPATH=tests $(VENV)/bin/python -m helpers.churn --jobs 200

bench: sandbox-up
	PYTHONPATH=tests $(VENV)/bin/python tests/bench/run.py
	PYTHONPATH=tests $(VENV)/bin/python tests/bench/containers.py
	PYTHONPATH=tests $(VENV)/bin/python tests/bench/vm.py
	PYTHONPATH=tests $(VENV)/bin/python tests/bench/scale.py
	PYTHONPATH=tests $(VENV)/bin/python tests/bench/vmnet.py
	PYTHONPATH=tests $(VENV)/bin/python tests/bench/vmsrun.py
	PYTHONPATH=tests $(VENV)/bin/python tests/bench/life.py

# the real-GPU-host check (tests/gpu_host_check): a directory to copy onto a
# GPU host and run `python3 check.py` there as an ordinary user
gpu-host-kit: deps
	$(PYTHON_SYS) tests/gpu_host_check/build.py $(CACHE)/gpu-host-kit

docs-gen: venv
	$(SB) gen options-rst > docs/options.rst
	$(SB) gen config-example > docs/charlie.toml.example
	$(SB) gen config-rst > docs/config.rst
	$(SB) gen root-ops-rst > docs/root-operations.rst
	$(SB) gen header > spank/charlie_options.h

docs: venv
	$(VENV)/bin/pip install -q --disable-pip-version-check sphinx
	$(VENV)/bin/sphinx-build -E -W -q -b html docs docs/_build/html

clean: sandbox-down
	$(MAKE) -C spank clean
	rm -rf $(VENV) $(CACHE) docs/_build
