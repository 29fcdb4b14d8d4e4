"""Test helper: append one NodeEvent per transaction, printing each key once it is committed.

Run as `python store_writer.py STORE_DIR MAX_ITERATIONS`; the crash test SIGKILLs it midway.
"""

from __future__ import annotations

import sys
from pathlib import Path

from hmnode import schema
from hmnode.store import Store


def event_for(i: int) -> schema.NodeEvent:
    """The record written in iteration `i`; the test rebuilds it to check what was stored."""
    return schema.NodeEvent(at=float(i) + 0.5, kind="tick", detail=f"event {i} \u2713")


def main() -> None:
    path, iterations = Path(sys.argv[1]), int(sys.argv[2])
    store = Store.open(path)
    for i in range(iterations):
        key = store.write(lambda tx, i=i: tx.append(schema.EVENTS, event_for(i)))
        # Printed only after write() returned, i.e. after the commit was made durable.
        sys.stdout.write(f"{key} {i}\n")
        sys.stdout.flush()
    store.close()


if __name__ == "__main__":
    main()
