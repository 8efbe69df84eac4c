"""The `cusetpm` command."""

from __future__ import annotations

import argparse
import logging
import sys

from cusetpm import __version__
from cusetpm.serve import add_arguments as add_serve_arguments


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cusetpm",
        description="TPM 2.0 resource manager served as a character device "
        "(a drop-in /dev/tpmrm0).",
    )
    parser.add_argument("--version", action="version", version=f"cusetpm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = sub.add_parser(
        "serve",
        help="serve the device node",
        description="Serve a TPM resource manager node: a CUSE device (/dev/tpmrm0 by default) "
        "or, with --fuse-mount DIR, the file DIR/tpmrm0. Prints one 'serving' line when the "
        "node accepts commands; SIGTERM/SIGINT flush every space, save the TPM and remove "
        "the node.",
    )
    serve.add_argument(
        "--backend",
        default="libtpms",
        help="auto | libtpms | swtpm:tcp:HOST:PORT | swtpm:unix:PATH | device:/dev/tpmN "
        "(default: libtpms; auto: device:/dev/tpm0 where the kernel has a TPM, else libtpms)",
    )
    serve.add_argument("--state-dir", default="/var/lib/cusetpm", help="libtpms state directory")
    serve.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    add_serve_arguments(serve)
    status = sub.add_parser(
        "status", help="what a running daemon serves (its control socket)",
        description="Nodes and their open descriptors, the TPM, counters since start and "
        "per-command latencies, from the daemon's --control socket.",
    )
    status.add_argument("--control", default="/run/cusetpm/control", metavar="PATH",
                        help="the daemon's control socket (default /run/cusetpm/control)")
    status.add_argument("--json", action="store_true", help="the JSON document as read")
    status.set_defaults(log_level="WARNING")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.command == "serve":
        from cusetpm.serve import serve

        return serve(args)
    if args.command == "status":
        return _status(args)
    parser.error(f"unknown command {args.command}")
    return 2


def _status(args: argparse.Namespace) -> int:
    import json

    from cusetpm.frontends.control import format_text, read_status

    try:
        status = read_status(args.control)
    except (OSError, ValueError) as e:
        print(f"cusetpm status: {args.control}: {e}", file=sys.stderr)
        return 1
    sys.stdout.write(json.dumps(status, indent=2) + "\n" if args.json else format_text(status))
    return 0


if __name__ == "__main__":
    sys.exit(main())
