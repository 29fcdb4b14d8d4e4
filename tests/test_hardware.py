"""Tests for the hardware inventory: the real probes on this machine, NVML through a fake, and serialisation."""

from __future__ import annotations

import ipaddress
import json
import re
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from hmnode import hardware
from hmnode.hardware import (
    CpuInfo,
    DiskInfo,
    GpuInfo,
    GpuReport,
    Inventory,
    MemoryInfo,
    NetInterface,
    collect_inventory,
    probe_cpu,
    probe_disk,
    probe_gpus,
    summary_lines,
)

# ---------------------------------------------------------------------------
# A fake NVML module. Its errors behave like pynvml's: `NVMLError(code)` returns
# an instance of the per-code subclass, and every instance carries `value`.
# ---------------------------------------------------------------------------

NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_UNKNOWN = 999

_ERROR_TEXT = {
    NVML_ERROR_NOT_SUPPORTED: "Not Supported",
    NVML_ERROR_NO_PERMISSION: "Insufficient Permissions",
    NVML_ERROR_DRIVER_NOT_LOADED: "Driver Not Loaded",
    NVML_ERROR_LIBRARY_NOT_FOUND: "NVML Shared Library Not Found",
    NVML_ERROR_GPU_IS_LOST: "GPU is lost",
    NVML_ERROR_UNKNOWN: "Unknown Error",
}


class NVMLError(Exception):
    _value_class: dict[int, type[NVMLError]] = {}

    def __new__(cls, value: int) -> NVMLError:
        if cls is NVMLError:
            cls = NVMLError._value_class.get(value, cls)
        obj = Exception.__new__(cls)
        obj.value = value  # type: ignore[attr-defined]
        return obj

    def __str__(self) -> str:
        return _ERROR_TEXT.get(self.value, f"NVML Error with code {self.value}")  # type: ignore[attr-defined]


def _error_class(name: str, code: int) -> type[NVMLError]:
    cls = type(name, (NVMLError,), {"__new__": lambda typ, *args: NVMLError.__new__(typ, code)})
    NVMLError._value_class[code] = cls
    return cls


_ERROR_CLASSES = {
    "NVMLError_NotSupported": _error_class("NVMLError_NotSupported", NVML_ERROR_NOT_SUPPORTED),
    "NVMLError_NoPermission": _error_class("NVMLError_NoPermission", NVML_ERROR_NO_PERMISSION),
    "NVMLError_DriverNotLoaded": _error_class("NVMLError_DriverNotLoaded", NVML_ERROR_DRIVER_NOT_LOADED),
    "NVMLError_LibraryNotFound": _error_class("NVMLError_LibraryNotFound", NVML_ERROR_LIBRARY_NOT_FOUND),
    "NVMLError_GpuIsLost": _error_class("NVMLError_GpuIsLost", NVML_ERROR_GPU_IS_LOST),
    "NVMLError_Unknown": _error_class("NVMLError_Unknown", NVML_ERROR_UNKNOWN),
}


@dataclass
class FakeGpu:
    name: bytes | str
    uuid: bytes | str
    total: int
    used: int
    capability: tuple[int, int] = (9, 0)
    utilization: int | None = 10  # None: the board does not support the query
    failing: dict[str, int] = field(default_factory=dict)  # query name -> NVML error code

    def check(self, query: str) -> None:
        if query in self.failing:
            raise NVMLError(self.failing[query])


class Mem:
    def __init__(self, total: int, used: int) -> None:
        self.total, self.used, self.free = total, used, total - used


class Util:
    def __init__(self, gpu: int) -> None:
        self.gpu, self.memory = gpu, 0


class FakeNvml:
    """Stands in for the `pynvml` module at the library boundary and records the calls made."""

    NVMLError = NVMLError
    NVML_ERROR_NOT_SUPPORTED = NVML_ERROR_NOT_SUPPORTED
    NVML_ERROR_NO_PERMISSION = NVML_ERROR_NO_PERMISSION
    NVML_ERROR_DRIVER_NOT_LOADED = NVML_ERROR_DRIVER_NOT_LOADED
    NVML_ERROR_LIBRARY_NOT_FOUND = NVML_ERROR_LIBRARY_NOT_FOUND
    NVML_ERROR_GPU_IS_LOST = NVML_ERROR_GPU_IS_LOST
    NVML_ERROR_UNKNOWN = NVML_ERROR_UNKNOWN

    def __init__(
        self,
        gpus: list[FakeGpu] | None = None,
        *,
        init_error: int | None = None,
        count_error: int | None = None,
        driver: bytes | str | None = b"550.54.15",
    ) -> None:
        self.gpus = gpus or []
        self.init_error = init_error
        self.count_error = count_error
        self.driver = driver
        self.calls: list[str] = []
        for name, cls in _ERROR_CLASSES.items():
            setattr(self, name, cls)

    def nvmlInit(self) -> None:
        self.calls.append("init")
        if self.init_error is not None:
            raise NVMLError(self.init_error)

    def nvmlShutdown(self) -> None:
        self.calls.append("shutdown")

    def nvmlSystemGetDriverVersion(self) -> bytes | str:
        if self.driver is None:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        return self.driver

    def nvmlDeviceGetCount(self) -> int:
        if self.count_error is not None:
            raise NVMLError(self.count_error)
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeGpu:
        gpu = self.gpus[index]
        gpu.check("handle")
        return gpu

    def nvmlDeviceGetName(self, handle: FakeGpu) -> bytes | str:
        handle.check("name")
        return handle.name

    def nvmlDeviceGetUUID(self, handle: FakeGpu) -> bytes | str:
        handle.check("uuid")
        return handle.uuid

    def nvmlDeviceGetMemoryInfo(self, handle: FakeGpu) -> Mem:
        handle.check("memory")
        return Mem(handle.total, handle.used)

    def nvmlDeviceGetCudaComputeCapability(self, handle: FakeGpu) -> tuple[int, int]:
        handle.check("capability")
        return handle.capability

    def nvmlDeviceGetUtilizationRates(self, handle: FakeGpu) -> Util:
        handle.check("utilization")
        if handle.utilization is None:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        return Util(handle.utilization)


def _two_gpus() -> list[FakeGpu]:
    return [
        FakeGpu(name=b"NVIDIA H100 80GB HBM3", uuid=b"GPU-aaaa", total=80 * 2**30, used=2**30, utilization=37),
        FakeGpu(name="NVIDIA A100-SXM4-40GB", uuid="GPU-bbbb", total=40 * 2**30, used=0, capability=(8, 0)),
    ]


def test_fake_nvml_mirrors_the_real_library() -> None:
    pynvml = pytest.importorskip("pynvml")
    for name in dir(FakeNvml):
        if name.startswith("NVML_ERROR_"):
            assert getattr(FakeNvml, name) == getattr(pynvml, name), name
    for name, cls in _ERROR_CLASSES.items():
        real_cls = getattr(pynvml, name)
        real, fake = pynvml.NVMLError(real_cls(0).value), NVMLError(cls(0).value)
        assert type(real).__name__ == type(fake).__name__ == name
        assert real.value == fake.value
        assert isinstance(real, pynvml.NVMLError) and isinstance(fake, NVMLError)


# ---------------------------------------------------------------------------
# GPU probing through the fake
# ---------------------------------------------------------------------------


def test_two_gpus_are_reported_with_bytes_and_str_names() -> None:
    nvml = FakeNvml(_two_gpus())
    report = probe_gpus(nvml)  # type: ignore[arg-type]
    assert report.reason is None
    assert report.driver_version == "550.54.15"
    assert report.gpus == (
        GpuInfo(0, "NVIDIA H100 80GB HBM3", "GPU-aaaa", 80 * 2**30, 2**30, "9.0", 37),
        GpuInfo(1, "NVIDIA A100-SXM4-40GB", "GPU-bbbb", 40 * 2**30, 0, "8.0", 10),
    )
    assert nvml.calls == ["init", "shutdown"]


def test_str_driver_version_is_kept_and_missing_one_is_none() -> None:
    assert probe_gpus(FakeNvml(_two_gpus(), driver="535.1")).driver_version == "535.1"  # type: ignore[arg-type]
    report = probe_gpus(FakeNvml(_two_gpus(), driver=None))  # type: ignore[arg-type]
    assert report.driver_version is None
    assert len(report.gpus) == 2


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (NVML_ERROR_LIBRARY_NOT_FOUND, "no NVIDIA driver library (libnvidia-ml) found"),
        (NVML_ERROR_DRIVER_NOT_LOADED, "the NVIDIA kernel driver is not loaded"),
        (NVML_ERROR_NO_PERMISSION, "no permission to query NVML: Insufficient Permissions"),
        (NVML_ERROR_UNKNOWN, "NVML could not start: Unknown Error"),
    ],
)
def test_init_failure_is_a_reason_and_nvml_is_not_shut_down(code: int, expected: str) -> None:
    nvml = FakeNvml(_two_gpus(), init_error=code)
    report = probe_gpus(nvml)  # type: ignore[arg-type]
    assert report == GpuReport(gpus=(), driver_version=None, reason=expected)
    assert nvml.calls == ["init"]


def test_zero_devices_is_a_reason() -> None:
    nvml = FakeNvml([])
    report = probe_gpus(nvml)  # type: ignore[arg-type]
    assert report == GpuReport(gpus=(), driver_version="550.54.15", reason="NVML found no GPU")
    assert nvml.calls == ["init", "shutdown"]


def test_count_failure_is_a_reason_and_shuts_down() -> None:
    nvml = FakeNvml(_two_gpus(), count_error=NVML_ERROR_UNKNOWN)
    report = probe_gpus(nvml)  # type: ignore[arg-type]
    assert report.gpus == ()
    assert report.reason == "NVML could not count GPUs: Unknown Error"
    assert nvml.calls == ["init", "shutdown"]


def test_unsupported_utilisation_gives_none_and_keeps_the_gpu() -> None:
    gpus = _two_gpus()
    gpus[0].utilization = None
    report = probe_gpus(FakeNvml(gpus))  # type: ignore[arg-type]
    assert [g.utilization_percent for g in report.gpus] == [None, 10]
    assert report.reason is None


@pytest.mark.parametrize("query", ["handle", "name", "uuid", "memory", "capability"])
def test_failing_device_query_leaves_that_gpu_out_and_still_shuts_down(query: str) -> None:
    gpus = _two_gpus()
    gpus[1].failing[query] = NVML_ERROR_GPU_IS_LOST
    nvml = FakeNvml(gpus)
    report = probe_gpus(nvml)  # type: ignore[arg-type]
    assert [g.uuid for g in report.gpus] == ["GPU-aaaa"]
    assert report.reason == "GPU 1 could not be queried: GPU is lost"
    assert nvml.calls == ["init", "shutdown"]


def test_every_gpu_failing_gives_no_gpus_with_a_reason() -> None:
    gpus = _two_gpus()
    for g in gpus:
        g.failing["memory"] = NVML_ERROR_NO_PERMISSION
    nvml = FakeNvml(gpus)
    report = probe_gpus(nvml)  # type: ignore[arg-type]
    assert report.gpus == ()
    assert report.reason is not None and "GPU 0" in report.reason and "GPU 1" in report.reason
    assert nvml.calls == ["init", "shutdown"]


def test_missing_pynvml_is_a_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    # A None entry in sys.modules makes `import pynvml` raise ImportError.
    monkeypatch.setitem(sys.modules, "pynvml", None)
    report = probe_gpus()
    assert report.gpus == ()
    assert report.reason is not None and "pynvml" in report.reason


def test_real_gpu_probe_answers_without_raising() -> None:
    report = probe_gpus()
    if not report.gpus:
        assert report.reason
    else:
        assert report.driver_version
        assert [g.index for g in report.gpus] == list(range(len(report.gpus)))
        for g in report.gpus:
            assert g.name and g.uuid
            assert 0 < g.memory_total_bytes and 0 <= g.memory_used_bytes <= g.memory_total_bytes
            major, _, minor = g.compute_capability.partition(".")
            assert major.isdigit() and minor.isdigit()
            assert g.utilization_percent is None or 0 <= g.utilization_percent <= 100


# ---------------------------------------------------------------------------
# Real probes on this machine
# ---------------------------------------------------------------------------


def test_real_inventory_is_sane(tmp_path: Path) -> None:
    now = 1_700_000_123.25
    inv = collect_inventory(tmp_path, now)
    assert inv.taken_at == now

    assert inv.cpu.logical_cores >= 1
    assert inv.cpu.logical_cores == os.cpu_count()
    if inv.cpu.physical_cores is not None:
        assert 1 <= inv.cpu.physical_cores <= inv.cpu.logical_cores
    assert inv.cpu.model
    for freq in (inv.cpu.freq_mhz_current, inv.cpu.freq_mhz_max):
        assert freq is None or freq > 0

    assert inv.memory.total_bytes > 0
    assert 0 <= inv.memory.available_bytes <= inv.memory.total_bytes

    assert inv.disk.path == str(tmp_path)
    assert inv.disk.total_bytes > 0
    assert 0 <= inv.disk.free_bytes <= inv.disk.total_bytes

    assert any("127.0.0.1" in nic.addresses for nic in inv.network)
    for nic in inv.network:
        # Link-layer (MAC) addresses are not IP addresses and must be left out.
        for address in nic.addresses:
            ipaddress.ip_address(address.partition("%")[0])  # raises for a MAC
    assert [nic.name for nic in inv.network] == sorted(nic.name for nic in inv.network)


def test_disk_of_a_missing_data_dir_is_its_nearest_existing_parent(tmp_path: Path) -> None:
    disk = probe_disk(tmp_path / "not" / "yet" / "created")
    assert disk.path == str(tmp_path)
    assert disk.total_bytes > 0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("processor\t: 0\nmodel name\t: AMD EPYC 9654\n\nprocessor\t: 1\nmodel name\t: AMD EPYC 9654\n", "AMD EPYC 9654"),
        ("Processor\t: AArch64 Processor rev 4 (aarch64)\nprocessor\t: 0\nBogoMIPS\t: 38.40\n", "AArch64 Processor rev 4 (aarch64)"),
        ("processor\t: 0\nBogoMIPS\t: 38.40\nHardware\t: BCM2835\n", "BCM2835"),
        ("processor\t: 0\nCPU implementer\t: 0x41\n", None),
        ("model name\t:\n", None),
        ("", None),
    ],
)
def test_cpu_model_is_read_from_cpuinfo(text: str, expected: str | None) -> None:
    assert hardware._cpu_model_from_cpuinfo(text) == expected


def test_cpu_model_falls_back_to_platform_then_unknown(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(hardware, "_CPUINFO", tmp_path / "no-cpuinfo")
    monkeypatch.setattr(hardware.platform, "processor", lambda: "x86_64")
    assert probe_cpu().model == "x86_64"
    monkeypatch.setattr(hardware.platform, "processor", lambda: "")
    assert probe_cpu().model == "unknown"


def _raise_not_implemented() -> None:
    raise NotImplementedError("no cpu frequency on this platform")


@pytest.mark.parametrize("cpu_freq", [lambda: None, _raise_not_implemented])
def test_unreadable_cpu_frequency_is_none(monkeypatch: pytest.MonkeyPatch, cpu_freq: Any) -> None:
    monkeypatch.setattr(hardware.psutil, "cpu_freq", cpu_freq)
    cpu = probe_cpu()
    assert cpu.freq_mhz_current is None and cpu.freq_mhz_max is None
    assert cpu.logical_cores >= 1


# ---------------------------------------------------------------------------
# Serialisation
# ---------------------------------------------------------------------------

_counts = st.integers(min_value=0, max_value=2**63 - 1)
_floats = st.floats(min_value=0, max_value=1e12, allow_nan=False, allow_infinity=False)
_gpu_infos = st.builds(
    GpuInfo,
    index=st.integers(0, 64),
    name=st.text(),
    uuid=st.text(),
    memory_total_bytes=_counts,
    memory_used_bytes=_counts,
    compute_capability=st.text(),
    utilization_percent=st.none() | st.integers(0, 100),
)
inventories = st.builds(
    Inventory,
    taken_at=st.floats(min_value=0, max_value=4e9, allow_nan=False) | st.integers(0, 2**32),
    cpu=st.builds(
        CpuInfo,
        model=st.text(),
        physical_cores=st.none() | st.integers(1, 4096),
        logical_cores=st.integers(1, 4096),
        freq_mhz_current=st.none() | _floats,
        freq_mhz_max=st.none() | _floats,
    ),
    memory=st.builds(MemoryInfo, total_bytes=_counts, available_bytes=_counts),
    disk=st.builds(DiskInfo, path=st.text(), total_bytes=_counts, free_bytes=_counts),
    network=st.lists(
        st.builds(
            NetInterface,
            name=st.text(),
            addresses=st.lists(st.text(), max_size=4).map(tuple),
            is_up=st.booleans(),
            speed_mbps=st.none() | st.integers(0, 400_000),
        ),
        max_size=4,
    ).map(tuple),
    gpu=st.builds(
        GpuReport,
        gpus=st.lists(_gpu_infos, max_size=3).map(tuple),
        driver_version=st.none() | st.text(),
        reason=st.none() | st.text(),
    ),
)


@given(inventories)
def test_inventory_round_trips_through_dict_msgpack_and_json(inv: Inventory) -> None:
    assert Inventory.from_dict(inv.to_dict()) == inv
    assert Inventory.from_dict(msgpack.unpackb(msgpack.packb(inv.to_dict()))) == inv
    assert Inventory.from_dict(json.loads(json.dumps(inv.to_dict()))) == inv


def _dict_slots(obj: Any, out: list[tuple[dict[str, Any], str]]) -> list[tuple[dict[str, Any], str]]:
    if isinstance(obj, dict):
        for key, value in obj.items():
            out.append((obj, key))
            _dict_slots(value, out)
    elif isinstance(obj, list):
        for item in obj:
            _dict_slots(item, out)
    return out


def _wrong_type(value: Any) -> Any:
    # A value of a type that no field holding `value` accepts.
    if isinstance(value, bool):
        return "true"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, str):
        return 7
    if value is None:
        return []
    if isinstance(value, list):
        return {"0": value}
    return []


@given(inventories, st.data())
def test_malformed_dict_raises_value_error(inv: Inventory, data: st.DataObject) -> None:
    d = msgpack.unpackb(msgpack.packb(inv.to_dict()))  # a deep copy made of plain types
    slots = _dict_slots(d, [])
    container, key = data.draw(st.sampled_from(slots))
    action = data.draw(st.sampled_from(["remove", "wrong type", "extra key"]))
    if action == "remove":
        del container[key]
    elif action == "wrong type":
        container[key] = _wrong_type(container[key])
    else:
        container["unexpected_key"] = 1
    with pytest.raises(ValueError):
        Inventory.from_dict(d)


def _sample_inventory(gpu: GpuReport) -> Inventory:
    return Inventory(
        taken_at=1_700_000_000.0,
        cpu=CpuInfo("AMD EPYC 9654 96-Core Processor", 96, 192, 2400.0, 3700.0),
        memory=MemoryInfo(total_bytes=16 * 2**30, available_bytes=12 * 2**30),
        disk=DiskInfo(path="/srv/hmnode", total_bytes=500 * 2**30, free_bytes=250 * 2**30),
        network=(
            NetInterface("eth0", ("192.0.2.7", "2001:db8::7"), True, 10_000),
            NetInterface("lo", ("127.0.0.1", "::1"), True, None),
            NetInterface("tunl0", (), False, None),
        ),
        gpu=gpu,
    )


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d["cpu"].pop("model"), "inventory.cpu: missing key(s) 'model'"),
        (lambda d: d["memory"].update(swap=1), "inventory.memory: unexpected key(s) 'swap'"),
        (lambda d: d["cpu"].update(logical_cores=True), "inventory.cpu.logical_cores: expected an integer"),
        (lambda d: d["disk"].update(free_bytes=-1), "inventory.disk.free_bytes: expected a non-negative"),
        (lambda d: d["network"][0]["addresses"].append(5), "inventory.network[0].addresses[2]: expected a string"),
        (lambda d: d.update(taken_at=float("nan")), "inventory.taken_at: expected a finite number"),
    ],
)
def test_malformed_dict_error_names_the_bad_key(mutate: Any, message: str) -> None:
    d = _sample_inventory(GpuReport((), None, "NVML found no GPU")).to_dict()
    mutate(d)
    with pytest.raises(ValueError) as err:
        Inventory.from_dict(d)
    assert message in str(err.value)


@pytest.mark.parametrize("not_a_dict", [None, [], "inventory", 3])
def test_from_dict_rejects_a_non_mapping(not_a_dict: Any) -> None:
    with pytest.raises(ValueError, match="expected a mapping"):
        Inventory.from_dict(not_a_dict)


# ---------------------------------------------------------------------------
# Human-readable summary
# ---------------------------------------------------------------------------


def test_summary_without_gpu_names_cpu_memory_disk_reason_and_addresses() -> None:
    lines = summary_lines(_sample_inventory(GpuReport((), None, "no NVIDIA driver library (libnvidia-ml) found")))
    text = "\n".join(lines)
    assert lines[0].startswith("CPU: AMD EPYC 9654 96-Core Processor")
    assert "96 physical / 192 logical" in lines[0]
    assert "Memory: 16.0 GiB total, 12.0 GiB available" in lines
    assert "Disk: 250.0 GiB free of 500.0 GiB at /srv/hmnode" in lines
    assert "GPU: none (no NVIDIA driver library (libnvidia-ml) found)" in lines
    assert any("eth0" in line and "192.0.2.7" in line and "2001:db8::7" in line for line in lines)
    assert any("lo" in line and "127.0.0.1" in line for line in lines)
    # An interface with no address has nothing to show.
    assert "tunl0" not in text


def test_summary_with_gpus_has_one_line_per_gpu() -> None:
    report = probe_gpus(FakeNvml(_two_gpus()))  # type: ignore[arg-type]
    lines = summary_lines(_sample_inventory(report))
    gpu_lines = [line for line in lines if re.match(r"GPU \d+: ", line)]
    assert len(gpu_lines) == 2
    assert "NVIDIA H100 80GB HBM3" in gpu_lines[0] and "compute 9.0" in gpu_lines[0]
    assert "NVIDIA A100-SXM4-40GB" in gpu_lines[1] and "compute 8.0" in gpu_lines[1]
    assert "GPU driver: 550.54.15" in lines
    assert not any("none" in line for line in lines if line.startswith("GPU"))


def test_summary_warns_about_gpus_left_out() -> None:
    gpus = _two_gpus()
    gpus[1].failing["uuid"] = NVML_ERROR_GPU_IS_LOST
    lines = summary_lines(_sample_inventory(probe_gpus(FakeNvml(gpus))))  # type: ignore[arg-type]
    assert [line for line in lines if re.match(r"GPU \d+: ", line)][0].startswith("GPU 0: NVIDIA H100")
    assert "GPU warning: GPU 1 could not be queried: GPU is lost" in lines


def test_summary_of_the_real_inventory_mentions_cpu_and_gpu(tmp_path: Path) -> None:
    inv = collect_inventory(tmp_path, 0.0)
    text = "\n".join(summary_lines(inv))
    assert inv.cpu.model in text
    if inv.gpu.gpus:
        assert all(g.name in text for g in inv.gpu.gpus)
    else:
        assert f"GPU: none ({inv.gpu.reason})" in text
