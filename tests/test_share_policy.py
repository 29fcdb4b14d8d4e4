"""The share rules: each one pauses sharing and lets it resume, driven by readings injected
at the psutil and NVML boundary (a fake psutil module and a fake NVML, read by the real
`ShareSensors`), plus one run on this machine's real readings."""

from __future__ import annotations

from collections import namedtuple
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from hmnode.share_policy import Readings, SharePolicy, ShareRules, TimeWindow
from hmnode.share_sensors import ShareSensors

Battery = namedtuple("Battery", "percent secsleft power_plugged")
Temp = namedtuple("Temp", "label current high critical")
CpuTimes = namedtuple("CpuTimes", "user nice system idle iowait")
ProcTimes = namedtuple("ProcTimes", "user system children_user children_system")
MONDAY_NOON = datetime(2026, 11, 23, 12, 0)


class FakePsutil:
    """The parts of psutil the sensors read, with values a test sets."""

    NoSuchProcess = AccessDenied = ProcessLookupError

    def __init__(self) -> None:
        self.plugged: bool | None = True
        self.cpu_c = 50.0
        self.busy = 0.0  # seconds every core has been busy, in all
        self.mine = 0.0  # of which the node's

    def sensors_battery(self) -> Any:
        return None if self.plugged is None else Battery(80, 3600, self.plugged)

    def sensors_temperatures(self) -> dict:
        return {"coretemp": [Temp("Package id 0", self.cpu_c, 100, 105)],
                "nvme": [Temp("Composite", 99.0, 80, 85)]}  # not the CPU: ignored

    def cpu_times(self) -> CpuTimes:
        return CpuTimes(self.busy, 0.0, 0.0, 1e6, 0.0)

    def cpu_count(self) -> int:
        return 2

    def Process(self) -> Any:  # noqa: N802 - psutil's name
        mine = self.mine
        return SimpleNamespace(cpu_times=lambda: ProcTimes(mine, 0.0, 0.0, 0.0),
                               children=lambda recursive: [])


class FakeNvml:
    """NVML with GPUs at the temperatures a test sets."""

    NVMLError = RuntimeError

    def __init__(self, temps: list[float]) -> None:
        self.temps = temps

    def nvmlInit(self) -> None:  # noqa: N802 - NVML's names
        pass

    def nvmlDeviceGetCount(self) -> int:  # noqa: N802
        return len(self.temps)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:  # noqa: N802
        return i

    def nvmlDeviceGetTemperature(self, handle: int, sensor: int) -> float:  # noqa: N802
        return self.temps[handle]


class Machine:
    """A fake machine read by the real sensors, and a policy over it."""

    def __init__(self, tmp_path: Path, rules: ShareRules) -> None:
        self.ps, self.nvml = FakePsutil(), FakeNvml([40.0])
        self.tty = tmp_path / "tty1"
        self.tty.touch()
        self.sensors = ShareSensors(tmp_path, psutil=self.ps, nvml=self.nvml,  # type: ignore
                                    input_globs=(str(tmp_path / "tty*"),))
        self.policy = SharePolicy(rules)
        self.clock = 1000.0

    def step(self, seconds: float = 5.0, when: datetime = MONDAY_NOON) -> tuple[bool, str]:
        self.clock += seconds
        decision = self.policy.decide(self.sensors.read(now=when, monotonic=self.clock))
        return decision.sharing, decision.reason or ""


def test_windows_parse_and_run_past_midnight() -> None:
    evenings = TimeWindow.parse("Mon-Fri 18:00-08:00")
    assert evenings.contains(datetime(2026, 11, 23, 19, 0))  # Monday evening
    assert evenings.contains(datetime(2026, 11, 28, 7, 59))  # Saturday morning, after Friday
    assert not evenings.contains(datetime(2026, 11, 28, 19, 0))  # Saturday evening
    assert not evenings.contains(datetime(2026, 11, 23, 7, 0))  # Monday morning, after Sunday
    assert not evenings.contains(MONDAY_NOON)
    weekend = TimeWindow.parse("Sat,Sun")
    assert weekend.contains(datetime(2026, 11, 29, 23, 59)) and not weekend.contains(MONDAY_NOON)
    assert TimeWindow.parse("Fri-Mon 09:00-17:00").contains(MONDAY_NOON)  # wraps the week
    assert TimeWindow.parse("22:00-24:00").contains(datetime(2026, 11, 25, 23, 30))
    for bad in ("Mon-Fri", "18:00", "Mon-Fry 18:00-08:00", "25:00-08:00", "9:00-9:00", ""):
        if bad == "Mon-Fri":
            continue  # days alone are a whole-day window
        with pytest.raises(ValueError, match="expected a window|days are|a time of day|different"):
            TimeWindow.parse(bad)


def test_a_time_window_pauses_and_resumes(tmp_path: Path) -> None:
    m = Machine(tmp_path, ShareRules(windows=(TimeWindow.parse("Mon-Fri 18:00-08:00"),)))
    assert m.step(when=MONDAY_NOON) == (False, "outside its time window (Mon-Fri 18:00-08:00)")
    assert m.step(when=datetime(2026, 11, 23, 18, 0)) == (True, "")


def test_battery_pauses_and_mains_resumes(tmp_path: Path) -> None:
    m = Machine(tmp_path, ShareRules())
    m.ps.plugged = False
    assert m.step() == (False, "on battery")
    m.ps.plugged = True
    assert m.step() == (True, "")
    m.ps.plugged = None  # a desktop: no battery at all
    assert m.step() == (True, "")
    m.ps.plugged = False
    assert m.policy.rules.pause_on_battery
    assert Machine(tmp_path, ShareRules(pause_on_battery=False)).step()[0] is True


def test_heat_pauses_until_it_cools_down(tmp_path: Path) -> None:
    m = Machine(tmp_path, ShareRules(max_cpu_temp_c=90, max_gpu_temp_c=80))
    m.ps.cpu_c = 95
    assert m.step() == (False, "too hot: the CPU is at 95 °C (limit 90 °C)")
    m.ps.cpu_c = 88  # under the limit, but not cooled by 5 degrees: still paused
    assert m.step() == (False, "too hot: the CPU is at 88 °C (limit 90 °C, cooling to 85 °C)")
    m.ps.cpu_c = 84
    assert m.step() == (True, "")
    m.nvml.temps = [40.0, 83.0]
    assert m.step() == (False, "too hot: GPU 1 is at 83 °C (limit 80 °C)")
    m.nvml.temps = [40.0, 70.0]
    assert m.step() == (True, "")


def test_idle_only_waits_for_no_input_and_no_other_load(tmp_path: Path) -> None:
    m = Machine(tmp_path, ShareRules(idle_only=True, idle_minutes=3, idle_cpu_percent=25))
    m.step()  # the first reading only sets the CPU baseline
    # Someone typed just now.
    sharing, why = m.step()
    assert not sharing and why.startswith("in use (input ") and "idle-only waits 3 min" in why
    import os
    old = os.stat(m.tty).st_atime - 600
    os.utime(m.tty, (old, old))  # ten minutes without input
    assert m.step() == (True, "")
    # Another program takes 80% of both cores for 10 s.
    m.ps.busy += 16.0
    m.ps.mine += 0.0
    sharing, why = m.step(seconds=10)
    assert not sharing and why == "other programs use 80% of the CPU (idle-only allows 25%)"
    # The load is gone, but idle-only waits its 3 minutes before resuming.
    sharing, why = m.step(seconds=60)
    assert not sharing and why.startswith("other programs used the CPU 60 s ago")
    assert m.step(seconds=125) == (True, "")
    # The node's own jobs do not count as other load.
    m.ps.busy += 16.0
    m.ps.mine += 16.0
    assert m.step(seconds=10) == (True, "")


def test_disk_to_keep_free(tmp_path: Path) -> None:
    m = Machine(tmp_path, ShareRules(keep_free_disk_bytes=1 << 60))
    sharing, why = m.step()
    assert not sharing and why.startswith("only ") and why.endswith("GiB free)")
    assert Machine(tmp_path, ShareRules(keep_free_disk_bytes=1 << 20)).step() == (True, "")


def test_every_reason_is_given_at_once() -> None:
    policy = SharePolicy(ShareRules(windows=(TimeWindow.parse("Sat,Sun"),)))
    decision = policy.decide(Readings(MONDAY_NOON, 0.0, on_battery=True, cpu_temp_c=99.0))
    assert decision.reasons == ("outside its time window (Sat,Sun)", "on battery",
                                "too hot: the CPU is at 99 °C (limit 90 °C)")
    # The causes stay the same while the figures in the reasons move.
    assert decision.causes == ("outside its time window", "on battery", "too hot")
    warmer = policy.decide(Readings(MONDAY_NOON, 5.0, on_battery=True, cpu_temp_c=97.0))
    assert warmer.reasons != decision.reasons and warmer.causes == decision.causes


def test_real_readings(tmp_path: Path) -> None:
    """This machine's own sensors: whatever it can tell is in range, the rest is None."""
    sensors = ShareSensors(tmp_path)
    first, second = sensors.read(), sensors.read()
    assert first.other_cpu_percent is None  # nothing to compare the first with
    assert second.other_cpu_percent is None or 0 <= second.other_cpu_percent <= 100
    assert second.disk_free_bytes is not None and second.disk_free_bytes > 0
    assert second.cpu_temp_c is None or 0 < second.cpu_temp_c < 150
    assert second.input_idle_s is None or second.input_idle_s >= 0
    assert second.on_battery in (None, True, False)
    decision = SharePolicy(ShareRules()).decide(second)
    assert decision.sharing == (not decision.reasons)
