"""The LMDB schema: its version, every sub-database, and the record type each one holds.

This module is the one place that knows how state is laid out on disk; the store and the rest
of the agent import the tables from here. Bump SCHEMA_VERSION (and add a migration in the store)
whenever a table's keys or record fields change meaning.
"""

from __future__ import annotations

import dataclasses
import struct
import types
import typing
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import msgpack

from hmnode.adverts import Advert, AdvertRejected
from hmnode.errors import StoreCorrupt
from hmnode.hardware import Inventory

SCHEMA_VERSION = 1

R = TypeVar("R")
K = TypeVar("K")


# --- records ------------------------------------------------------------------------------


@dataclass(frozen=True)
class AgentRun:
    """One run of the agent on this data dir; `stopped_at` stays None if it never stopped cleanly."""

    started_at: float
    pid: int
    version: str
    stopped_at: float | None = None
    exit_reason: str | None = None


@dataclass(frozen=True)
class KnownPeer:
    """A peer this node has met, and where: what a restarted node rejoins through."""

    addr: str
    last_seen: float


@dataclass(frozen=True)
class NodeEvent:
    """A line of the node's own history (started, stopped, subsystem failed, ...)."""

    at: float
    kind: str
    detail: str


# --- codecs -------------------------------------------------------------------------------


def _pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def _unpack(raw: bytes, table: str) -> Any:
    try:
        return msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except (ValueError, msgpack.UnpackException) as exc:
        raise StoreCorrupt(f"a value in table {table!r} is not valid msgpack: {exc}") from exc


def _type_ok(value: Any, hint: Any) -> bool:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


class DataclassCodec(Generic[R]):
    """A flat dataclass of scalars as a msgpack map; decoding checks every field and its type."""

    def __init__(self, cls: type[R]) -> None:
        self.cls = cls
        self._hints = typing.get_type_hints(cls)
        self._names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]

    def encode(self, record: R) -> bytes:
        # Refuse at write time what decode would refuse at read time: nothing unreadable is stored.
        if not isinstance(record, self.cls):
            raise ValueError(f"expected a {self.cls.__name__}, got {type(record).__name__}")
        data = dataclasses.asdict(record)  # type: ignore[call-overload]
        self._check(data, ValueError, "refusing to store")
        return _pack(data)

    def decode(self, raw: bytes, table: str) -> R:
        data = _unpack(raw, table)
        if not isinstance(data, dict) or set(data) != self._names:
            raise StoreCorrupt(f"a record in table {table!r} is not a {self.cls.__name__}")
        self._check(data, StoreCorrupt, f"in table {table!r}")
        return self.cls(**data)

    def _check(self, data: dict[str, Any], error: type[Exception], where: str) -> None:
        for name, value in data.items():
            if not _type_ok(value, self._hints[name]):
                raise error(f"{where}: {self.cls.__name__}.{name} has a bad type "
                            f"({type(value).__name__})")


class InventoryCodec:
    """The hardware inventory, through its own dict form."""

    def encode(self, record: Inventory) -> bytes:
        data = record.to_dict()
        Inventory.from_dict(data)  # raises ValueError for what could not be read back
        return _pack(data)

    def decode(self, raw: bytes, table: str) -> Inventory:
        try:
            return Inventory.from_dict(_unpack(raw, table))
        except (ValueError, TypeError) as exc:
            raise StoreCorrupt(f"the inventory in table {table!r} is damaged: {exc}") from exc


class AdvertCodec:
    """A signed advert, through its wire form (the signature is checked again when loaded)."""

    def encode(self, record: Advert) -> bytes:
        return _pack(record.to_wire())

    def decode(self, raw: bytes, table: str) -> Any:
        try:
            return Advert.from_wire(_unpack(raw, table))
        except AdvertRejected as exc:
            raise StoreCorrupt(f"an advert in table {table!r} is damaged: {exc}") from exc


class AnyCodec:
    """Plain msgpack values (for the meta table's scalars)."""

    def encode(self, record: Any) -> bytes:
        return _pack(record)

    def decode(self, raw: bytes, table: str) -> Any:
        return _unpack(raw, table)


class SeqKey:
    """A 64-bit sequence number, big-endian so that LMDB's byte order is numeric order."""

    @staticmethod
    def encode(key: int) -> bytes:
        return struct.pack(">Q", key)

    @staticmethod
    def decode(raw: bytes) -> int:
        return struct.unpack(">Q", raw)[0]


class BytesKey:
    """Raw bytes (node ids as their 32-byte keys)."""

    @staticmethod
    def encode(key: bytes) -> bytes:
        return key

    @staticmethod
    def decode(raw: bytes) -> bytes:
        return bytes(raw)


class TextKey:
    """A UTF-8 string key."""

    @staticmethod
    def encode(key: str) -> bytes:
        return key.encode("utf-8")

    @staticmethod
    def decode(raw: bytes) -> str:
        return raw.decode("utf-8")


@dataclass(frozen=True)
class Table(Generic[K, R]):
    """A named LMDB sub-database with its key and record codecs."""

    name: str
    key: Any
    codec: Any


# --- tables -------------------------------------------------------------------------------

META: Table[str, Any] = Table("meta", TextKey, AnyCodec())
RUNS: Table[int, AgentRun] = Table("runs", SeqKey, DataclassCodec(AgentRun))
EVENTS: Table[int, NodeEvent] = Table("events", SeqKey, DataclassCodec(NodeEvent))
INVENTORY: Table[str, Inventory] = Table("inventory", TextKey, InventoryCodec())

PEERS: Table[bytes, KnownPeer] = Table("peers", BytesKey, DataclassCodec(KnownPeer))
ADVERTS: Table[bytes, Advert] = Table("adverts", BytesKey, AdvertCodec())

# The chain (hmnode.consensus.chain): blocks and their commit certificates by height, encoded as
# on the wire; the head and genesis; what each transaction did; every sender's last nonce; the
# validator set of each epoch; this validator's signing state (persisted before it sends) and
# the equivocation evidence it has seen.
CHAIN: Table[str, Any] = Table("chain", TextKey, AnyCodec())
BLOCKS: Table[int, bytes] = Table("blocks", SeqKey, AnyCodec())
CERTIFICATES: Table[int, bytes] = Table("certificates", SeqKey, AnyCodec())
TX_RESULTS: Table[bytes, list] = Table("tx_results", BytesKey, AnyCodec())
NONCES: Table[bytes, int] = Table("nonces", BytesKey, AnyCodec())
VALIDATOR_SETS: Table[int, list] = Table("validator_sets", SeqKey, AnyCodec())
SIGNER: Table[str, list] = Table("signer", TextKey, AnyCodec())
EVIDENCE: Table[bytes, bytes] = Table("evidence", BytesKey, AnyCodec())
# The key-value application (hmnode.consensus.kvapp): its keys, and the validator power each
# validator asked for (applied at the next epoch boundary).
KV: Table[bytes, bytes] = Table("kv", BytesKey, AnyCodec())
KV_POWER: Table[bytes, int] = Table("kv_power", BytesKey, AnyCodec())

# The ledger (hmnode.ledger): [balance, stake] per account; unbonding stake per account as
# [[release height, amount], ...]; each job's escrow as [payer, amount]; the running totals.
LEDGER_ACCOUNTS: Table[bytes, list] = Table("ledger_accounts", BytesKey, AnyCodec())
LEDGER_UNBONDING: Table[bytes, list] = Table("ledger_unbonding", BytesKey, AnyCodec())
LEDGER_ESCROW: Table[bytes, list] = Table("ledger_escrow", BytesKey, AnyCodec())
LEDGER_TOTALS: Table[str, dict] = Table("ledger_totals", TextKey, AnyCodec())
# The state machine (hmnode.state_machine): its rules and who is jailed; the equivocations
# already punished (evidence id -> height).
STATE: Table[str, Any] = Table("state", TextKey, AnyCodec())
SLASHED: Table[bytes, int] = Table("slashed", BytesKey, AnyCodec())
# Offers by node ({"offer": [...], "used": [cores, memory_mib, {model: gpus}, {runtime: jobs}]}
# taken by its running jobs), jobs by id (a
# map with their state and history), and the index of live jobs: b"q" + submission number (8
# bytes) + id for queued ones (oldest first), b"a" + id for allocated ones.
OFFERS: Table[bytes, dict] = Table("offers", BytesKey, AnyCodec())
JOBS: Table[bytes, dict] = Table("jobs", BytesKey, AnyCodec())
JOB_INDEX: Table[bytes, bytes] = Table("job_index", BytesKey, AnyCodec())
# Registered nodes (hmnode.registry): {"registered": height, "plot": plot commitment (wire),
# "answered": the last beacon period its space proof answered, "suspended": why, or None}.
NODES: Table[bytes, dict] = Table("nodes", BytesKey, AnyCodec())

# This node's own workloads (not replicated): blobs it holds by id ({"size", "pinned", "added",
# "used"}; the bytes are files, hmnode.blobs), and the jobs it runs or ran by job id
# ({"state": running | finished | reported, "started", "finished", "result", "receipt"}).
BLOBS: Table[bytes, dict] = Table("blobs", BytesKey, AnyCodec())
EXECUTIONS: Table[bytes, dict] = Table("executions", BytesKey, AnyCodec())

TABLES: tuple[Table, ...] = (META, RUNS, EVENTS, INVENTORY, PEERS, ADVERTS, CHAIN, BLOCKS,
                             CERTIFICATES, TX_RESULTS, NONCES, VALIDATOR_SETS, SIGNER, EVIDENCE,
                             KV, KV_POWER, LEDGER_ACCOUNTS, LEDGER_UNBONDING, LEDGER_ESCROW,
                             LEDGER_TOTALS, STATE, SLASHED, OFFERS, JOBS, JOB_INDEX, NODES,
                             BLOBS, EXECUTIONS)

# Keys of the meta table.
META_SCHEMA_VERSION = "schema_version"
META_CREATED_AT = "created_at"
META_NODE_ID = "node_id"
# The one key of the inventory table: the newest snapshot.
INVENTORY_LATEST = "latest"
# Events are a bounded history: older ones are dropped past this many.
EVENTS_KEPT = 10_000
# Known peers kept on disk: the most recently seen survive.
PEERS_KEPT = 1_000

# Keys of the chain table.
CHAIN_GENESIS = "genesis"
CHAIN_HEAD = "head"
# The one key of the signer table.
SIGNER_STATE = "state"
