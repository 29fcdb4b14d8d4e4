"""Multi-node testing and benchmarks: real processes, namespaces, and a deterministic simulator."""
