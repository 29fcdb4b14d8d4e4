"""The server side of `hmnode simnet bench transport`, run as a child process."""

import sys

from hmnode.simnet.bench.transport import serve
from hmnode.transport.quic import QuicTuning

USAGE = "usage: python -m hmnode.simnet.bench.peer hmnode|aioquic MAX_DATAGRAM_SIZE FLOW_WINDOW CC"
if len(sys.argv) != 5 or sys.argv[1] not in ("hmnode", "aioquic"):
    sys.exit(USAGE)
serve(sys.argv[1], QuicTuning(max_datagram_size=int(sys.argv[2]), flow_window=int(sys.argv[3]),
                              congestion_control=sys.argv[4]))
