"""A node's disk in the simulator: the schema's tables in memory, with committed writes kept
apart from synced ones, so a simulated power loss drops exactly what was not yet durable.

With `sync_on_commit` (the default, as the LMDB store opens its environment) every commit is
durable at once; without it, commits stay in the page cache until `sync`, which shows whether
the code asks for durability where it relies on it. Frozen records are kept as the objects
written (the LMDB store's own tests cover their encodings); plain msgpack values (lists, maps)
are kept encoded, as LMDB keeps them, so that changing what a read returned never changes the
store behind a transaction's back.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from hmnode.schema import AnyCodec, Table

T = TypeVar("T")
_GONE = object()  # a deletion not yet applied to the layer below


class _Layers:
    """Reads through a stack of layers (newest first); each maps table -> encoded key -> record."""

    def __init__(self, layers: list[dict[str, dict[bytes, Any]]]) -> None:
        self.layers = layers

    def get(self, table: str, key: bytes) -> Any:
        for layer in self.layers:
            rows = layer.get(table)
            if rows is not None and key in rows:
                return rows[key]
        return _GONE

    def keys(self, table: str) -> list[bytes]:
        keys: set[bytes] = set()
        for layer in self.layers:
            keys.update(layer.get(table, ()))
        return sorted(k for k in keys if self.get(table, k) is not _GONE)


def _keep(table: Table, record: Any) -> Any:
    return table.codec.encode(record) if isinstance(table.codec, AnyCodec) else record


def _load(table: Table, stored: Any) -> Any:
    return table.codec.decode(stored, table.name) if isinstance(table.codec, AnyCodec) else stored


class SimTxn:
    """A transaction on a SimStore, with `hmnode.store.Txn`'s methods."""

    def __init__(self, below: _Layers, writable: bool) -> None:
        self._writes: dict[str, dict[bytes, Any]] = {}
        self._view = _Layers([self._writes, *below.layers])
        self._writable = writable

    def get(self, table: Table, key: Any, default: Any = None) -> Any:
        record = self._view.get(table.name, table.key.encode(key))
        return default if record is _GONE else _load(table, record)

    def put(self, table: Table, key: Any, record: Any) -> None:
        self._write(table)[table.key.encode(key)] = _keep(table, record)

    def delete(self, table: Table, key: Any) -> bool:
        encoded = table.key.encode(key)
        existed = self._view.get(table.name, encoded) is not _GONE
        self._write(table)[encoded] = _GONE
        return existed

    def items(self, table: Table, reverse: bool = False) -> Iterator[tuple[Any, Any]]:
        keys = self._view.keys(table.name)
        for key in reversed(keys) if reverse else keys:
            yield table.key.decode(key), _load(table, self._view.get(table.name, key))

    def count(self, table: Table) -> int:
        return len(self._view.keys(table.name))

    def _write(self, table: Table) -> dict[bytes, Any]:
        if not self._writable:
            raise RuntimeError("write in a read-only transaction")
        return self._writes.setdefault(table.name, {})


class SimStore:
    """Simulated storage (the `hmnode.env.Storage` protocol) with durable and unsynced writes."""

    def __init__(self, sync_on_commit: bool = True) -> None:
        self.sync_on_commit = sync_on_commit
        self._durable: dict[str, dict[bytes, Any]] = {}
        self._unsynced: dict[str, dict[bytes, Any]] = {}
        self._pending_commits = 0

    def read(self, fn: Callable[[SimTxn], T]) -> T:
        """Run `fn` on what is committed (synced or not: a running process sees both)."""
        return fn(SimTxn(_Layers([self._unsynced, self._durable]), writable=False))

    def write(self, fn: Callable[[SimTxn], T]) -> T:
        """Run `fn` in one transaction and commit it: all of it, or none if `fn` raises."""
        txn = SimTxn(_Layers([self._unsynced, self._durable]), writable=True)
        result = fn(txn)
        for table, rows in txn._writes.items():
            self._unsynced.setdefault(table, {}).update(rows)
        self._pending_commits += 1
        if self.sync_on_commit:
            self.sync()
        return result

    def sync(self) -> None:
        """Make every committed write durable."""
        for table, rows in self._unsynced.items():
            target = self._durable.setdefault(table, {})
            for key, record in rows.items():
                if record is _GONE:
                    target.pop(key, None)
                else:
                    target[key] = record
        self._unsynced.clear()
        self._pending_commits = 0

    def crash(self) -> int:
        """Power loss: drop every commit not yet synced; returns how many were lost."""
        lost = self._pending_commits
        self._unsynced.clear()
        self._pending_commits = 0
        return lost
