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
            value = getattr(self, f.name)
            if value is None:
                continue  # TOML has no null: an unset optional key is left out
            if isinstance(value, (HostPort, Path)):
                value = str(value)
            elif isinstance(value, tuple):
                value = [str(item) for item in value]
            doc.setdefault(section, {})[key] = value
        return doc


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
