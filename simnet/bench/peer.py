"""The server side of `hmnode simnet bench transport`, run as a child process."""

import sys

from hmnode.simnet.bench.transport import PROFILES, serve

if len(sys.argv) != 3 or sys.argv[1] not in ("hmnode", "aioquic") or sys.argv[2] not in PROFILES:
    sys.exit(f"usage: python -m hmnode.simnet.bench.peer hmnode|aioquic {'|'.join(PROFILES)}")
serve(sys.argv[1], sys.argv[2])
