"""`cusetpm serve`: the daemon that serves the resource manager as a device node.

Order of things, and why:
1. decide the node (CUSE /dev/NAME, or DIR/tpmrm0 on a FUSE mount) and refuse early
   when the name is taken, before anything touches the TPM;
2. open the backend and start the RM (it reads the TPM's limits);
3. create the node (opens /dev/cuse or mounts: needs root) and wait until the kernel
   has initialised it;
4. drop to --user, then say "serving ..." on stdout and READY=1 to systemd;
5. on SIGTERM/SIGINT: stop taking requests, let the RM finish the command in flight
   and flush every space, close the backend (libtpms saves its state), remove the node.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import grp
import logging
import os
import pwd
import signal
import socket
import stat
import subprocess
import sys
import threading
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING, Any

from cusetpm.frontends.spec import NodeSpec
from cusetpm.policy import NodePolicy

# The RM, the backends and the native shim load only when serving: `cusetpm --help`
# (which builds this module's arguments) stays light.
if TYPE_CHECKING:
    from cusetpm.backends import Backend
    from cusetpm.config import DaemonConfig
    from cusetpm.frontends.control import ControlServer
    from cusetpm.frontends.files import TpmFileOps
    from cusetpm.frontends.native import NodeSession
    from cusetpm.rm import ResourceManager, RMConfig
    from cusetpm.rm.quotas import NodeLimits

log = logging.getLogger(__name__)

DEFAULT_NAME = "tpmrm0"
DEFAULT_FUSE_MOUNT = "/run/cusetpm"


class ServeError(Exception):
    """A reason not to start, worded for the operator."""


@dataclass
class Plan:
    spec: NodeSpec
    policy: NodePolicy | None = None  # None: everything allowed (--policy full)
    node: str = ""  # the node's key in a --config file (its name or mount)
    limits: NodeLimits | None = None  # the node's quotas ([node.limits]; rm/quotas.py)
    made_mountpoint: bool = False  # we created the FUSE mount directory: remove it after
    chmod_cuse: bool = False  # --mode/--user/--group given: apply them to the CUSE node
    run_as: tuple[int, int] | None = None  # (uid, gid) to drop to


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The serve options beyond --backend/--state-dir/--log-level (cli.py has those)."""
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--name",
        help="serve the CUSE device /dev/NAME. Default: /dev/tpmrm0 when the kernel has CUSE "
        "(/dev/cuse, or `modprobe cuse` works), else a FUSE mount at "
        f"{DEFAULT_FUSE_MOUNT} (as --fuse-mount {DEFAULT_FUSE_MOUNT}). An explicit --name "
        "never falls back.",
    )
    where.add_argument(
        "--fuse-mount",
        metavar="DIR",
        help="serve DIR/tpmrm0 on a FUSE mount instead of a CUSE device (DIR is created if "
        "missing and unmounted on exit); clients use -T device:DIR/tpmrm0",
    )
    parser.add_argument(
        "--mode",
        help="node permissions, octal (default 0600). udev/70-cusetpm.rules, when "
        "installed, gives CUSE tpmrm* nodes 0660 group tss; with --mode/--user/--group the "
        "daemon sets the node itself once it appears (udev may still apply a rule after)",
    )
    parser.add_argument(
        "--user",
        help="after opening the node and the backend, run as USER; the node is owned by USER",
    )
    parser.add_argument("--group", help="the node's group (default: root, or USER's group)")
    parser.add_argument("--max-objects", type=int, help="transient objects per space")
    parser.add_argument("--max-sessions", type=int, help="sessions per space")
    parser.add_argument("--max-spaces", type=int, help="open descriptors (spaces) in total")
    parser.add_argument(
        "--schedule", choices=("fair", "fifo"), default="fair",
        help="fair: quick TPM commands before slow ones, aging, a fair share per uid "
        "(default); fifo: arrival order",
    )
    parser.add_argument(
        "--aging", type=float, default=2.0, metavar="FACTOR",
        help="fair schedule: no queued command waits more than FACTOR times its FIFO wait "
        "(default 2)",
    )
    parser.add_argument(
        "--residency", choices=("resident", "eager"), default="eager",
        help="resident: contexts stay in the TPM between commands until room is needed; "
        "eager: nothing stays loaded between commands (default, for now)",
    )
    parser.add_argument(
        "--keep-free-objects", type=int, metavar="N",
        help="object slots left free between commands for other users of the TPM "
        "(default: 1 on a device backend, else 0)",
    )
    parser.add_argument(
        "--keep-free-sessions", type=int, metavar="N",
        help="session slots left free between commands (default: 1 on a device backend, else 0)",
    )
    parser.add_argument(
        "--fuse-debug", action="store_true", help="let libfuse print every request (stderr)"
    )
    parser.add_argument(
        "--policy", choices=("full", "user", "attest"), default="full",
        help="what the node may do (README: Nodes, profiles and quotas); default full",
    )
    parser.add_argument(
        "--control", metavar="PATH",
        help="serve `cusetpm status` on this unix socket (0600; e.g. /run/cusetpm/control); "
        "a --config file may name it as control = PATH",
    )
    parser.add_argument(
        "--config", metavar="FILE",
        help="serve the nodes of a TOML file (udev/cusetpm.toml), all on one RM and TPM; "
        "instead of --name/--fuse-mount/--mode/--user/--group/--policy. SIGHUP re-reads it",
    )


# -- choosing the node ------------------------------------------------------------------


def cuse_available() -> bool:
    """The kernel has CUSE: /dev/cuse exists, or loading the module makes it appear."""
    if os.path.exists("/dev/cuse"):
        return True
    try:
        subprocess.run(["modprobe", "cuse"], capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return False
    return os.path.exists("/dev/cuse")


def _ids(args: argparse.Namespace) -> tuple[int, int, tuple[int, int] | None]:
    """(node uid, node gid, run-as) from --user/--group."""
    uid, gid, run_as = 0, 0, None
    if args.user:
        try:
            pw = pwd.getpwnam(args.user)
        except KeyError:
            raise ServeError(f"no such user: {args.user}") from None
        uid, gid = pw.pw_uid, pw.pw_gid
        run_as = (pw.pw_uid, pw.pw_gid)
    if args.group:
        try:
            gid = grp.getgrnam(args.group).gr_gid
        except KeyError:
            raise ServeError(f"no such group: {args.group}") from None
    return uid, gid, run_as


def _mode(text: str | None) -> int:
    if text is None:
        return 0o600
    try:
        mode = int(text, 8)
    except ValueError:
        raise ServeError(f"--mode {text!r} is not an octal mode") from None
    if not 0 <= mode <= 0o777:
        raise ServeError(f"--mode {text!r}: permission bits only (0 to 0777)")
    return mode


def plan_node(args: argparse.Namespace) -> Plan:
    uid, gid, run_as = _ids(args)
    mode = _mode(args.mode)
    fuse_mount = args.fuse_mount
    name = args.name
    if name is None and fuse_mount is None:
        if cuse_available():
            name = DEFAULT_NAME
        else:
            log.info("this kernel has no CUSE: serving a FUSE mount at %s", DEFAULT_FUSE_MOUNT)
            fuse_mount = DEFAULT_FUSE_MOUNT
    if name is not None:
        _check_cuse_name(name)
        spec = NodeSpec(cuse_name=name, mode=mode, uid=uid, gid=gid)
        explicit = any(v is not None for v in (args.mode, args.user, args.group))
        return Plan(spec, chmod_cuse=explicit, run_as=run_as)
    made = _prepare_mountpoint(fuse_mount)
    spec = NodeSpec(fuse_mount=os.path.abspath(fuse_mount), mode=mode, uid=uid, gid=gid)
    return Plan(spec, made_mountpoint=made, run_as=run_as)


def _check_cuse_name(name: str) -> None:
    if not name or "/" in name or name in (".", ".."):
        raise ServeError(f"--name {name!r}: a device name, like tpmrm0")
    if os.path.exists(f"/dev/{name}"):
        free = next(
            (f"tpmrm{i}" for i in range(1, 64) if not os.path.exists(f"/dev/tpmrm{i}")), None
        )
        hint = f", e.g. --name {free}" if free else ""
        raise ServeError(
            f"/dev/{name} already exists (a kernel TPM, or another cusetpm serving it): "
            f"choose another device name with --name{hint}, or use --fuse-mount DIR"
        )
    if not cuse_available():
        raise ServeError(
            "this kernel has no CUSE (/dev/cuse is missing and `modprobe cuse` failed): "
            "serve a FUSE mount instead with --fuse-mount DIR"
        )


def _prepare_mountpoint(path: str) -> bool:
    """Check DIR is free for our mount; create it if missing. True if we created it."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        os.makedirs(path, mode=0o755)
        return True
    except OSError as e:
        if e.errno == errno.ENOTCONN:
            raise ServeError(
                f"{path} is a dead FUSE mount (its daemon died): `umount -l {path}` first"
            ) from None
        raise ServeError(f"{path}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise ServeError(f"--fuse-mount {path}: not a directory")
    if os.path.ismount(path):
        raise ServeError(
            f"{path} is already a mount point (another cusetpm serving it?): "
            "choose another --fuse-mount directory"
        )
    return False


# -- running ----------------------------------------------------------------------------


def sd_notify(state: str) -> bool:
    """Tell systemd (Type=notify) about our state; False when not run by systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as e:
        log.warning("sd_notify %s failed: %s", state, e)
        return False
    return True


def _rm_config(args: argparse.Namespace) -> RMConfig:
    from cusetpm.rm import RMConfig

    given: dict[str, Any] = {
        key: getattr(args, key)
        for key in ("max_objects", "max_sessions", "max_spaces")
        if getattr(args, key, None) is not None
    }
    for key, value in given.items():
        if value < 1:
            raise ServeError(f"--{key.replace('_', '-')} must be at least 1")
    aging = getattr(args, "aging", 2.0)
    if not aging >= 1.0:
        raise ServeError("--aging must be at least 1 (1: never later than in arrival order)")
    for key in ("keep_free_objects", "keep_free_sessions"):
        value = getattr(args, key, None)
        if value is not None:
            if value < 0:
                raise ServeError(f"--{key.replace('_', '-')} must be at least 0")
            given[key] = value
    return RMConfig(**given, schedule=getattr(args, "schedule", "fair"), aging=aging,
                    residency=getattr(args, "residency", "eager"))


def _apply_cuse_mode(spec: NodeSpec) -> None:
    """--mode/--user/--group on the CUSE node (devtmpfs made it root:root 0600)."""
    path = spec.path
    os.chown(path, spec.uid, spec.gid)
    os.chmod(path, spec.mode)


def _drop_privileges(run_as: tuple[int, int], backend: Backend) -> None:
    uid, gid = run_as
    state_dir = getattr(backend, "state_dir", None)
    if state_dir is not None:
        # libtpms writes its NVRAM and state files there for the rest of our life.
        for root, dirs, files in os.walk(state_dir):
            for name in [root, *(os.path.join(root, n) for n in dirs + files)]:
                os.chown(name, uid, gid)
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    log.info("running as uid %d gid %d", uid, gid)


class _StopSignals:
    """SIGTERM/SIGINT set an event that the main thread waits on; SIGHUP asks for a reload."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.received: int | None = None
        self.reload = threading.Event()
        self._previous = {
            sig: signal.signal(sig, self._handle)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        }

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGHUP:
            self.reload.set()
            self.event.set()  # wake the main loop; it clears the event again
            return
        self.received = signum
        self.event.set()

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def serve(args: argparse.Namespace) -> int:
    stop = _StopSignals()
    try:
        return _serve(args, stop)
    except ServeError as e:
        print(f"cusetpm: {e}", file=sys.stderr)
        return 1
    finally:
        stop.restore()


def plan_nodes(args: argparse.Namespace) -> tuple[list[Plan], RMConfig]:
    """One plan per node: from --config FILE, or the one node of the command line."""
    config = _rm_config(args)
    if not getattr(args, "config", None):
        plan = plan_node(args)
        policy = getattr(args, "policy", "full")
        if policy != "full":
            plan.policy = NodePolicy.from_profile(policy)
        plan.node = plan.spec.cuse_name or plan.spec.path
        return [plan], config
    daemon = _load_config(args.config)
    plans: list[Plan] = []
    try:
        for node in daemon.nodes:
            one = argparse.Namespace(name=node.name, fuse_mount=node.fuse_mount,
                                     mode=node.mode, user=node.user, group=node.group)
            plan = plan_node(one)
            plan.run_as = None  # a node's user owns it; the daemon stays root for all nodes
            plan.chmod_cuse = plan.chmod_cuse or plan.spec.cuse_name is not None
            plan.policy, plan.node, plan.limits = node.policy, node.key, node.limits
            plans.append(plan)
    except ServeError as e:
        for plan in plans:
            _remove_mountpoint(plan)
        raise ServeError(f"{args.config}: {e}") from None
    limits: dict[str, Any] = dict(daemon.limits)
    return plans, dataclasses.replace(config, **limits)


def _load_config(path: str) -> DaemonConfig:
    from cusetpm.config import ConfigError, load

    try:
        return load(path)
    except ConfigError as e:
        raise ServeError(str(e)) from None


def _serve(args: argparse.Namespace, stop: _StopSignals) -> int:
    from cusetpm.backends import BackendError, open_backend, resolve_auto

    plans, config = plan_nodes(args)
    spec = resolve_auto(args.backend)
    if spec != args.backend:
        log.info("--backend %s: %s", args.backend, spec)
    try:
        backend = open_backend(spec, args.state_dir)
    except (BackendError, OSError, ValueError) as e:
        for plan in plans:
            _remove_mountpoint(plan)
        raise ServeError(f"cannot open backend {args.backend}: {e}") from e
    try:
        status = _serve_backend(args, plans, config, backend, stop)
    finally:
        for plan in plans:
            _remove_mountpoint(plan)
        status_close = _close_backend(backend)
    return status or status_close


def _close_backend(backend: Backend) -> int:
    """Close the TPM (libtpms saves its state here); 1 if that failed."""
    try:
        backend.close()
    except Exception as e:
        log.error("closing %s failed, its state may not be saved: %s", backend.name, e)
        return 1
    return 0


@dataclass
class _Served:
    plan: Plan
    ops: TpmFileOps
    session: NodeSession


def _serve_backend(
    args: argparse.Namespace, plans: list[Plan], config: RMConfig, backend: Backend,
    stop: _StopSignals,
) -> int:
    from cusetpm.backends import BackendError
    from cusetpm.frontends.files import TpmFileOps
    from cusetpm.frontends.native import NativeReplies, NodeSession
    from cusetpm.rm import ResourceManager, RMError

    rm = ResourceManager(backend, config)
    try:
        rm.start()
    except (BackendError, RMError, OSError) as e:
        raise ServeError(f"the TPM behind {backend.name} did not answer: {e}") from e
    served: list[_Served] = []
    control = _start_control(args, rm)
    try:
        for plan in plans:
            rm.set_node_limits(plan.node, plan.limits)
            ops = TpmFileOps(rm, NativeReplies(), node=plan.node, policy=plan.policy)
            session = NodeSession(ops, plan.spec, debug=args.fuse_debug)
            try:
                session.start()
            except OSError as e:
                raise ServeError(f"cannot serve {plan.spec.path}: {e.strerror or e}") from e
            served.append(_Served(plan, ops, session))
        for one in served:
            if one.plan.chmod_cuse:
                _apply_cuse_mode(one.plan.spec)
        if plans[0].run_as is not None:
            _drop_privileges(plans[0].run_as, backend)
        for one in served:
            # the profile is named when it is not `full` (the line scripts already parse)
            kind = one.plan.spec.kind
            if one.plan.policy is not None and one.plan.policy.profile != "full":
                kind += f", {one.plan.policy.profile}"
            print(f"cusetpm: serving {one.plan.spec.path} ({kind}) on {backend.name}",
                  flush=True)
        sd_notify("READY=1")
        log.info("talk to it: tpm2_getrandom -T device:%s 8 --hex", plans[0].spec.path)
        status = 0
        while not stop.event.wait(1.0) or stop.reload.is_set():
            if stop.reload.is_set():
                stop.reload.clear()
                stop.event.clear()
                _reload(args, served, rm)
                continue
            stopped = next((one for one in served if not one.session.running), None)
            if stopped is not None:
                log.error("the kernel closed %s; stopping", stopped.plan.spec.path)
                status = 1  # nobody asked us to stop: a supervisor should know
                break
        if stop.received is not None:
            log.info("%s: stopping", signal.Signals(stop.received).name)
        sd_notify("STOPPING=1")
    except BaseException:
        if not served:
            rm.stop()
        raise
    finally:
        if control is not None:
            control.stop()
        if served:
            _shutdown(served, rm)
    return status


def _start_control(args: argparse.Namespace, rm: ResourceManager) -> ControlServer | None:
    from cusetpm.frontends.control import ControlServer

    path = getattr(args, "control", None)
    if path is None and getattr(args, "config", None):
        path = _load_config(args.config).control
    if path is None:
        return None
    server = ControlServer(rm, path)
    try:
        server.start()
    except OSError as e:
        rm.stop()
        raise ServeError(f"--control {path}: {e.strerror or e}") from e
    return server


def _reload(args: argparse.Namespace, served: list[_Served], rm: ResourceManager) -> None:
    """SIGHUP: new policies and [node.limits] for the nodes served. Nodes added or removed
    need a restart; the daemon's [limits] are read at start and also need one. An invalid
    file changes nothing."""
    if not getattr(args, "config", None):
        log.info("SIGHUP: no --config file to re-read")
        return
    try:
        daemon = _load_config(args.config)
    except ServeError as e:
        log.error("SIGHUP: %s; the running config is unchanged", e)
        return
    by_key = {node.key: node for node in daemon.nodes}
    for one in served:
        node = by_key.pop(one.plan.node, None)
        if node is None:
            log.warning("SIGHUP: node %s is no longer in %s: removing a node needs a restart",
                        one.plan.node, args.config)
            continue
        if node.policy != one.ops.policy:
            old = one.ops.policy.profile if one.ops.policy else "full"
            one.ops.policy = node.policy
            count = rm.set_node_policy(one.plan.node, node.policy)
            log.info("SIGHUP: node %s: policy changed (profile %s -> %s), %d open spaces follow",
                     one.plan.node, old, node.policy.profile, count)
        if node.limits != one.plan.limits:
            log.info("SIGHUP: node %s: limits changed (%s -> %s); what is held stays",
                     one.plan.node, one.plan.limits, node.limits)
            one.plan.limits = node.limits
            rm.set_node_limits(one.plan.node, node.limits)
    for key in by_key:
        log.warning("SIGHUP: node %s is new in %s: adding a node needs a restart",
                    key, args.config)
    if daemon.limits:
        log.info("SIGHUP: [limits] are read at start: a restart applies them")


def _shutdown(served: list[_Served], rm: ResourceManager) -> None:
    """Stop taking requests, finish and flush in the RM, answer leftovers, remove the nodes."""
    for one in served:
        one.session.stop()
    try:
        rm.stop()  # the command in flight completes (its reply still goes out), spaces flush
    except Exception:
        log.exception("stopping the resource manager failed")
    for one in served:
        one.ops.abandon()
        one.session.destroy()
        log.info("%s removed", one.session.spec.path)


def _remove_mountpoint(plan: Plan) -> None:
    if plan.made_mountpoint and plan.spec.fuse_mount is not None:
        try:
            os.rmdir(plan.spec.fuse_mount)
        except OSError as e:
            log.debug("leaving %s: %s", plan.spec.fuse_mount, e)
