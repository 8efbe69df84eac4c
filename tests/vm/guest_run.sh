#!/bin/sh
# Guest side of `make test-vm`: runs inside the virtme-ng guest as root.
#
# usage: guest_run.sh PROJECT_ROOT RWDIR PYTHON [pytest args...]
#
# Loads cuse (the reason this guest exists) and fails loudly if /dev/cuse does
# not appear, then runs the given pytest selection with PYTHON (the host venv's
# interpreter, seen read-only over 9p).  Everything it keeps goes to RWDIR, the
# only directory shared read-write with the host: pytest.log, junit.xml.
set -u

if [ $# -lt 3 ]; then
    echo "usage: $0 PROJECT_ROOT RWDIR PYTHON [pytest args...]" >&2
    exit 64
fi
project=$1
rwdir=$2
python=$3
shift 3

# The guest's PATH comes from virtme's init; make the venv's tools and the
# system's sbin (modprobe) findable regardless.
venv_bin=$(dirname "$python")
export PATH="$venv_bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# The project tree is read-only in the guest: no bytecode, no pytest cache.
export PYTHONDONTWRITEBYTECODE=1
# tests/vm/conftest.py collects tests/vm/guest only when this is set.
export CUSETPM_VM_GUEST=1
export CUSETPM_VM_RWDIR="$rwdir"

# Uptime stamps show where a slow run spends its time (boot vs. pytest).
uptime_s() { cut -d' ' -f1 /proc/uptime; }
echo "[guest] kernel $(uname -r), $(nproc) cpus, up $(uptime_s) s"
if ! modprobe cuse; then
    echo "[guest] FATAL: modprobe cuse failed" >&2
    exit 90
fi
if [ ! -c /dev/cuse ]; then
    echo "[guest] FATAL: /dev/cuse missing after modprobe cuse" >&2
    exit 91
fi
echo "[guest] /dev/cuse present, up $(uptime_s) s"

cd "$project" || exit 92
# Write the log to the shared dir (it survives a timeout), then show it on the
# console, which the harness captures; plain sh has no pipefail, hence no tee.
# basetemp goes to the guest's /tmp overlay: it is writable and thrown away.
# No hypothesis plugin: no guest test uses it, and importing it costs seconds here.
# -v and --durations: the log shows what ran and where the guest's minutes went.
"$python" -m pytest -p no:cacheprovider -p no:hypothesispytest -v --durations=12 \
    --basetemp=/tmp/cusetpm-vm-pytest \
    --junitxml="$rwdir/junit.xml" \
    "$@" >"$rwdir/pytest.log" 2>&1
rc=$?
cat "$rwdir/pytest.log"
echo "[guest] pytest exit code $rc, up $(uptime_s) s"
exit $rc
