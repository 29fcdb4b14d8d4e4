"""Hardware inventory of this node: CPU, memory, disk, network and NVIDIA GPUs.

Probing never raises for missing or unusual hardware; a node without a GPU or
without a driver is an ordinary node and says why in plain words.
"""

from __future__ import annotations

import math
import os
import platform
import socket
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import psutil

__all__ = [
    "CpuInfo",
    "MemoryInfo",
    "DiskInfo",
    "NetInterface",
    "GpuInfo",
    "GpuReport",
    "Inventory",
    "probe_cpu",
    "probe_memory",
    "probe_disk",
    "probe_network",
    "probe_gpus",
    "collect_inventory",
    "summary_lines",
]

_GIB = 1024**3
_CPUINFO = Path("/proc/cpuinfo")

# NVML status codes, used when an injected or older module lacks the constant.
_NVML_ERROR_NO_PERMISSION = 4
_NVML_ERROR_DRIVER_NOT_LOADED = 9
_NVML_ERROR_LIBRARY_NOT_FOUND = 12
_NVML_ERROR_LIB_RM_VERSION_MISMATCH = 18


@dataclass(frozen=True)
class CpuInfo:
    """The CPU model, core counts and clock; None where the platform does not say."""

    model: str
    physical_cores: int | None
    logical_cores: int
    freq_mhz_current: float | None
    freq_mhz_max: float | None


@dataclass(frozen=True)
class MemoryInfo:
    """Physical memory in bytes: installed, and available to new processes."""

    total_bytes: int
    available_bytes: int


@dataclass(frozen=True)
class DiskInfo:
    """Size and free space of the filesystem holding `path` (the data dir or its nearest existing parent)."""

    path: str
    total_bytes: int
    free_bytes: int


@dataclass(frozen=True)
class NetInterface:
    """A network interface with its IPv4/IPv6 addresses, link state and speed (None if unknown)."""

    name: str
    addresses: tuple[str, ...]
    is_up: bool
    speed_mbps: int | None


@dataclass(frozen=True)
class GpuInfo:
    """One NVIDIA GPU as NVML describes it; utilisation is None where the device does not report it."""

    index: int
    name: str
    uuid: str
    memory_total_bytes: int
    memory_used_bytes: int
    compute_capability: str
    utilization_percent: int | None


@dataclass(frozen=True)
class GpuReport:
    """The GPUs found; `reason` says why there are none, or why some were left out."""

    gpus: tuple[GpuInfo, ...]
    driver_version: str | None
    reason: str | None


@dataclass(frozen=True)
class Inventory:
    """Everything probed about this node at `taken_at` (seconds since the epoch)."""

    taken_at: float
    cpu: CpuInfo
    memory: MemoryInfo
    disk: DiskInfo
    network: tuple[NetInterface, ...]
    gpu: GpuReport

    def to_dict(self) -> dict[str, Any]:
        """Plain dicts, lists, strings and numbers, safe for msgpack and JSON."""
        return {
            "taken_at": self.taken_at,
            "cpu": {
                "model": self.cpu.model,
                "physical_cores": self.cpu.physical_cores,
                "logical_cores": self.cpu.logical_cores,
                "freq_mhz_current": self.cpu.freq_mhz_current,
                "freq_mhz_max": self.cpu.freq_mhz_max,
            },
            "memory": {
                "total_bytes": self.memory.total_bytes,
                "available_bytes": self.memory.available_bytes,
            },
            "disk": {
                "path": self.disk.path,
                "total_bytes": self.disk.total_bytes,
                "free_bytes": self.disk.free_bytes,
            },
            "network": [
                {
                    "name": nic.name,
                    "addresses": list(nic.addresses),
                    "is_up": nic.is_up,
                    "speed_mbps": nic.speed_mbps,
                }
                for nic in self.network
            ],
            "gpu": {
                "gpus": [
                    {
                        "index": g.index,
                        "name": g.name,
                        "uuid": g.uuid,
                        "memory_total_bytes": g.memory_total_bytes,
                        "memory_used_bytes": g.memory_used_bytes,
                        "compute_capability": g.compute_capability,
                        "utilization_percent": g.utilization_percent,
                    }
                    for g in self.gpu.gpus
                ],
                "driver_version": self.gpu.driver_version,
                "reason": self.gpu.reason,
            },
        }

    @classmethod
    def from_dict(cls, d: Any) -> Inventory:
        """Inverse of `to_dict`; raises ValueError naming the first bad key or value."""
        top = _fields(d, "inventory", ("taken_at", "cpu", "memory", "disk", "network", "gpu"))
        cpu = _fields(
            top["cpu"],
            "inventory.cpu",
            ("model", "physical_cores", "logical_cores", "freq_mhz_current", "freq_mhz_max"),
        )
        mem = _fields(top["memory"], "inventory.memory", ("total_bytes", "available_bytes"))
        disk = _fields(top["disk"], "inventory.disk", ("path", "total_bytes", "free_bytes"))
        gpu = _fields(top["gpu"], "inventory.gpu", ("gpus", "driver_version", "reason"))
        return cls(
            taken_at=_float(top["taken_at"], "inventory.taken_at"),
            cpu=CpuInfo(
                model=_str(cpu["model"], "inventory.cpu.model"),
                physical_cores=_optional(_int, cpu["physical_cores"], "inventory.cpu.physical_cores"),
                logical_cores=_int(cpu["logical_cores"], "inventory.cpu.logical_cores"),
                freq_mhz_current=_optional(_float, cpu["freq_mhz_current"], "inventory.cpu.freq_mhz_current"),
                freq_mhz_max=_optional(_float, cpu["freq_mhz_max"], "inventory.cpu.freq_mhz_max"),
            ),
            memory=MemoryInfo(
                total_bytes=_int(mem["total_bytes"], "inventory.memory.total_bytes"),
                available_bytes=_int(mem["available_bytes"], "inventory.memory.available_bytes"),
            ),
            disk=DiskInfo(
                path=_str(disk["path"], "inventory.disk.path"),
                total_bytes=_int(disk["total_bytes"], "inventory.disk.total_bytes"),
                free_bytes=_int(disk["free_bytes"], "inventory.disk.free_bytes"),
            ),
            network=tuple(
                _nic_from_dict(item, f"inventory.network[{i}]")
                for i, item in enumerate(_list(top["network"], "inventory.network"))
            ),
            gpu=GpuReport(
                gpus=tuple(
                    _gpu_from_dict(item, f"inventory.gpu.gpus[{i}]")
                    for i, item in enumerate(_list(gpu["gpus"], "inventory.gpu.gpus"))
                ),
                driver_version=_optional(_str, gpu["driver_version"], "inventory.gpu.driver_version"),
                reason=_optional(_str, gpu["reason"], "inventory.gpu.reason"),
            ),
        )


def _nic_from_dict(d: Any, where: str) -> NetInterface:
    f = _fields(d, where, ("name", "addresses", "is_up", "speed_mbps"))
    return NetInterface(
        name=_str(f["name"], f"{where}.name"),
        addresses=tuple(
            _str(a, f"{where}.addresses[{i}]")
            for i, a in enumerate(_list(f["addresses"], f"{where}.addresses"))
        ),
        is_up=_bool(f["is_up"], f"{where}.is_up"),
        speed_mbps=_optional(_int, f["speed_mbps"], f"{where}.speed_mbps"),
    )


def _gpu_from_dict(d: Any, where: str) -> GpuInfo:
    f = _fields(
        d,
        where,
        (
            "index",
            "name",
            "uuid",
            "memory_total_bytes",
            "memory_used_bytes",
            "compute_capability",
            "utilization_percent",
        ),
    )
    return GpuInfo(
        index=_int(f["index"], f"{where}.index"),
        name=_str(f["name"], f"{where}.name"),
        uuid=_str(f["uuid"], f"{where}.uuid"),
        memory_total_bytes=_int(f["memory_total_bytes"], f"{where}.memory_total_bytes"),
        memory_used_bytes=_int(f["memory_used_bytes"], f"{where}.memory_used_bytes"),
        compute_capability=_str(f["compute_capability"], f"{where}.compute_capability"),
        utilization_percent=_optional(_int, f["utilization_percent"], f"{where}.utilization_percent"),
    )


def _fields(d: Any, where: str, names: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(d).__name__}")
    missing = [n for n in names if n not in d]
    if missing:
        raise ValueError(f"{where}: missing key(s) {', '.join(map(repr, missing))}")
    extra = [k for k in d if k not in names]
    if extra:
        raise ValueError(f"{where}: unexpected key(s) {', '.join(map(repr, extra))}")
    return d


def _str(v: Any, where: str) -> str:
    if not isinstance(v, str):
        raise ValueError(f"{where}: expected a string, got {type(v).__name__}")
    return v


def _int(v: Any, where: str) -> int:
    # bool is an int subclass; a flag where a count belongs is a malformed record.
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{where}: expected an integer, got {type(v).__name__}")
    if v < 0:
        raise ValueError(f"{where}: expected a non-negative integer, got {v}")
    return v


def _float(v: Any, where: str) -> float:
    # JSON and msgpack peers may send a whole number as an int.
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"{where}: expected a number, got {type(v).__name__}")
    if not math.isfinite(v):
        raise ValueError(f"{where}: expected a finite number, got {v}")
    return float(v)


def _bool(v: Any, where: str) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"{where}: expected true or false, got {type(v).__name__}")
    return v


def _list(v: Any, where: str) -> list[Any] | tuple[Any, ...]:
    if not isinstance(v, (list, tuple)):
        raise ValueError(f"{where}: expected a list, got {type(v).__name__}")
    return v


def _optional(check: Callable[[Any, str], Any], v: Any, where: str) -> Any:
    return None if v is None else check(v, where)


def _cpu_model_from_cpuinfo(text: str) -> str | None:
    """The CPU model named in /proc/cpuinfo text: x86 "model name", else ARM "Hardware" or "Processor"."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        key, value = key.strip(), value.strip()
        # First occurrence wins: every core repeats the same block.
        if sep and value and key not in values:
            values[key] = value
    # Case matters: lowercase "processor" is the core number, not a model.
    for key in ("model name", "Hardware", "Processor"):
        if key in values:
            return values[key]
    return None


def _cpu_model() -> str:
    try:
        model = _cpu_model_from_cpuinfo(_CPUINFO.read_text(errors="replace"))
    except OSError:
        model = None
    return model or platform.processor().strip() or "unknown"


def _positive(v: float | None) -> float | None:
    # psutil reports 0.0 when the kernel exposes no frequency (common in VMs).
    return float(v) if v is not None and v > 0 else None


def probe_cpu() -> CpuInfo:
    """Describe the CPU; frequencies are None where psutil cannot read them."""
    logical = os.cpu_count() or psutil.cpu_count(logical=True) or 1
    physical = psutil.cpu_count(logical=False)
    try:
        freq = psutil.cpu_freq()
    except (OSError, NotImplementedError, RuntimeError, ValueError):
        freq = None
    return CpuInfo(
        model=_cpu_model(),
        physical_cores=physical if physical else None,
        logical_cores=logical,
        freq_mhz_current=_positive(freq.current) if freq is not None else None,
        freq_mhz_max=_positive(freq.max) if freq is not None else None,
    )


def probe_memory() -> MemoryInfo:
    """Installed and available physical memory."""
    vm = psutil.virtual_memory()
    return MemoryInfo(total_bytes=int(vm.total), available_bytes=int(vm.available))


def probe_disk(data_dir: Path) -> DiskInfo:
    """Size and free space of the filesystem that holds (or will hold) `data_dir`."""
    # abspath rather than resolve: the reported path should be the one the user configured.
    path = Path(os.path.abspath(data_dir))
    # The data dir may not exist before first start; its parent's filesystem is where it will be.
    while not path.exists() and path != path.parent:
        path = path.parent
    usage = psutil.disk_usage(str(path))
    return DiskInfo(path=str(path), total_bytes=int(usage.total), free_bytes=int(usage.free))


def probe_network() -> tuple[NetInterface, ...]:
    """Every interface by name, with its IP addresses, link state and speed."""
    addrs = psutil.net_if_addrs()
    try:
        stats = psutil.net_if_stats()
    except OSError:
        # Some sandboxes refuse the per-interface ioctls; addresses are still worth reporting.
        stats = {}
    nics = []
    for name in sorted(set(addrs) | set(stats)):
        ips: list[str] = []
        for a in addrs.get(name, ()):
            if a.family in (socket.AF_INET, socket.AF_INET6) and a.address not in ips:
                ips.append(a.address)
        st = stats.get(name)
        nics.append(
            NetInterface(
                name=name,
                addresses=tuple(ips),
                is_up=bool(st.isup) if st is not None else False,
                # psutil says 0 when the driver does not report a speed (loopback, virtual NICs).
                speed_mbps=int(st.speed) if st is not None and st.speed > 0 else None,
            )
        )
    return tuple(nics)


def _text(v: bytes | str) -> str:
    # pynvml returns bytes or str depending on its version.
    return v.decode("utf-8", errors="replace") if isinstance(v, bytes) else str(v)


def _nvml_message(exc: BaseException) -> str:
    try:
        return str(exc) or type(exc).__name__
    except Exception:  # NVMLError.__str__ asks the library, which may be what is broken
        return f"NVML error {getattr(exc, 'value', '?')}"


def _init_failure_reason(nvml: ModuleType, exc: BaseException) -> str:
    code = getattr(exc, "value", None)

    def is_(name: str, default: int) -> bool:
        return code is not None and code == getattr(nvml, name, default)

    if is_("NVML_ERROR_LIBRARY_NOT_FOUND", _NVML_ERROR_LIBRARY_NOT_FOUND):
        return "no NVIDIA driver library (libnvidia-ml) found"
    if is_("NVML_ERROR_DRIVER_NOT_LOADED", _NVML_ERROR_DRIVER_NOT_LOADED):
        return "the NVIDIA kernel driver is not loaded"
    if is_("NVML_ERROR_NO_PERMISSION", _NVML_ERROR_NO_PERMISSION):
        return f"no permission to query NVML: {_nvml_message(exc)}"
    if is_("NVML_ERROR_LIB_RM_VERSION_MISMATCH", _NVML_ERROR_LIB_RM_VERSION_MISMATCH):
        return "the NVIDIA driver library and kernel module versions differ (reload the driver or reboot)"
    return f"NVML could not start: {_nvml_message(exc)}"


def _probe_device(nvml: ModuleType, error: type[BaseException], index: int) -> GpuInfo:
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    mem = nvml.nvmlDeviceGetMemoryInfo(handle)
    major, minor = nvml.nvmlDeviceGetCudaComputeCapability(handle)
    try:
        util: int | None = int(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
    except error:
        # Utilisation is unsupported on some boards and under MIG; the GPU is still usable.
        util = None
    return GpuInfo(
        index=index,
        name=_text(nvml.nvmlDeviceGetName(handle)),
        uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
        memory_total_bytes=int(mem.total),
        memory_used_bytes=int(mem.used),
        compute_capability=f"{int(major)}.{int(minor)}",
        utilization_percent=util,
    )


def probe_gpus(nvml: ModuleType | None = None) -> GpuReport:
    """List NVIDIA GPUs through NVML (`pynvml` unless `nvml` is given); failures become a `reason`."""
    if nvml is None:
        try:
            import pynvml as nvml
        except ImportError:
            return GpuReport(gpus=(), driver_version=None, reason="the nvidia-ml-py package (pynvml) is not installed")
    error: type[BaseException] = getattr(nvml, "NVMLError", Exception)
    try:
        nvml.nvmlInit()
    except error as exc:
        return GpuReport(gpus=(), driver_version=None, reason=_init_failure_reason(nvml, exc))
    try:
        try:
            driver: str | None = _text(nvml.nvmlSystemGetDriverVersion())
        except error:
            driver = None
        try:
            count = int(nvml.nvmlDeviceGetCount())
        except error as exc:
            return GpuReport(gpus=(), driver_version=driver, reason=f"NVML could not count GPUs: {_nvml_message(exc)}")
        if count == 0:
            return GpuReport(gpus=(), driver_version=driver, reason="NVML found no GPU")
        gpus: list[GpuInfo] = []
        problems: list[str] = []
        for index in range(count):
            try:
                gpus.append(_probe_device(nvml, error, index))
            except error as exc:
                # One lost or faulty GPU should not hide the healthy ones.
                problems.append(f"GPU {index} could not be queried: {_nvml_message(exc)}")
        return GpuReport(gpus=tuple(gpus), driver_version=driver, reason="; ".join(problems) or None)
    finally:
        try:
            nvml.nvmlShutdown()
        except error:
            pass  # nothing useful to do; the probe's answer stands


def collect_inventory(data_dir: Path, now: float) -> Inventory:
    """Probe everything; `now` is the timestamp to record, so callers control the clock."""
    return Inventory(
        taken_at=now,
        cpu=probe_cpu(),
        memory=probe_memory(),
        disk=probe_disk(data_dir),
        network=probe_network(),
        gpu=probe_gpus(),
    )


def _gib(n: int) -> str:
    return f"{n / _GIB:.1f} GiB"


def summary_lines(inv: Inventory) -> list[str]:
    """A few human-readable lines describing `inv`, for `hmnode assets`."""
    cpu = inv.cpu
    cores = f"{cpu.logical_cores} logical"
    if cpu.physical_cores is not None:
        cores = f"{cpu.physical_cores} physical / {cores}"
    clock = ""
    if cpu.freq_mhz_current is not None and cpu.freq_mhz_max is not None:
        clock = f", {cpu.freq_mhz_current:.0f} MHz (max {cpu.freq_mhz_max:.0f} MHz)"
    elif cpu.freq_mhz_current is not None:
        clock = f", {cpu.freq_mhz_current:.0f} MHz"
    elif cpu.freq_mhz_max is not None:
        clock = f", max {cpu.freq_mhz_max:.0f} MHz"
    lines = [
        f"CPU: {cpu.model} ({cores} cores{clock})",
        f"Memory: {_gib(inv.memory.total_bytes)} total, {_gib(inv.memory.available_bytes)} available",
        f"Disk: {_gib(inv.disk.free_bytes)} free of {_gib(inv.disk.total_bytes)} at {inv.disk.path}",
    ]
    report = inv.gpu
    if not report.gpus:
        lines.append(f"GPU: none ({report.reason or 'no reason given'})")
    else:
        for g in report.gpus:
            util = f", {g.utilization_percent}% busy" if g.utilization_percent is not None else ""
            lines.append(
                f"GPU {g.index}: {g.name}, {_gib(g.memory_used_bytes)} used of {_gib(g.memory_total_bytes)}, "
                f"compute {g.compute_capability}{util} [{g.uuid}]"
            )
        if report.driver_version is not None:
            lines.append(f"GPU driver: {report.driver_version}")
        if report.reason:
            lines.append(f"GPU warning: {report.reason}")
    for nic in inv.network:
        if not nic.addresses:
            continue
        state = "up" if nic.is_up else "down"
        speed = f", {nic.speed_mbps} Mb/s" if nic.speed_mbps is not None else ""
        lines.append(f"Network {nic.name} ({state}{speed}): {', '.join(nic.addresses)}")
    if not any(nic.addresses for nic in inv.network):
        lines.append("Network: no IP addresses")
    return lines
