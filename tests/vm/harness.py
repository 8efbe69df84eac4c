"""Boot a guest kernel with virtme-ng and run a command in it.

The build machines' kernel has no CUSE, so the CUSE end-to-end tests run inside
Debian's kernel (``linux-image-amd64``, which ships ``cuse.ko`` and
``tpm_vtpm_proxy.ko``) under qemu.  virtme-ng boots that kernel with the host's
``/`` as a read-only 9p root, so the guest sees this project tree, its venv and
the host's swtpm/tpm2-tools unchanged.

Facts this module is built around (see DESIGN.md, "Testing"):

* ``--disable-kvm``: nested KVM on the build machines hangs; TCG boots in ~15-20 s.
* ``--force-9p``: virtiofs needs a host daemon we do not have.
* The kernel command line is capped, so the command goes into a script file in
  the shared read-write directory and the guest only runs ``sh <that file>``.
* qemu reopens stdout/stderr with O_TRUNC: give vng pipes (never a log file) and
  stdin from /dev/null.
* Only ``rwdir`` is writable and shared; everything else the guest writes lands
  in throw-away overlays (or fails, e.g. under ``/work`` and ``/root``).
* The command's exit code comes back; a guest panic gives 255.

Entry points: :func:`run_in_guest` (any shell script) and
:func:`run_guest_suite` (the pytest suite in ``tests/vm/guest``).  Running this
module (``python -m tests.vm.harness [pytest args]``) is what ``make test-vm``
does.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[2]
GUEST_RUNNER = Path(__file__).resolve().parent / "guest_run.sh"
GUEST_SUITE = "tests/vm/guest"

# Kernel modules the guest needs; a kernel without them cannot run the suite.
REQUIRED_MODULES = ("cuse", "tpm_vtpm_proxy")

# Environment overrides, for a developer who wants another kernel or KVM.
ENV_KERNEL = "CUSETPM_VM_KERNEL"  # path to a vmlinuz with modules in /lib/modules/<ver>
ENV_KVM = "CUSETPM_VM_KVM"  # "1" to let qemu use KVM (hangs on the build machines)
ENV_VERBOSE = "CUSETPM_VM_VERBOSE"  # "1" to show the guest's kernel messages

DEFAULT_TIMEOUT = 900.0


class GuestUnavailable(RuntimeError):
    """The guest cannot be booted on this machine at all (missing kernel or tools)."""


@dataclass(frozen=True)
class GuestResult:
    """What came back from one boot."""

    returncode: int  # the script's exit code; 255 on a guest panic; -9 on our timeout
    output: str  # the guest console (script stdout/stderr) and vng's own messages
    duration: float = 0.0  # wall-clock seconds from launching vng to its exit
    timed_out: bool = False


@dataclass(frozen=True)
class GuestKernel:
    image: Path
    release: str


def _module_present(release: str, name: str) -> bool:
    moddir = Path("/lib/modules") / release / "kernel"
    return any(moddir.rglob(f"{name}.ko*"))


def _release_key(release: str) -> list[int | str]:
    # Order "6.1.0-10-amd64" after "6.1.0-9-amd64": compare numeric runs as numbers.
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", release)]


def find_kernel() -> GuestKernel:
    """The newest installed kernel that has the modules the guest needs.

    The host's own kernel is usually not one of them (it has no CUSE, and its
    image is not under /boot on the build machines), so this looks only at
    /boot/vmlinuz-* with a matching /lib/modules/<release>.
    """
    override = os.environ.get(ENV_KERNEL)
    if override:
        image = Path(override)
        release = image.name.removeprefix("vmlinuz-")
        if not image.is_file():
            raise GuestUnavailable(f"{ENV_KERNEL}={override}: no such file")
        return GuestKernel(image, release)

    candidates: list[GuestKernel] = []
    rejected: list[str] = []
    for image in Path("/boot").glob("vmlinuz-*"):
        release = image.name.removeprefix("vmlinuz-")
        if not (Path("/lib/modules") / release).is_dir():
            rejected.append(f"{image}: no /lib/modules/{release}")
            continue
        missing = [m for m in REQUIRED_MODULES if not _module_present(release, m)]
        if missing:
            rejected.append(f"{image}: lacks modules {', '.join(missing)}")
            continue
        candidates.append(GuestKernel(image, release))
    if not candidates:
        detail = "; ".join(rejected) or "no /boot/vmlinuz-* at all"
        raise GuestUnavailable(
            f"no guest kernel with {', '.join(REQUIRED_MODULES)} ({detail}); "
            "run `make vm-deps` (installs linux-image-amd64)"
        )
    return max(candidates, key=lambda k: _release_key(k.release))


def guest_python() -> Path:
    """The interpreter the guest should run: this venv's, never a pyenv shim.

    A venv's bin/python is a symlink to the real binary and keeps the venv's
    site-packages (resolving it would lose them).  A pyenv shim is a shell
    script that costs seconds under TCG, so resolve anything that is not a venv.
    """
    if sys.prefix != sys.base_prefix:
        venv_python = Path(sys.prefix) / "bin" / "python"
        if venv_python.exists():
            return venv_python
    return Path(os.path.realpath(sys.executable))


def _bin_dirs() -> list[str]:
    # vng runs `virtme-run` from PATH, which lives next to it in the venv.
    dirs = [str(Path(sys.prefix) / "bin"), str(Path(sys.executable).parent)]
    return dirs + os.environ.get("PATH", "").split(os.pathsep)


def find_tools() -> tuple[str, str]:
    """Paths of vng and qemu-system-x86_64, or GuestUnavailable saying how to get them."""
    search = os.pathsep.join(_bin_dirs())
    vng = shutil.which("vng", path=search)
    if vng is None:
        raise GuestUnavailable("vng (virtme-ng) not found; run `make vm-deps`")
    qemu = shutil.which("qemu-system-x86_64", path=search)
    if qemu is None:
        raise GuestUnavailable("qemu-system-x86_64 not found; run `make vm-deps`")
    return vng, qemu


def check_available() -> GuestKernel:
    """Raise GuestUnavailable unless a guest can be booted here; return its kernel."""
    find_tools()
    return find_kernel()


def vng_command(
    kernel: GuestKernel, script_path: Path, rwdir: Path, cpus: int = 2, memory: str = "2G"
) -> list[str]:
    vng, qemu = find_tools()
    cmd = [
        vng,
        "--run",
        str(kernel.image),
        "--qemu",
        qemu,
        "--force-9p",
        "--cpus",
        str(cpus),  # 2 vCPUs boot fastest on the 2-core build machines
        "--memory",
        memory,
        "--rwdir",
        str(rwdir),
        "--cwd",
        str(PROJECT_ROOT),
        "--user",
        "root",  # modprobe and /dev/cuse need root in the guest
        "--name",
        "cusetpm-vm",
        "--exec",
        # Only this short line travels on the kernel command line.
        f"sh {shlex.quote(str(script_path))}",
    ]
    if os.environ.get(ENV_KVM) != "1":
        cmd.append("--disable-kvm")
    if os.environ.get(ENV_VERBOSE) == "1":
        cmd.append("--verbose")
    return cmd


def run_in_guest(script: str, timeout: float, rwdir: Path) -> GuestResult:
    """Boot the guest kernel, run ``script`` with /bin/sh as root in it, return its result.

    ``rwdir`` is shared read-write with the guest at the same path; the script is
    written there, and the script should write its results there too.
    """
    kernel = check_available()
    rwdir = rwdir.resolve()
    rwdir.mkdir(parents=True, exist_ok=True)
    script_path = rwdir / "guest-command.sh"
    script_path.write_text(script)
    cmd = vng_command(kernel, script_path, rwdir)
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join(_bin_dirs())
    log.info("booting %s: %s", kernel.release, shlex.join(cmd))

    start = time.monotonic()
    # A session of its own, so a timeout can end vng together with its qemu child.
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=PROJECT_ROOT,
        start_new_session=True,
    )
    timed_out = False
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        log.error(
            "guest did not finish within %.0f s; killing vng/qemu (pid %d)", timeout, proc.pid
        )
        with contextlib.suppress(ProcessLookupError):  # it may have just exited
            os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
    duration = time.monotonic() - start
    output = out.decode(errors="replace")
    if timed_out:
        output += f"\n[harness] guest killed after {timeout:.0f} s timeout\n"
    elif proc.returncode == 255:
        # vng keeps kernel messages off the console unless --verbose.
        output += (
            "\n[harness] exit 255: the guest kernel panicked or qemu failed; "
            f"rerun with {ENV_VERBOSE}=1 to see kernel messages\n"
        )
    log.info("guest exited with %s after %.1f s", proc.returncode, duration)
    return GuestResult(proc.returncode, output, duration, timed_out)


def guest_suite_script(pytest_args: list[str], rwdir: Path) -> str:
    """The script that runs the guest-side runner with our venv's interpreter."""
    argv = [
        "/bin/sh",
        str(GUEST_RUNNER),
        str(PROJECT_ROOT),
        str(rwdir),
        str(guest_python()),
        *pytest_args,
    ]
    return (
        "#!/bin/sh\n# Written by tests/vm/harness.py; run by the guest.\n"
        + share_kselftests(rwdir)
        + "exec "
        + shlex.join(argv)
        + "\n"
    )


def share_kselftests(rwdir: Path) -> str:
    """The kernel's TPM selftests (tests/frontends/test_kselftest.py) live in a cache on the
    host that the guest's throw-away /var hides: copy them into the shared directory and
    point the guest at the copy. Returns the script line that does so ('' if none here)."""
    from tests.frontends.test_kselftest import KSELFTEST_DIR

    if not (KSELFTEST_DIR / "tpm2_tests.py").is_file():
        return ""  # the guest's test fails and says how to fetch them
    copy = rwdir / "kselftest-tpm2"
    copy.mkdir(exist_ok=True)
    for source in KSELFTEST_DIR.glob("*.py"):
        shutil.copy(source, copy / source.name)
    return f"export CUSETPM_KSELFTEST_DIR={shlex.quote(str(copy))}\n"


def run_guest_suite(
    pytest_args: list[str] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    rwdir: Path | None = None,
) -> GuestResult:
    """Run ``tests/vm/guest`` (or the given pytest selection) in one boot.

    The guest writes ``pytest.log`` and ``junit.xml`` into ``rwdir``.  If the
    console output lacks the pytest log (e.g. on a timeout), the log is appended.
    """
    if rwdir is None:
        rwdir = Path(tempfile.mkdtemp(prefix="cusetpm-vm-"))
    args = pytest_args if pytest_args else [GUEST_SUITE]
    rwdir = rwdir.resolve()
    rwdir.mkdir(parents=True, exist_ok=True)  # the kselftest copy goes there before boot
    result = run_in_guest(guest_suite_script(args, rwdir), timeout, rwdir)
    pytest_log = rwdir / "pytest.log"
    if result.timed_out and pytest_log.exists():
        partial = pytest_log.read_text(errors="replace")
        output = result.output + "\n[harness] pytest.log so far:\n" + partial
        return GuestResult(result.returncode, output, result.duration, result.timed_out)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.vm.harness",
        description="Run the guest-kernel (CUSE) test suite in one virtme-ng boot.",
    )
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT)
    parser.add_argument(
        "--rwdir", type=Path, help="shared results directory (default: a new temp dir)"
    )
    parser.add_argument(
        "pytest_args", nargs=argparse.REMAINDER, help=f"pytest selection (default: {GUEST_SUITE})"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = run_guest_suite(args.pytest_args, args.timeout, args.rwdir)
    except GuestUnavailable as exc:
        print(f"cannot boot the test guest: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(result.output)
    print(f"[harness] guest exit code {result.returncode}, {result.duration:.1f} s")
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
