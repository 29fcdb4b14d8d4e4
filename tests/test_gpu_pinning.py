"""GPUs on a node: its offer names them by model (only when it runs process jobs, the only
kind that can use one), and each job is pinned to devices of the model allocation chose that
no other job on the node holds."""

from __future__ import annotations

from dataclasses import replace

from hmnode.executor import pick_gpus
from hmnode.hardware import GpuInfo, GpuReport, collect_inventory
from hmnode.workloads import default_offer


def gpu(index: int, name: str) -> GpuInfo:
    return GpuInfo(index, name, f"GPU-{index}", 80 << 30, 0, "9.0", None)


GPUS = (gpu(2, "H100"), gpu(0, "A100"), gpu(1, "H100"), gpu(3, "H100"))


def test_gpus_are_pinned_by_model_and_never_shared() -> None:
    assert pick_gpus(GPUS, "H100", 2, set()) == ("GPU-1", "GPU-2")
    assert pick_gpus(GPUS, "H100", 2, {"GPU-1"}) == ("GPU-2", "GPU-3")
    assert pick_gpus(GPUS, "H100", 2, {"GPU-1", "GPU-3"}) is None
    assert pick_gpus(GPUS, "A100", 1, set()) == ("GPU-0",)
    assert pick_gpus(GPUS, None, 0, set()) == ()


def test_the_offer_names_gpus_by_model_only_for_process_jobs(tmp_path) -> None:
    inventory = collect_inventory(tmp_path, 0.0)
    inventory = replace(inventory, gpu=GpuReport(GPUS, "550.0", None))
    assert "gpus" not in default_offer(inventory, 10, ("wasm",))
    offer = default_offer(inventory, 10, ("wasm", "process"))
    assert offer["gpus"] == [["A100", 1], ["H100", 3]]
