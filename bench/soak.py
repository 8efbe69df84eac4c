"""`make soak`: mixed clients opening and closing the FUSE node for a long time; daemon RSS
sampled every minute. Writes bench/results/soak.{json,md,png}.

Clients (one process each, seeded): open the node, do a few commands (GetRandom, a primary
key, a hash sequence object, an HMAC and a policy session, a client ContextSave of an
object), then close, or leave with everything held open, or are SIGKILLed by the driver
while they hold objects and sessions. Memory per space and per saved context must stay
flat: after every minute the daemon's VmRSS is recorded beside the commands done so far;
at the end, with every client gone, a fresh descriptor must still be answered.

Run: python -m bench.soak [--minutes 30] [--clients 6] [--residency resident|eager]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import random
import signal
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.node import _daemon
from bench.scenarios import wire

RESULTS = Path(__file__).resolve().parent / "results"


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _xact(fd: int, command: bytes) -> bytes:
    os.write(fd, command)
    return os.read(fd, 4096)


# Commands done, one counter per client process (its `row`), written by it alone: the driver
# SIGKILLs clients at random, and one killed while holding a shared lock (a Value's or an
# Event's) would leave it held for ever, stalling every other client and the driver.
MAX_CLIENTS = 8192


def commands_done(counts: Any) -> int:
    return sum(counts)


def client(node: str, seed: int, counts: Any, row: int, stop: Any) -> None:
    """One client process: loops of open, work, close until `stop` (a raw flag) is set."""
    rng = random.Random(seed)
    done = 0
    while not stop.value:
        fd = os.open(node, os.O_RDWR)
        try:
            for _ in range(rng.randint(1, 12)):
                kind = rng.randrange(6)
                if kind == 0:
                    _xact(fd, wire.get_random(16))
                elif kind == 1:
                    h = wire.handle(_xact(fd, wire.create_primary_ecc()))
                    if rng.random() < 0.5:
                        _xact(fd, wire.read_public(h))
                        done += 1
                elif kind == 2:
                    _xact(fd, wire.hash_sequence_start())
                elif kind == 3:
                    _xact(fd, wire.start_auth_session(rng.choice([wire.SE_HMAC, wire.SE_POLICY])))
                elif kind == 4:
                    r = _xact(fd, wire.hash_sequence_start())
                    if wire.rc(r) == 0:
                        _xact(fd, wire.context_save(wire.handle(r)))
                        done += 1
                else:
                    _xact(fd, wire.get_capability(wire.CAP_HANDLES, wire.HT_TRANSIENT, 64))
                done += 1
        except OSError:
            pass  # a limit reached (EBUSY/ENOMEM-style refusals are fine for a soak)
        finally:
            os.close(fd)
            counts[row] = done


def run(minutes: float, clients: int, seed: int, residency: str = "resident") -> dict[str, Any]:
    ctx = multiprocessing.get_context("fork")
    samples: list[dict[str, Any]] = []
    killed = 0
    extra = ("--residency", residency)
    with tempfile.TemporaryDirectory(prefix="cusetpm-soak-") as tmp, _daemon(
        Path(tmp), extra
    ) as (node, pid):
        counts = ctx.RawArray("q", MAX_CLIENTS)
        stop = ctx.RawValue("b", 0)
        rng = random.Random(seed)
        procs = [ctx.Process(target=client, args=(node, seed + i, counts, i, stop))
                 for i in range(clients)]
        for p in procs:
            p.start()
        start = time.monotonic()
        samples.append({"minute": 0, "rss_kib": rss_kib(pid), "commands": 0, "killed": 0})
        next_sample = start + 60
        end = start + minutes * 60
        serial = clients
        while time.monotonic() < end:
            time.sleep(min(1.0, max(0.0, next_sample - time.monotonic())))
            # Every few seconds one client is SIGKILLed mid-work and replaced.
            if rng.random() < 0.2:
                i = rng.randrange(len(procs))
                os.kill(procs[i].pid, signal.SIGKILL)
                procs[i].join()
                killed += 1
                serial += 1
                procs[i] = ctx.Process(target=client, args=(
                    node, seed + serial, counts, serial % MAX_CLIENTS, stop))
                procs[i].start()
            if time.monotonic() >= next_sample:
                minute = round((time.monotonic() - start) / 60)
                samples.append({"minute": minute, "rss_kib": rss_kib(pid),
                                "commands": commands_done(counts), "killed": killed})
                print(f"soak: minute {minute}: rss {samples[-1]['rss_kib']} KiB, "
                      f"{samples[-1]['commands']} commands, {killed} clients killed", flush=True)
                next_sample += 60
        stop.value = 1
        stuck = 0
        for p in procs:
            p.join(30)
            if p.is_alive():  # a client that cannot finish its loop is a finding
                stuck += 1
                p.kill()
                p.join()
        samples.append({"minute": round((time.monotonic() - start) / 60, 1),
                        "rss_kib": rss_kib(pid), "commands": commands_done(counts),
                        "killed": killed})
        # After every client left: one more descriptor must see an empty TPM of its own and
        # the daemon must still answer.
        fd = os.open(node, os.O_RDWR)
        try:
            alive = wire.rc(_xact(fd, wire.get_random(8))) == 0
        finally:
            os.close(fd)
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores, "
                   f"kernel {platform.release()}",
        "minutes": minutes,
        "residency": residency,
        "clients": clients,
        "clients_stuck": stuck,
        "seed": seed,
        "clients_killed": killed,
        "samples": samples,
        "daemon_answered_after": alive,
    }


def report(result: dict[str, Any]) -> str:
    samples = result["samples"]
    warm = samples[1] if len(samples) > 2 else samples[0]
    last = samples[-1]
    growth = last["rss_kib"] - warm["rss_kib"]
    lines = [
        f"# make soak: {result['minutes']} min, {result['clients']} client processes",
        "",
        f"{result['date']}, {result['machine']}. Seed {result['seed']}; the daemon with "
        f"`--residency {result.get('residency', 'eager')}`.",
        "",
        *([f"Note: {result['note']}", ""] if result.get("note") else []),
        f"- commands: {last['commands']}; clients SIGKILLed mid-work: {result['clients_killed']}",
        f"- clients that could not finish when told to stop: {result.get('clients_stuck', 0)}",
        f"- daemon RSS after minute 1: {warm['rss_kib']} KiB; at the end: {last['rss_kib']} KiB;"
        f" growth {growth:+d} KiB ({growth / max(warm['rss_kib'], 1):+.1%})",
        f"- daemon answered a fresh descriptor after the run: {result['daemon_answered_after']}",
        "",
        "![RSS over the soak](soak.png)",
        "",
        "| minute | RSS KiB | commands | clients killed |",
        "|---:|---:|---:|---:|",
    ]
    lines += [f"| {s['minute']} | {s['rss_kib']} | {s['commands']} | {s['killed']} |"
              for s in samples]
    return "\n".join(lines) + "\n"


def chart(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = result["samples"]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot([s["minute"] for s in samples], [s["rss_kib"] / 1024 for s in samples], marker="o")
    ax.set_xlabel("minute")
    ax.set_ylabel("daemon RSS (MiB)")
    ax.set_ylim(bottom=0)
    ax2 = ax.twinx()
    ax2.plot([s["minute"] for s in samples], [s["commands"] for s in samples], color="gray",
             linestyle="--")
    ax2.set_ylabel("commands so far")
    ax.set_title(f"cusetpm soak: {result['clients']} clients opening/closing ({result['date']})")
    fig.tight_layout()
    fig.savefig(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0x50AC)
    parser.add_argument("--residency", choices=("resident", "eager"), default="resident")
    parser.add_argument("--note", default="", help="a line for the report (why it is short...)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    result = run(args.minutes, args.clients, args.seed, args.residency)
    result["note"] = args.note
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "soak.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "soak.md").write_text(report(result))
    chart(result, args.out / "soak.png")
    print(report(result))
    return 0 if result["daemon_answered_after"] and not result["clients_stuck"] else 1


if __name__ == "__main__":
    sys.exit(main())
