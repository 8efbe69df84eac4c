# cusetpm: `make run` starts the device on the embedded libtpms TPM, `make test` runs the suite.
# Both install what is missing first (Debian packages as root, a virtualenv in .venv).

PYTHON      ?= python3
VENV        := .venv
PY          := $(VENV)/bin/python
STATE_DIR   ?= $(CURDIR)/state
RUN_ARGS    ?=
PYTEST_ARGS ?=
BENCH_ARGS  ?=

# Debian 12 packages: libtpms (embedded TPM), swtpm + tpm2-tools (test peers),
# libtss2 (tpm2-pytss builds against it), libfuse3 (the native shim), a compiler.
APT_PACKAGES := libtpms0 libtpms-dev swtpm swtpm-tools tpm2-tools libtss2-dev \
                libfuse3-dev fuse3 gcc pkg-config python3-dev python3-venv
# The real programs tests/clients runs through the node (systemd-creds comes with systemd).
CLIENT_APT_PACKAGES := tpm2-openssl clevis clevis-tpm2 libtpm2-pkcs11-1 libtpm2-pkcs11-tools \
                       opensc jose
# The kernel's own TPM selftests (tests/frontends/test_kselftest.py) come from this package,
# fetched at test time and never committed: only tools/testing/selftests/tpm2 is kept.
KSELFTEST_PACKAGE := linux-source-6.1
KSELFTEST_DIR     ?= /var/cache/cusetpm/kselftest-tpm2
# The guest kernel for the CUSE tests (make test-vm); virtme-ng comes with the venv.
VM_APT_PACKAGES := qemu-system-x86 linux-image-amd64 busybox-static
# The peers `make bench` compares against: tpm2-abrmd on a session D-Bus.
BENCH_APT_PACKAGES := tpm2-abrmd libtss2-tcti-tabrmd0 dbus

.PHONY: all setup apt-deps client-deps kselftest-src vm-deps bench-deps venv run test test-vm \
        bench bench-quick conformance soak fuzz lint install install-udev clean

all: setup

setup: apt-deps venv

# $(call apt_install,PACKAGES): installs those dpkg does not already report as installed.
define apt_install
	@missing=$$(for p in $(1); do \
	    dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	    echo "installing Debian packages: $$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi
endef

apt-deps:
	$(call apt_install,$(APT_PACKAGES))

client-deps:
	$(call apt_install,$(CLIENT_APT_PACKAGES))

# Extracts the selftests' Python files from the package's source tarball (~12 s, once).
kselftest-src:
	@if [ ! -f $(KSELFTEST_DIR)/tpm2_tests.py ]; then \
	    set -e; tmp=$$(mktemp -d); cd $$tmp; \
	    echo "fetching the kernel's TPM selftests from $(KSELFTEST_PACKAGE)"; \
	    apt-get download $(KSELFTEST_PACKAGE) 2>/dev/null || \
	        { apt-get update -qq && apt-get download $(KSELFTEST_PACKAGE); }; \
	    dpkg-deb --fsys-tarfile $(KSELFTEST_PACKAGE)_*.deb \
	        | tar -xO --wildcards './usr/src/$(KSELFTEST_PACKAGE).tar.xz' \
	        | tar -xJ --wildcards '*/tools/testing/selftests/tpm2/*.py'; \
	    mkdir -p $(KSELFTEST_DIR); \
	    cp $(KSELFTEST_PACKAGE)/tools/testing/selftests/tpm2/*.py $(KSELFTEST_DIR)/; \
	    cd /; rm -rf $$tmp; \
	fi

vm-deps: venv
	$(call apt_install,$(VM_APT_PACKAGES))

bench-deps: vm-deps
	$(call apt_install,$(BENCH_APT_PACKAGES))

venv: $(VENV)/.installed

$(VENV)/.installed: setup.py setup.cfg pyproject.toml native/build_shim.py native/shim.c \
                    native/shim.h native/callbacks.h | apt-deps
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,dev,bench,vm]'
	touch $@

# serve picks the node itself: the CUSE device /dev/tpmrm0 where the kernel has CUSE, else a
# FUSE mount at /run/cusetpm; it prints the node and how to talk to it.
run: setup
	$(PY) -m cusetpm serve --backend libtpms --state-dir $(STATE_DIR) $(RUN_ARGS)

# The CUSE tests run in a guest kernel (tests/test_vm_guest.py), so the suite needs vm-deps.
test: setup client-deps kselftest-src vm-deps
	CUSETPM_REQUIRE_ALL=1 CUSETPM_KSELFTEST_DIR=$(KSELFTEST_DIR) $(PY) -m pytest $(PYTEST_ARGS)

# The CUSE tests alone, in Debian's kernel under qemu: one boot (~20 s) runs tests/vm/guest.
# VM_PYTEST_ARGS picks another guest selection, e.g. VM_PYTEST_ARGS='tests/vm/guest -k tpmrm'.
test-vm: client-deps kselftest-src vm-deps
	$(PY) -m tests.vm.harness $(VM_PYTEST_ARGS)

bench: setup bench-deps
	$(PY) -m bench $(BENCH_ARGS)

bench-quick: setup bench-deps
	$(PY) -m bench --quick $(BENCH_ARGS)

# Scenario x {kernel /dev/tpmrm0, cusetpm CUSE, cusetpm FUSE, tpm2-abrmd}: the guest rows take
# ~20 minutes under TCG (the kernel needs ~22,000 commands to reach its context gap), so
# `make bench` runs only the host rows and this target writes bench/results/conformance.md.
conformance: setup bench-deps
	CUSETPM_CONFORMANCE_GUEST=1 $(PY) -m bench --only conformance

# Long runs, not part of `make test`: 30 minutes of clients opening and closing the FUSE node
# (daemon RSS each minute, bench/results/soak.md), and a million hostile commands through it
# in each residency mode (bench/results/fuzz.md). SOAK_ARGS / FUZZ_ARGS pass options
# (--minutes, --commands per mode, --residency, ...).
SOAK_ARGS ?=
FUZZ_ARGS ?=
soak: setup bench-deps
	$(PY) -m bench.soak $(SOAK_ARGS)

fuzz: setup
	$(PY) -m bench.fuzz $(FUZZ_ARGS)

lint: setup
	$(PY) -m ruff check cusetpm tests bench native
	$(PY) -m mypy

# The udev rule gives cusetpm's CUSE node group tss, mode 0660 (tpm2-tss's convention).
install-udev:
	install -D -m 0644 udev/70-cusetpm.rules /etc/udev/rules.d/70-cusetpm.rules
	-udevadm control --reload

# A systemd unit running this checkout's venv (Type=notify); enable it yourself.
install: setup install-udev
	install -D -m 0644 udev/cusetpm.service /etc/systemd/system/cusetpm.service
	sed -i 's#@BINDIR@#$(abspath $(VENV))/bin#' /etc/systemd/system/cusetpm.service
	-systemctl daemon-reload
	@# the sample multi-node config; an existing one is the operator's and stays
	test -e /etc/cusetpm/cusetpm.toml || install -D -m 0644 udev/cusetpm.toml /etc/cusetpm/cusetpm.toml
	@echo "enable it with: systemctl enable --now cusetpm"

clean:
	rm -rf build *.egg-info cusetpm/_native*.so cusetpm/_native.c
