# cusetpm: `make run` starts the device on the embedded libtpms TPM, `make test` runs the suite.
# Both install what is missing first (Debian packages as root, a virtualenv in .venv).

PYTHON      ?= python3
VENV        := .venv
PY          := $(VENV)/bin/python
STATE_DIR   ?= $(CURDIR)/state
RUN_ARGS    ?=
PYTEST_ARGS ?=

# Debian 12 packages: libtpms (embedded TPM), swtpm + tpm2-tools (test peers),
# libtss2 (tpm2-pytss builds against it), libfuse3 (the native shim), a compiler.
APT_PACKAGES := libtpms0 libtpms-dev swtpm swtpm-tools tpm2-tools libtss2-dev \
                libfuse3-dev fuse3 gcc pkg-config python3-dev python3-venv
# The guest kernel for the CUSE tests (make test-vm).
VM_APT_PACKAGES := qemu-system-x86 linux-image-amd64 busybox-static

.PHONY: all setup apt-deps vm-deps venv run test test-host test-vm bench lint clean

all: setup

setup: apt-deps venv

# Installs only what dpkg does not already report as installed.
apt-deps:
	@missing=$$(for p in $(APT_PACKAGES); do \
	    dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	    echo "installing Debian packages: $$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

# Debian packages above, plus virtme-ng (boots the guest) in the venv, pinned to 1.42:
# the version known to work with the flags in tests/vm/harness.py.
vm-deps: venv
	@missing=$$(for p in $(VM_APT_PACKAGES); do \
	    dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	    echo "installing Debian packages: $$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

# The CUSE tests, in Debian's kernel under qemu: one boot (~20 s) runs tests/vm/guest.
# VM_PYTEST_ARGS picks another guest selection, e.g. VM_PYTEST_ARGS='tests/vm/guest -k tpmrm'.
test-vm: vm-deps
	$(PY) -m tests.vm.harness $(VM_PYTEST_ARGS)

venv: $(VENV)/.installed

$(VENV)/.installed: setup.py setup.cfg pyproject.toml native/build_shim.py native/shim.c native/shim.h | apt-deps
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,dev,bench,vm]'
	touch $@

run: setup
	$(PY) -m cusetpm serve --backend libtpms --state-dir $(STATE_DIR) $(RUN_ARGS)

# The CUSE tests run in a guest kernel (tests/test_vm_guest.py), so the suite needs vm-deps.
test: setup vm-deps
	$(PY) -m pytest $(PYTEST_ARGS)

bench: setup
	$(PY) -m bench $(BENCH_ARGS)

lint: setup
	$(PY) -m ruff check cusetpm tests bench native
	$(PY) -m mypy

clean:
	rm -rf build *.egg-info cusetpm/_native*.so cusetpm/_native.c
