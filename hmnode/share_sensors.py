"""What the machine says now, for the share rules: battery, temperatures, input idle time,
other programs' CPU load, free disk. Reads psutil and NVML (both passed in, so tests inject
readings at that boundary); whatever the machine cannot tell is None."""

from __future__ import annotations

import glob
import os
import shutil
import time
from datetime import datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import psutil as _psutil

from hmnode.share_policy import Readings

# Sensor chips that measure the CPU package or cores (psutil's names, by driver).
CPU_SENSORS = ("coretemp", "k10temp", "zenpower", "cpu_thermal", "cpu-thermal", "soc_thermal",
               "acpitz")
# Devices whose access time moves with user input: terminals and input event devices.
INPUT_GLOBS = ("/dev/input/event*", "/dev/tty[0-9]*", "/dev/pts/[0-9]*")
_NVML_TEMPERATURE_GPU = 0


class ShareSensors:
    """Takes `Readings`; keeps what a reading is measured against (the last CPU times)."""

    def __init__(self, data_dir: Path, psutil: Any = _psutil, nvml: ModuleType | None = None,
                 input_globs: tuple[str, ...] = INPUT_GLOBS) -> None:
        self.data_dir = data_dir
        self.psutil = psutil
        self.nvml = nvml
        self.input_globs = input_globs
        self._nvml_ready: bool | None = None if nvml is None else False
        # (all cores' busy seconds, the node's and its jobs' seconds, when) at the last reading
        self._last: tuple[float, float, float] | None = None

    def read(self, now: datetime | None = None, monotonic: float | None = None) -> Readings:
        """The machine's readings now."""
        monotonic = time.monotonic() if monotonic is None else monotonic
        return Readings(
            now=now or datetime.now(), monotonic=monotonic, on_battery=self._on_battery(),
            cpu_temp_c=self._cpu_temp(), gpu_temps_c=self._gpu_temps(),
            input_idle_s=self._input_idle(), other_cpu_percent=self._other_cpu(monotonic),
            disk_free_bytes=self._disk_free())

    def _on_battery(self) -> bool | None:
        try:
            battery = self.psutil.sensors_battery()
        except (AttributeError, OSError, RuntimeError):
            return None
        if battery is None or battery.power_plugged is None:
            return None
        return not battery.power_plugged

    def _cpu_temp(self) -> float | None:
        try:
            chips = self.psutil.sensors_temperatures()
        except (AttributeError, OSError, RuntimeError):
            return None
        temps = [t.current for name in CPU_SENSORS for t in chips.get(name, ())
                 if t.current is not None and t.current > 0]
        return max(temps) if temps else None

    def _gpu_temps(self) -> tuple[float, ...]:
        nvml = self._nvml()
        if nvml is None:
            return ()
        error = getattr(nvml, "NVMLError", Exception)
        temps = []
        try:
            for index in range(int(nvml.nvmlDeviceGetCount())):
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                temps.append(float(nvml.nvmlDeviceGetTemperature(handle, _NVML_TEMPERATURE_GPU)))
        except error:
            return tuple(temps)
        return tuple(temps)

    def _nvml(self) -> ModuleType | None:
        """NVML, started once; None where there is none (no driver, no package)."""
        if self._nvml_ready is None:  # not given: the real one, if it is here
            try:
                import pynvml
            except ImportError:
                self._nvml_ready = True
                return None
            self.nvml, self._nvml_ready = pynvml, False
        if self.nvml is not None and not self._nvml_ready:
            try:
                self.nvml.nvmlInit()
            except getattr(self.nvml, "NVMLError", Exception):
                self.nvml = None
            self._nvml_ready = True
        return self.nvml

    def _input_idle(self) -> float | None:
        latest = None
        for pattern in self.input_globs:
            for path in glob.glob(pattern):
                try:
                    seen = os.stat(path).st_atime
                except OSError:
                    continue
                latest = seen if latest is None else max(latest, seen)
        return None if latest is None else max(0.0, time.time() - latest)

    def _other_cpu(self, wall: float) -> float | None:
        """Percent of all cores busy with other programs than this node and its jobs, since
        the last reading (None at the first)."""
        try:
            times = self.psutil.cpu_times()
            busy = sum(times) - times.idle - getattr(times, "iowait", 0.0)
            me = self.psutil.Process()
            mine = sum(me.cpu_times()[:4])
            for child in me.children(recursive=True):
                try:
                    mine += sum(child.cpu_times()[:2])
                except (self.psutil.NoSuchProcess, self.psutil.AccessDenied):
                    continue
            cores = self.psutil.cpu_count() or 1
        except (OSError, AttributeError):
            return None
        last, self._last = self._last, (busy, mine, wall)
        if last is None or wall - last[2] <= 0:
            return None
        other = (busy - last[0]) - (mine - last[1])
        return max(0.0, min(100.0, 100.0 * other / ((wall - last[2]) * cores)))

    def _disk_free(self) -> int | None:
        try:
            return shutil.disk_usage(self.data_dir).free
        except OSError:
            return None
