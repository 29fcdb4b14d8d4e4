"""hmnode: the peer-to-peer node agent of a compute-sharing mesh."""

__version__ = "0.1.0"
