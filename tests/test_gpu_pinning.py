"""GPUs on a node: each job is pinned to devices of the model allocation chose that no other
job on the node holds."""

from __future__ import annotations

from hmnode.executor import pick_gpus
from hmnode.hardware import GpuInfo


def gpu(index: int, name: str) -> GpuInfo:
    return GpuInfo(index, name, f"GPU-{index}", 80 << 30, 0, "9.0", None)


GPUS = (gpu(2, "H100"), gpu(0, "A100"), gpu(1, "H100"), gpu(3, "H100"))


def test_gpus_are_pinned_by_model_and_never_shared() -> None:
    assert pick_gpus(GPUS, "H100", 2, set()) == ("GPU-1", "GPU-2")
    assert pick_gpus(GPUS, "H100", 2, {"GPU-1"}) == ("GPU-2", "GPU-3")
    assert pick_gpus(GPUS, "H100", 2, {"GPU-1", "GPU-3"}) is None
    assert pick_gpus(GPUS, "A100", 1, set()) == ("GPU-0",)
    assert pick_gpus(GPUS, None, 0, set()) == ()

