"""The config schema and its loading: CLI flag > environment > config.toml > defaults.

This module is the one place that knows the config's keys; everything else reads `Config`.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from hmnode.errors import ConfigError
from hmnode.identity import NodeId
from hmnode.share_policy import TimeWindow

DEFAULT_PORT = 4819
ENV_DATA_DIR = "HMNODE_DATA_DIR"


@dataclass(frozen=True)
class HostPort:
    """A listen or peer address; `host` is a literal IP or a name, `port` 0 means any free port."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @classmethod
    def parse(cls, text: str) -> "HostPort":
        """Parse `HOST:PORT` or `[IPv6]:PORT`; raises ValueError with the expected form."""
        if not isinstance(text, str):
            raise ValueError("expected a string HOST:PORT")
        if text.startswith("["):
            host, sep, port_text = text[1:].partition("]:")
            if not sep:
                raise ValueError(f"expected [IPv6]:PORT, got {text!r}")
            ipaddress.IPv6Address(host)  # raises ValueError naming the bad address
        else:
            host, sep, port_text = text.rpartition(":")
            if not sep or not host or ":" in host:
                raise ValueError(f"expected HOST:PORT (IPv6 in brackets), got {text!r}")
        # isdigit() alone accepts non-ASCII digits such as "\u0663", which int() reads as 3.
        if not (port_text.isascii() and port_text.isdigit()) or not 0 <= int(port_text) <= 65535:
            raise ValueError(f"port must be a number from 0 to 65535, got {port_text!r}")
        return cls(host, int(port_text))


@dataclass(frozen=True)
class PeerAddress:
    """A bootstrap peer: `ID@HOST:PORT` (pinned to a node id) or `HOST:PORT` (unpinned)."""

    addr: HostPort
    node_id: NodeId | None = None

    def __str__(self) -> str:
        return f"{self.node_id}@{self.addr}" if self.node_id else str(self.addr)

    @classmethod
    def parse(cls, text: str) -> "PeerAddress":
        """Parse either form; raises ValueError naming what is wrong."""
        if not isinstance(text, str):
            raise ValueError("expected a string ID@HOST:PORT or HOST:PORT")
        node_text, at, addr_text = text.rpartition("@")
        node_id = NodeId.parse(node_text) if at else None
        addr = HostPort.parse(addr_text)
        if addr.port == 0:
            raise ValueError(f"a peer's port cannot be 0: {text!r}")
        return cls(addr, node_id)


@dataclass(frozen=True)
class Amount:
    """How much of something the node shares or keeps: a share of it ("50%") or a quantity
    (a count of cores, or bytes: "8 GiB", "512 MiB")."""

    value: float
    percent: bool
    text: str

    def of(self, total: int) -> int:
        """The amount, out of `total`."""
        return int(total * self.value / 100) if self.percent else int(self.value)

    def __str__(self) -> str:
        return self.text


_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1000, "kib": 1 << 10, "m": 1 << 20, "mb": 10**6,
          "mib": 1 << 20, "g": 1 << 30, "gb": 10**9, "gib": 1 << 30, "t": 1 << 40,
          "tb": 10**12, "tib": 1 << 40}


def _amount(unit: str) -> Callable[[Any], Amount]:
    """A percent, or a count ("cores") or a size in bytes ("bytes") with an optional unit."""
    def parse(value: Any) -> Amount:
        text = str(value).strip() if isinstance(value, int | float | str) and \
            not isinstance(value, bool) else ""
        number, _, suffix = text.lower().replace(" ", "").partition("%")
        try:
            if text.endswith("%") and not suffix:
                percent = float(number)
                if not 0 <= percent <= 100:
                    raise ValueError
                return Amount(percent, True, text)
            digits = number.rstrip("abcdefghijklmnopqrstuvwxyz")
            scale = _UNITS[number[len(digits):]] if unit == "bytes" else (
                1 if number == digits else None)
            if scale is None or float(digits) < 0:
                raise ValueError
            return Amount(float(digits) * scale, False, text)
        except (ValueError, KeyError):
            example = "'4' or '50%'" if unit == "cores" else "'8 GiB', '512 MiB' or '50%'"
            raise ValueError(f"expected {example}, got {value!r}") from None
    return parse


def _windows(value: Any) -> tuple[TimeWindow, ...]:
    # The environment gives one ';'-separated string; TOML and flags give a list.
    items = [v for v in value.split(";") if v.strip()] if isinstance(value, str) else value
    if not isinstance(items, list | tuple):
        raise ValueError("expected a list of windows such as 'Mon-Fri 18:00-08:00'")
    return tuple(TimeWindow.parse(item) for item in items)


def _gpus(value: Any) -> str | tuple[int, ...]:
    """"all", "none", or the indices of the GPUs to share (as `hmnode assets` lists them)."""
    if isinstance(value, str) and value.strip().lower() in ("all", "none"):
        return value.strip().lower()
    items = [v for v in value.split(",") if v.strip()] if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not items:
        raise ValueError(f"expected 'all', 'none' or a list of GPU indices, got {value!r}")
    return tuple(sorted({_count(0, 63)(item.strip() if isinstance(item, str) else item)
                         for item in items}))


def _allow(value: Any) -> str | tuple[NodeId, ...]:
    """Whose jobs the node takes: "everyone", "owner" (only this node's own) or node ids."""
    if isinstance(value, str) and value.strip().lower() in ("everyone", "owner"):
        return value.strip().lower()
    items = [v for v in value.split(",") if v.strip()] if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not items:
        raise ValueError(f"expected 'everyone', 'owner' or a list of node ids, got {value!r}")
    try:
        return tuple(NodeId.parse(item.strip()) for item in items)
    except ValueError as exc:
        raise ValueError(f"expected 'everyone', 'owner' or a list of node ids ({exc})") from None


def _number(low: float, high: float) -> Callable[[Any], float]:
    def parse(value: Any) -> float:
        try:
            number = float(value) if isinstance(value, str | int | float) and \
                not isinstance(value, bool) else None
        except ValueError:
            number = None
        if number is None or not low <= number <= high:
            raise ValueError(f"expected a number from {low:g} to {high:g}, got {value!r}")
        return number
    return parse


def _gpu_prices(value: Any) -> tuple[tuple[str, int], ...]:
    """Per-model GPU-hour prices: a TOML table {model = price}, or "MODEL=PRICE,..."."""
    if isinstance(value, str):
        pairs = [p.partition("=")[::2] for p in value.split(",") if p.strip()]
        value = {k.strip(): v.strip() for k, v in pairs}
    if value == []:  # an empty table, as a list without pairs writes it
        return ()
    if not isinstance(value, dict):
        raise ValueError("expected a table of GPU model = credits per GPU-hour")
    return tuple(sorted((str(k), _count(0, 1 << 40)(v)) for k, v in value.items()))


# --- value parsers: each takes a TOML value or an environment/flag string -------------------


def _peers(value: Any) -> tuple[PeerAddress, ...]:
    # The environment gives one comma-separated string; TOML and flags give a list.
    items = [v for v in value.split(",") if v.strip()] if isinstance(value, str) else value
    if not isinstance(items, list | tuple):
        raise ValueError("expected a list of ID@HOST:PORT or HOST:PORT strings")
    return tuple(PeerAddress.parse(item.strip() if isinstance(item, str) else item) for item in items)


def _hostport(value: Any) -> HostPort:
    return HostPort.parse(value)


def _choice(*choices: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if not isinstance(value, str) or value.lower() not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {value!r}")
        return value.lower()

    return parse


def _seconds(low: float, high: float) -> Callable[[Any], float]:
    def parse(value: Any) -> float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ValueError(f"expected a number of seconds, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"expected a number of seconds, got {value!r}")
        if not low <= value <= high:
            raise ValueError(f"expected {low:g} to {high:g} seconds, got {value!r}")
        return float(value)

    return parse


def _count(low: int, high: int) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(f"expected a whole number from {low} to {high}, got {value!r}")
        return value

    return parse


def _flag(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
        return value.strip().lower() in ("true", "1", "yes", "on")
    raise ValueError(f"expected true or false, got {value!r}")


def _optional_hostport(value: Any) -> HostPort | None:
    if value is None or value == "" or (isinstance(value, str) and value.lower() == "off"):
        return None
    return HostPort.parse(value)


def _optional_path(value: Any) -> Path | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ValueError(f"expected a file path, got {value!r}")
    return Path(value).expanduser()


def _setting(key: str, default: Any, parse: Callable[[Any], Any], env: str, help: str) -> Any:
    return field(default=default, metadata={"key": key, "parse": parse, "env": env, "help": help})


@dataclass(frozen=True)
class Config:
    """The agent's effective settings. Field metadata is the schema: TOML key, parser, env var."""

    listen: HostPort = _setting(
        "node.listen", HostPort("0.0.0.0", DEFAULT_PORT), _hostport, "HMNODE_LISTEN",
        "UDP address the node's QUIC endpoint binds (HOST:PORT)",
    )
    bootstrap: tuple[PeerAddress, ...] = _setting(
        "node.bootstrap", (), _peers, "HMNODE_BOOTSTRAP",
        "peers to join through at start: ID@HOST:PORT, or HOST:PORT (unpinned)",
    )
    max_connections: int = _setting(
        "transport.max_connections", 256, _count(1, 100_000), "HMNODE_MAX_CONNECTIONS",
        "most QUIC connections the node holds at once",
    )
    max_connections_per_ip: int = _setting(
        "transport.max_connections_per_ip", 16, _count(1, 100_000), "HMNODE_MAX_CONNECTIONS_PER_IP",
        "most connections from one IP address (raise it when many peers share one NAT)",
    )
    relay_enabled: bool = _setting(
        "relay.enabled", True, _flag, "HMNODE_RELAY_ENABLED",
        "offer relay reservations to private nodes when this node is publicly reachable",
    )
    relay_max_reservations: int = _setting(
        "relay.max_reservations", 128, _count(0, 100_000), "HMNODE_RELAY_MAX_RESERVATIONS",
        "most private nodes this node relays for at once",
    )
    relay_max_circuits_per_peer: int = _setting(
        "relay.max_circuits_per_peer", 16, _count(1, 10_000), "HMNODE_RELAY_MAX_CIRCUITS_PER_PEER",
        "most relayed connections one peer may have through this node",
    )
    relay_circuit_mib: int = _setting(
        "relay.circuit_mib", 64, _count(1, 1 << 20), "HMNODE_RELAY_CIRCUIT_MIB",
        "MiB one relayed connection may carry before the relay ends it",
    )
    relay_circuit_s: float = _setting(
        "relay.circuit_s", 3600.0, _seconds(10, 86400 * 7), "HMNODE_RELAY_CIRCUIT_S",
        "seconds one relayed connection may last before the relay ends it",
    )
    chain_genesis: Path | None = _setting(
        "chain.genesis", None, _optional_path, "HMNODE_CHAIN_GENESIS",
        "genesis file of the chain to run (empty: the store's chain, else the first bootstrap "
        "peer's, else a new chain with this node as its one validator)",
    )
    chain_empty_block_s: float = _setting(
        "chain.empty_block_s", 60.0, _seconds(1, 86400 * 7), "HMNODE_CHAIN_EMPTY_BLOCK_S",
        "seconds after the last block before validators commit an empty one",
    )
    share_enabled: bool = _setting(
        "share.enabled", True, _flag, "HMNODE_SHARE_ENABLED",
        "offer this machine's cores and half its memory to the mesh, for the wasm runtime",
    )
    share_cores: Amount = _setting(
        "share.cores", Amount(100, True, "100%"), _amount("cores"), "HMNODE_SHARE_CORES",
        "cores to share: a count ('4') or a share of the machine's ('50%')",
    )
    share_memory: Amount = _setting(
        "share.memory", Amount(50, True, "50%"), _amount("bytes"), "HMNODE_SHARE_MEMORY",
        "memory to share: '8 GiB', '512 MiB' or a share of the machine's ('50%')",
    )
    share_storage: Amount = _setting(
        "share.storage", Amount(1 << 30, False, "1 GiB"), _amount("bytes"),
        "HMNODE_SHARE_STORAGE",
        "disk for other nodes' blobs (programs, inputs) kept after their jobs: a size or a "
        "share of the disk",
    )
    share_gpus: Any = _setting(
        "share.gpus", "all", _gpus, "HMNODE_SHARE_GPUS",
        "GPUs to share with process jobs: 'all', 'none' or their indices ([0, 2])",
    )
    share_windows: tuple[TimeWindow, ...] = _setting(
        "share.windows", (), _windows, "HMNODE_SHARE_WINDOWS",
        "when to share, such as ['Mon-Fri 18:00-08:00', 'Sat,Sun'] (empty: at any time)",
    )
    share_idle_only: bool = _setting(
        "share.idle_only", False, _flag, "HMNODE_SHARE_IDLE_ONLY",
        "share only when no one uses the machine (no input, no other CPU load) for a while",
    )
    share_idle_minutes: float = _setting(
        "share.idle_minutes", 3.0, _number(0, 1440), "HMNODE_SHARE_IDLE_MINUTES",
        "minutes without input and other CPU load before an idle-only node shares",
    )
    share_idle_cpu_percent: float = _setting(
        "share.idle_cpu_percent", 25.0, _number(0, 100), "HMNODE_SHARE_IDLE_CPU_PERCENT",
        "CPU load of other programs (percent of all cores) above which the machine is in use",
    )
    share_pause_on_battery: bool = _setting(
        "share.pause_on_battery", True, _flag, "HMNODE_SHARE_PAUSE_ON_BATTERY",
        "pause sharing while the machine runs on battery",
    )
    share_max_cpu_temp_c: float = _setting(
        "share.max_cpu_temp_c", 90.0, _number(0, 150), "HMNODE_SHARE_MAX_CPU_TEMP_C",
        "pause above this CPU temperature, resume 5 degrees below it (0: no limit)",
    )
    share_max_gpu_temp_c: float = _setting(
        "share.max_gpu_temp_c", 85.0, _number(0, 150), "HMNODE_SHARE_MAX_GPU_TEMP_C",
        "pause above this GPU temperature, resume 5 degrees below it (0: no limit)",
    )
    share_keep_free_disk: Amount = _setting(
        "share.keep_free_disk", Amount(1 << 30, False, "1 GiB"), _amount("bytes"),
        "HMNODE_SHARE_KEEP_FREE_DISK",
        "pause when the data dir's disk has less free than this (a size or a share of it)",
    )
    share_allow: Any = _setting(
        "share.allow", "everyone", _allow, "HMNODE_SHARE_ALLOW",
        "whose jobs to run: 'everyone', 'owner' (this node's own) or a list of node ids",
    )
    share_grace_s: float = _setting(
        "share.grace_s", 300.0, _seconds(0, 86400), "HMNODE_SHARE_GRACE_S",
        "seconds a paused node keeps its jobs suspended before giving them back to the mesh",
    )
    price_core_hour: int = _setting(
        "price.core_hour", 10, _count(0, 1 << 40), "HMNODE_PRICE_CORE_HOUR",
        "credits per core-hour",
    )
    price_gib_hour: int = _setting(
        "price.gib_hour", 1, _count(0, 1 << 40), "HMNODE_PRICE_GIB_HOUR",
        "credits per GiB-hour of memory",
    )
    price_gpu_hour: int = _setting(
        "price.gpu_hour", 100, _count(0, 1 << 40), "HMNODE_PRICE_GPU_HOUR",
        "credits per GPU-hour (for models not in price.gpu_models)",
    )
    price_gpu_models: tuple[tuple[str, int], ...] = _setting(
        "price.gpu_models", (), _gpu_prices, "HMNODE_PRICE_GPU_MODELS",
        "credits per GPU-hour by model, such as {\"NVIDIA A100-SXM4-80GB\" = 300}",
    )
    price_start_fee: int = _setting(
        "price.start_fee", 1, _count(0, 1 << 40), "HMNODE_PRICE_START_FEE",
        "credits per job, on top of its resources",
    )
    price_dynamic: float = _setting(
        "price.dynamic", 0.0, _number(0, 1), "HMNODE_PRICE_DYNAMIC",
        "how far prices follow this node's load: from (1 - d) times the prices when idle to "
        "(1 + d) times when full (0: fixed prices)",
    )
    price_floor: float = _setting(
        "price.floor", 0.0, _number(0, 1), "HMNODE_PRICE_FLOOR",
        "the lowest share of the set prices the dynamic factor may go down to",
    )
    metrics_listen: HostPort | None = _setting(
        "metrics.listen", HostPort("127.0.0.1", 9464), _optional_hostport,
        "HMNODE_METRICS_LISTEN",
        "where Prometheus scrapes /metrics (HOST:PORT; empty: no metrics endpoint)",
    )
    share_process: bool = _setting(
        "share.process", False, _flag, "HMNODE_SHARE_PROCESS",
        "also run `process` jobs (native commands, in a sandbox of namespaces and rlimits)",
    )
    share_unsandboxed: bool = _setting(
        "share.unsandboxed", False, _flag, "HMNODE_SHARE_UNSANDBOXED",
        "run process jobs even where the kernel forbids the sandbox's namespaces (rlimits only)",
    )
    log_level: str = _setting(
        "log.level", "info", _choice("debug", "info", "warning", "error"), "HMNODE_LOG_LEVEL",
        "least severe log level written",
    )
    log_format: str = _setting(
        "log.format", "text", _choice("text", "json"), "HMNODE_LOG_FORMAT",
        "text for people, json (one object a line) for machines",
    )
    inventory_interval_s: float = _setting(
        "inventory.interval_s", 60.0, _seconds(1, 86400), "HMNODE_INVENTORY_INTERVAL_S",
        "seconds between hardware inventory refreshes",
    )

    def to_toml(self) -> dict[str, dict[str, Any]]:
        """The config as a TOML document (sections and keys), for writing config.toml."""
        doc: dict[str, dict[str, Any]] = {}
        for f in dataclasses.fields(self):
            section, key = f.metadata["key"].split(".")
            value = _toml_value(getattr(self, f.name))
            if value is not None:  # TOML has no null: an unset optional key is left out
                doc.setdefault(section, {})[key] = value
        return doc

    def show(self, *prefixes: str) -> dict[str, Any]:
        """The settings whose keys start with one of `prefixes` ("share."), as TOML writes
        them."""
        return {f.metadata["key"]: _toml_value(getattr(self, f.name))
                for f in dataclasses.fields(self) if f.metadata["key"].startswith(prefixes)}


def _toml_value(value: Any) -> Any:
    """A setting's value as config.toml holds it."""
    if isinstance(value, (HostPort, Path, Amount)):
        return str(value)
    if isinstance(value, tuple) and value and isinstance(value[0], tuple):
        return dict(value)  # price.gpu_models
    if isinstance(value, tuple):
        return [item if isinstance(item, int) else
                item.text if isinstance(item, TimeWindow) else str(item) for item in value]
    return value


SETTINGS: dict[str, dataclasses.Field] = {f.metadata["key"]: f for f in dataclasses.fields(Config)}


def default_data_dir(env: Mapping[str, str] | None = None) -> Path:
    """$HMNODE_DATA_DIR, else $XDG_DATA_HOME/hmnode, else ~/.local/share/hmnode."""
    env = os.environ if env is None else env
    if env.get(ENV_DATA_DIR):
        return Path(env[ENV_DATA_DIR]).expanduser()
    xdg = env.get("XDG_DATA_HOME")
    base = Path(xdg).expanduser() if xdg and Path(xdg).is_absolute() else Path.home() / ".local/share"
    return base / "hmnode"


def read_config_file(path: Path) -> dict[str, Any]:
    """The file's settings as {dotted key: parsed value}; a missing file is empty."""
    try:
        with path.open("rb") as fh:
            doc = tomllib.load(fh)
    except FileNotFoundError:
        return {}
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}; fix or remove the file") from exc
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    values: dict[str, Any] = {}
    for section, table in doc.items():
        if not _is_section(section):
            raise ConfigError(_unknown(section, path))
        if not isinstance(table, dict):
            raise ConfigError(f"[{section}] in {path} must be a table of keys")
        for name, raw in table.items():
            key = f"{section}.{name}"
            if key not in SETTINGS:
                raise ConfigError(_unknown(key, path))
            values[key] = _parse(key, raw, f"in {path}")
    return values


def load_config(
    path: Path,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> Config:
    """Merge defaults, the config file at `path`, HMNODE_* variables and CLI flags (by dotted key)."""
    env = os.environ if env is None else env
    values = read_config_file(path)
    for key, f in SETTINGS.items():
        if f.metadata["env"] in env:
            values[key] = _parse(key, env[f.metadata["env"]], f"in ${f.metadata['env']}")
    for key, raw in (flags or {}).items():
        if raw is not None:
            values[key] = _parse(key, raw, "on the command line")
    return Config(**{SETTINGS[key].name: value for key, value in values.items()})


def add_bootstrap(path: Path, peer: PeerAddress) -> bool:
    """Record `peer` in the file's node.bootstrap (replacing an entry for the same address);
    returns False if it was already there. Other settings in the file are kept."""
    try:
        with path.open("rb") as fh:
            doc = tomllib.load(fh)
    except FileNotFoundError:
        doc = {}
    except (tomllib.TOMLDecodeError, OSError) as exc:
        raise ConfigError(f"cannot update {path}: {exc}") from exc
    read_config_file(path)  # refuse to rewrite a file that does not validate
    current = [PeerAddress.parse(p) for p in doc.get("node", {}).get("bootstrap", [])]
    if peer in current:
        return False
    kept = [p for p in current if p.addr != peer.addr]
    doc.setdefault("node", {})["bootstrap"] = [str(p) for p in [*kept, peer]]
    _write_doc(path, doc)
    return True


def set_config_values(path: Path, values: Mapping[str, Any]) -> dict[str, Any]:
    """Set settings (by dotted key) in the file, checked as a start would check them, keeping
    the others; the values as written. ConfigError names the first bad one, and then nothing
    is written."""
    try:
        with path.open("rb") as fh:
            doc = tomllib.load(fh)
    except FileNotFoundError:
        doc = {}
    except (tomllib.TOMLDecodeError, OSError) as exc:
        raise ConfigError(f"cannot update {path}: {exc}") from exc
    read_config_file(path)  # refuse to rewrite a file that does not validate
    written = {}
    for key, raw in values.items():
        if key not in SETTINGS:
            raise ConfigError(_unknown(key, path))
        value = _toml_value(_parse(key, raw, "as given"))
        section, name = key.split(".")
        if value is None:
            doc.get(section, {}).pop(name, None)
        else:
            doc.setdefault(section, {})[name] = value
        written[key] = value
    try:
        _write_doc(path, doc)
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror}") from exc
    return written


def write_config(path: Path, config: Config) -> None:
    """Write config.toml atomically (temp file, fsync, rename)."""
    _write_doc(path, config.to_toml())


def _write_doc(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as fh:
        tomli_w.dump(doc, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _parse(key: str, raw: Any, where: str) -> Any:
    try:
        return SETTINGS[key].metadata["parse"](raw)
    except ValueError as exc:
        raise ConfigError(f"bad value for {key} {where}: {exc}") from None


def _is_section(name: str) -> bool:
    return any(key.split(".")[0] == name for key in SETTINGS)


def _unknown(key: str, path: Path) -> str:
    close = difflib.get_close_matches(key, SETTINGS, n=1)
    hint = f"; did you mean {close[0]}?" if close else f"; known keys: {', '.join(SETTINGS)}"
    return f"unknown key {key} in {path}{hint}"
