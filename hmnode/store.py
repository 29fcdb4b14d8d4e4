"""The node's LMDB store: one environment, the schema's named sub-databases, msgpack values.

Every write runs as a function inside one write transaction, so writes that belong together
commit together or not at all; when the map is full the store grows it and runs the function
again, rather than failing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import lmdb

from hmnode import __version__
from hmnode import schema
from hmnode.errors import SchemaTooNew, StoreError
from hmnode.schema import Table

log = logging.getLogger(__name__)

T = TypeVar("T")

INITIAL_MAP_SIZE = 16 << 20
# Growing doubles the map, but never past this in one step, so a big store grows in bounded steps.
MAX_GROWTH_STEP = 1 << 30
MAX_TABLES = 32


class Txn:
    """A transaction seen through the schema's tables: typed keys and records."""

    def __init__(self, txn: lmdb.Transaction, dbs: dict[str, Any]) -> None:
        self._txn = txn
        self._dbs = dbs

    def get(self, table: Table, key: Any, default: Any = None) -> Any:
        raw = self._txn.get(table.key.encode(key), db=self._dbs[table.name])
        return default if raw is None else table.codec.decode(raw, table.name)

    def put(self, table: Table, key: Any, record: Any) -> None:
        self._txn.put(table.key.encode(key), table.codec.encode(record), db=self._dbs[table.name])

    def delete(self, table: Table, key: Any) -> bool:
        return self._txn.delete(table.key.encode(key), db=self._dbs[table.name])

    def items(self, table: Table, reverse: bool = False) -> Iterator[tuple[Any, Any]]:
        """(key, record) pairs in key order (or reversed)."""
        with self._txn.cursor(db=self._dbs[table.name]) as cur:
            positioned = cur.last() if reverse else cur.first()
            step = cur.prev if reverse else cur.next
            while positioned:
                yield table.key.decode(cur.key()), table.codec.decode(cur.value(), table.name)
                positioned = step()

    def count(self, table: Table) -> int:
        return self._txn.stat(self._dbs[table.name])["entries"]

    def last_key(self, table: Table) -> Any:
        """The greatest key in the table, or None when it is empty."""
        with self._txn.cursor(db=self._dbs[table.name]) as cur:
            return table.key.decode(cur.key()) if cur.last() else None

    def append(self, table: Table, record: Any) -> int:
        """Put a record under the next sequence number of a SeqKey table and return that number."""
        last = self.last_key(table)
        key = 1 if last is None else last + 1
        self.put(table, key, record)
        return key


class Store:
    """The open LMDB environment of one data dir."""

    def __init__(self, path: Path, env: lmdb.Environment, dbs: dict[str, Any]) -> None:
        self.path = path
        self._env = env
        self._dbs = dbs

    @classmethod
    def open(cls, path: Path, *, map_size: int = INITIAL_MAP_SIZE) -> "Store":
        """Open (or create) the store at `path`, checking its schema version."""
        try:
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
            env = lmdb.open(
                str(path), map_size=map_size, max_dbs=MAX_TABLES, subdir=True,
                sync=True, metasync=True, readahead=False, mode=0o600,
            )
        except (lmdb.Error, OSError) as exc:
            raise StoreError(f"cannot open the store at {path}: {exc}") from exc
        # A newer schema must be refused before this version creates or touches anything.
        try:
            with env.begin() as txn:
                meta_db = env.open_db(schema.META.name.encode(), txn=txn, create=False)
                raw = txn.get(schema.META.key.encode(schema.META_SCHEMA_VERSION), db=meta_db)
        except lmdb.NotFoundError:
            raw = None
        found = None if raw is None else schema.META.codec.decode(raw, schema.META.name)
        if isinstance(found, int) and found > schema.SCHEMA_VERSION:
            env.close()
            raise SchemaTooNew(
                f"the store at {path} has schema version {found}, but this hmnode "
                f"({__version__}) knows versions up to {schema.SCHEMA_VERSION}; "
                "upgrade hmnode to use this data dir"
            )
        if found is not None and not isinstance(found, int):
            env.close()
            raise StoreError(f"the store at {path} has a damaged schema version: {found!r}")
        store = cls(path, env, {})
        try:
            store._open_tables()
        except BaseException:
            env.close()
            raise
        if found is None:
            store.write(lambda tx: tx.put(schema.META, schema.META_SCHEMA_VERSION,
                                          schema.SCHEMA_VERSION))
        return store

    def _open_tables(self) -> None:
        # Creating a table takes pages too, so a full map grows here as it does in write().
        self._in_write_txn(lambda txn: self._dbs.update(
            {table.name: self._env.open_db(table.name.encode(), txn=txn) for table in schema.TABLES}))

    def read(self, fn: Callable[[Txn], T]) -> T:
        """Run `fn` in a read-only snapshot."""
        self._check_open()
        try:
            with self._env.begin(buffers=False) as txn:
                return fn(Txn(txn, self._dbs))
        except lmdb.MapResizedError:
            # Another process grew the map; adopt its size and read again.
            self._env.set_mapsize(0)
            with self._env.begin() as txn:
                return fn(Txn(txn, self._dbs))

    def write(self, fn: Callable[[Txn], T]) -> T:
        """Run `fn` in one write transaction and commit it durably (all of it, or none of it).

        `fn` may run more than once (after the map grows), so it must not have side effects
        outside the transaction.
        """
        self._check_open()
        return self._in_write_txn(lambda txn: fn(Txn(txn, self._dbs)))

    def sync(self) -> None:
        """Make every committed write durable: nothing to do, as the environment syncs at each
        commit; callers say where they rely on it (the simulated store does work here)."""
        self._check_open()

    def _in_write_txn(self, fn: Callable[[lmdb.Transaction], T]) -> T:
        while True:
            try:
                with self._env.begin(write=True) as txn:
                    return fn(txn)
            except lmdb.MapFullError:
                self._grow()
            except lmdb.MapResizedError:
                self._env.set_mapsize(0)
            except lmdb.Error as exc:
                raise StoreError(
                    f"cannot write the store at {self.path}: {exc} "
                    "(is the disk full or read-only?); nothing of this write was committed"
                ) from exc

    def _grow(self) -> None:
        size = self._env.info()["map_size"]
        new_size = size + min(size, MAX_GROWTH_STEP)
        log.info("store map full at %d MiB; growing to %d MiB", size >> 20, new_size >> 20)
        try:
            self._env.set_mapsize(new_size)
        except lmdb.Error as exc:
            raise StoreError(f"cannot grow the store at {self.path} to {new_size} bytes: {exc}") from exc

    @property
    def map_size(self) -> int:
        return self._env.info()["map_size"]

    def _check_open(self) -> None:
        if self._env is None:
            raise StoreError(f"the store at {self.path} is closed")

    def close(self) -> None:
        """Close the environment; committed data is already on disk."""
        if self._env is not None:
            self._env.close()
            self._env = None  # type: ignore[assignment]

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
