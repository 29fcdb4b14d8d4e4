"""What a node offers from its contributor's config: amounts of the machine, GPUs by model
(only with the process runtime, the only one that can use them), prices moved by its load
down to a floor, pauses and allow-lists; and how the share monitor acts on a decision."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from hmnode.config import load_config
from hmnode.errors import ConfigError
from hmnode.hardware import GpuInfo, GpuReport, collect_inventory
from hmnode.identity import NodeKey
from hmnode.share_policy import ShareDecision
from hmnode.sharing import ShareMonitor, offer_for, prices

ME = NodeKey.generate().node_id
OTHER = NodeKey.generate().node_id


def gpu(index: int, name: str) -> GpuInfo:
    return GpuInfo(index, name, f"GPU-{index}", 80 << 30, 0, "9.0", None)


@pytest.fixture(scope="module")
def inventory(tmp_path_factory: pytest.TempPathFactory) -> object:
    inv = collect_inventory(tmp_path_factory.mktemp("inv"), 0.0)
    return replace(inv, gpu=GpuReport((gpu(0, "A100"), gpu(1, "H100"), gpu(2, "H100")),
                                      "550.0", None))


def config(tmp_path: Path, **env: str) -> object:
    return load_config(tmp_path / "none.toml", env={f"HMNODE_{k.upper()}": v
                                                    for k, v in env.items()})


def test_the_offer_follows_the_share_settings(tmp_path: Path, inventory: object) -> None:
    cores, memory = inventory.cpu.logical_cores, inventory.memory.total_bytes  # type: ignore
    offer = offer_for(config(tmp_path), inventory, 10, ("wasm",), ME)  # type: ignore
    assert offer["cores"] == cores and offer["memory_mib"] == memory // 2 >> 20
    assert "gpus" not in offer and "paused" not in offer and "allow" not in offer
    assert offer["price"] == {"core_hour": 10, "gib_hour": 1, "gpu_hour": 100, "start_fee": 1}
    offer = offer_for(config(tmp_path, share_cores="1", share_memory="256 MiB",
                             share_gpus="1,2", share_allow="owner",
                             price_gpu_models="H100=300"),
                      inventory, 10, ("wasm", "process"), ME, paused="on battery")  # type: ignore
    assert offer["cores"] == 1 and offer["memory_mib"] == 256
    assert offer["gpus"] == [["H100", 2]] and offer["price"]["gpu_hour"] == 300
    assert offer["paused"] == "on battery" and offer["allow"] == [ME.key]
    listed = offer_for(config(tmp_path, share_allow=f"{ME},{OTHER}"), inventory, 10,  # type: ignore
                       ("wasm",), ME)
    assert listed["allow"] == [ME.key, OTHER.key]


def test_dynamic_prices_follow_the_load_down_to_the_floor(tmp_path: Path) -> None:
    fixed = config(tmp_path, price_core_hour="100")
    assert prices(fixed, 0.0)["core_hour"] == prices(fixed, 1.0)["core_hour"] == 100  # type: ignore
    dynamic = config(tmp_path, price_core_hour="100", price_dynamic="0.5")
    assert [prices(dynamic, load)["core_hour"] for load in (0, 0.5, 1)] == [50, 100, 150]  # type: ignore
    floored = config(tmp_path, price_core_hour="100", price_dynamic="0.5", price_floor="0.8")
    assert prices(floored, 0.0)["core_hour"] == 80  # type: ignore


@pytest.mark.parametrize("setting,value,why", [
    ("share_cores", "150%", "expected '4' or '50%'"),
    ("share_memory", "lots", "expected '8 GiB'"),
    ("share_windows", "Mon-Fri 25:00-08:00", "a time of day"),
    ("share_allow", "nobody", "expected 'everyone', 'owner' or a list of node ids"),
    ("share_gpus", "some", "expected a whole number"),
    ("price_dynamic", "2", "expected a number from 0 to 1"),
])
def test_bad_share_settings_are_refused(tmp_path: Path, setting: str, value: str,
                                        why: str) -> None:
    with pytest.raises(ConfigError, match=why):
        config(tmp_path, **{setting: value})


class Executor:
    """The executor's side of sharing, recorded."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def suspend(self) -> None:
        self.calls.append("suspend")

    def resume(self) -> None:
        self.calls.append("resume")

    def give_back(self, reason: str) -> None:
        self.calls.append(f"give back: {reason}")

    def cores_in_use(self) -> int:
        return 0


def test_the_monitor_suspends_resumes_and_gives_back_after_the_grace(
        tmp_path: Path, inventory: object) -> None:
    executor, changes = Executor(), []
    monitor = ShareMonitor(config(tmp_path, share_grace_s="60"), tmp_path, ME,
                           lambda: inventory, executor, on_change=lambda: changes.append(1))
    assert monitor.offer(5, ("wasm",)) is None  # not measured yet
    monitor.apply(ShareDecision(True), 0.0)
    assert "paused" not in monitor.offer(5, ("wasm",)) and executor.calls == []
    battery = ShareDecision(False, ("on battery",), ("on battery",))
    monitor.apply(battery, 10.0)
    assert executor.calls == ["suspend"] and monitor.offer(5, ("wasm",))["paused"] == "on battery"
    # The figures in a reason move with each reading: said and offered again only when the
    # causes change.
    monitor.apply(ShareDecision(False, ("on battery, 41% left",), ("on battery",)), 30.0)
    monitor.apply(ShareDecision(True), 40.0)  # back within the grace: the jobs go on
    assert executor.calls == ["suspend", "resume"]
    monitor.apply(battery, 50.0)
    monitor.apply(battery, 109.0)
    assert executor.calls[-1] == "suspend"
    monitor.apply(battery, 110.0)  # paused for the whole grace: the jobs go back
    monitor.apply(battery, 200.0)  # once
    assert executor.calls[-1] == "give back: paused sharing: on battery"
    assert executor.calls.count("give back: paused sharing: on battery") == 1
    assert len(changes) == 3  # paused, resumed, paused: each said once
