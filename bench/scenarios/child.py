"""Child processes for the scenarios that need a second client process.

``python -m bench.scenarios.child MODE TARGET_JSON``:

* ``hold``: open a space, start 3 policy sessions and 2 sequence objects, print
  ``ready``, then sleep until killed (cleanup after SIGKILL).
* ``save``: open a space, start a policy session, ContextSave it, print the blob
  as hex and exit without flushing (session continuation across processes).
"""

from __future__ import annotations

import sys
import time

from bench.scenarios import wire
from bench.scenarios.conn import Target


def main(mode: str, target_json: str) -> int:
    target = Target.from_json(target_json)
    conn = target.open()
    if mode == "hold":
        for _ in range(3):
            conn.transact(wire.start_auth_session(wire.SE_POLICY))
        for _ in range(2):
            conn.transact(wire.hash_sequence_start())
        print("ready", flush=True)
        while True:
            time.sleep(60)
    if mode == "save":
        session = wire.handle(conn.transact(wire.start_auth_session(wire.SE_POLICY)))
        saved = conn.transact(wire.context_save(session))
        if wire.rc(saved) != 0:
            print(f"error ContextSave rc {wire.rc(saved):#x}", flush=True)
            return 1
        print(f"{session:08x} {wire.parameters(saved).hex()}", flush=True)
        conn.close()
        return 0
    print(f"unknown mode {mode}", file=sys.stderr)
    return 64


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
