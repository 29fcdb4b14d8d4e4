"""The LMDB store: schema versioning, record round-trips, atomicity, growth, crashes, full disks."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lmdb
import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hmnode import schema
from hmnode.adverts import PRICE_KEYS, make_advert
from hmnode.identity import NodeKey
from hmnode.schema import KnownPeer
from hmnode.errors import SchemaTooNew, StoreCorrupt, StoreError
from hmnode.hardware import (
    CpuInfo,
    DiskInfo,
    GpuInfo,
    GpuReport,
    Inventory,
    MemoryInfo,
    NetInterface,
    collect_inventory,
)
from hmnode.schema import EVENTS, INVENTORY, META, RUNS, AgentRun, NodeEvent
from hmnode.store import Store

WRITER = Path(__file__).with_name("store_writer.py")


def _load_writer() -> Any:
    spec = importlib.util.spec_from_file_location("store_writer", WRITER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def raw_put(path: Path, table: str, key: bytes, value: bytes) -> None:
    """Write bytes into a table with the lmdb library directly, bypassing the store's codecs."""
    env = lmdb.open(str(path), max_dbs=32, subdir=True)
    try:
        db = env.open_db(table.encode())
        with env.begin(write=True) as txn:
            txn.put(key, value, db=db)
    finally:
        env.close()


def raw_get(path: Path, table: str, key: bytes) -> bytes | None:
    env = lmdb.open(str(path), max_dbs=32, subdir=True, readonly=True, lock=False)
    try:
        db = env.open_db(table.encode(), create=False)
        with env.begin() as txn:
            return txn.get(key, db=db)
    finally:
        env.close()


def stat_mode(path: Path) -> int:
    return os.stat(path).st_mode & 0o777


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store.open(tmp_path / "state.lmdb")
    yield s
    s.close()


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    """One store for the property tests, so each example does not pay for creating one."""
    s = Store.open(tmp_path_factory.mktemp("props") / "state.lmdb")
    yield s
    s.close()


# --- opening and the schema version ---------------------------------------------------------


def test_new_store_records_the_schema_version_and_reopens(tmp_path: Path) -> None:
    path = tmp_path / "state.lmdb"
    with Store.open(path) as s:
        assert s.read(lambda tx: tx.get(META, schema.META_SCHEMA_VERSION)) == schema.SCHEMA_VERSION
        s.write(lambda tx: tx.put(META, "x", "kept"))
    assert stat_mode(path) == 0o700
    assert stat_mode(path / "data.mdb") == 0o600
    raw = raw_get(path, "meta", b"schema_version")
    assert raw is not None and msgpack.unpackb(raw) == schema.SCHEMA_VERSION
    with Store.open(path) as s:
        assert s.read(lambda tx: tx.get(META, schema.META_SCHEMA_VERSION)) == schema.SCHEMA_VERSION
        assert s.read(lambda tx: tx.get(META, "x")) == "kept"


def test_store_from_a_newer_schema_is_refused_and_left_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "state.lmdb"
    path.mkdir()
    newer = schema.SCHEMA_VERSION + 1
    raw_put(path, "meta", b"schema_version", msgpack.packb(newer))
    raw_put(path, "future_table", b"k", b"v")
    before = (path / "data.mdb").read_bytes()

    with pytest.raises(SchemaTooNew) as info:
        Store.open(path)
    message = str(info.value)
    assert "upgrade" in message
    assert str(newer) in message and str(path) in message
    assert info.value.exit_code == 2

    assert (path / "data.mdb").read_bytes() == before
    assert msgpack.unpackb(raw_get(path, "meta", b"schema_version")) == newer
    env = lmdb.open(str(path), max_dbs=32, readonly=True, lock=False)
    with env.begin() as txn:
        names = sorted(bytes(k) for k, _ in txn.cursor())
    env.close()
    assert names == [b"future_table", b"meta"]  # none of this version's tables were created


def test_damaged_schema_version_is_a_store_error(tmp_path: Path) -> None:
    path = tmp_path / "state.lmdb"
    path.mkdir()
    raw_put(path, "meta", b"schema_version", msgpack.packb("one"))
    with pytest.raises(StoreError, match="schema version"):
        Store.open(path)


def test_closed_store_refuses_use(tmp_path: Path) -> None:
    s = Store.open(tmp_path / "s")
    s.close()
    s.close()  # closing twice is harmless
    with pytest.raises(StoreError, match="closed"):
        s.read(lambda tx: tx.get(META, "x"))
    with pytest.raises(StoreError, match="closed"):
        s.write(lambda tx: tx.put(META, "x", 1))


# --- record round-trips ---------------------------------------------------------------------

finite = st.floats(allow_nan=False, allow_infinity=False)
times = st.floats(min_value=0, max_value=4e9, allow_nan=False)
texts = st.text(max_size=40)
counts = st.integers(min_value=0, max_value=2**63)
seq_keys = st.integers(min_value=0, max_value=2**64 - 1)

agent_runs = st.builds(
    AgentRun,
    started_at=times,
    pid=st.integers(min_value=1, max_value=2**22),
    version=texts,
    stopped_at=st.none() | times,
    exit_reason=st.none() | texts,
)
node_events = st.builds(NodeEvent, at=st.floats(allow_nan=False), kind=texts, detail=texts)

inventories = st.builds(
    Inventory,
    taken_at=times,
    cpu=st.builds(CpuInfo, model=texts, physical_cores=st.none() | counts, logical_cores=counts,
                  freq_mhz_current=st.none() | finite, freq_mhz_max=st.none() | finite),
    memory=st.builds(MemoryInfo, total_bytes=counts, available_bytes=counts),
    disk=st.builds(DiskInfo, path=texts, total_bytes=counts, free_bytes=counts),
    network=st.lists(
        st.builds(NetInterface, name=texts, addresses=st.lists(texts, max_size=3).map(tuple),
                  is_up=st.booleans(), speed_mbps=st.none() | counts),
        max_size=3,
    ).map(tuple),
    gpu=st.builds(
        GpuReport,
        gpus=st.lists(
            st.builds(GpuInfo, index=counts, name=texts, uuid=texts, memory_total_bytes=counts,
                      memory_used_bytes=counts, compute_capability=texts,
                      utilization_percent=st.none() | st.integers(0, 100)),
            max_size=2,
        ).map(tuple),
        driver_version=st.none() | texts,
        reason=st.none() | texts,
    ),
)
msgpack_scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1)
                   | st.floats(allow_nan=False) | st.text(max_size=60) | st.binary(max_size=60))
meta_keys = st.text(min_size=1, max_size=100).filter(lambda k: k != schema.META_SCHEMA_VERSION)

known_peers = st.builds(KnownPeer, addr=st.text(min_size=1, max_size=60), last_seen=times)
_ADVERT_KEY = NodeKey.generate()
adverts = st.builds(
    lambda seq, addrs, inv, price, issued, ttl: make_advert(
        _ADVERT_KEY, seq, addrs, inv, {name: price for name in PRICE_KEYS}, issued, ttl),
    seq=st.integers(min_value=0, max_value=2**63 - 1),
    addrs=st.lists(st.text(min_size=1, max_size=40), max_size=4),
    inv=st.dictionaries(st.text(max_size=10), msgpack_scalars, max_size=5),
    price=st.floats(min_value=0, max_value=1e6, allow_nan=False),
    issued=times,
    ttl=st.floats(min_value=1, max_value=86400),
)

RECORDS = {
    "meta": (meta_keys, msgpack_scalars),
    "peers": (st.binary(min_size=32, max_size=32), known_peers),
    "adverts": (st.binary(min_size=32, max_size=32), adverts),
    "runs": (seq_keys, agent_runs),
    "events": (seq_keys, node_events),
    "inventory": (st.just(schema.INVENTORY_LATEST) | meta_keys, inventories),
    # The chain's tables hold msgpack values (encoded blocks, certificates, lists, counters).
    "chain": (meta_keys, msgpack_scalars | st.lists(msgpack_scalars, max_size=4)),
    "blocks": (seq_keys, st.binary(max_size=200)),
    "certificates": (seq_keys, st.binary(max_size=200)),
    "tx_results": (st.binary(min_size=32, max_size=32),
                   st.tuples(seq_keys, counts, st.none() | texts).map(list)),
    "nonces": (st.binary(min_size=32, max_size=32), counts),
    "validator_sets": (seq_keys, st.lists(st.tuples(st.binary(min_size=32, max_size=32),
                                                     counts).map(list), max_size=4)),
    "signer": (meta_keys, st.lists(msgpack_scalars, max_size=10)),
    "evidence": (st.binary(min_size=32, max_size=32), st.binary(max_size=200)),
    "kv": (st.binary(min_size=1, max_size=64), st.binary(max_size=200)),
    "kv_power": (st.binary(min_size=32, max_size=32), counts),
    "ledger_accounts": (st.binary(min_size=32, max_size=32), st.tuples(counts, counts).map(list)),
    "ledger_unbonding": (st.binary(min_size=32, max_size=32),
                         st.lists(st.tuples(counts, counts).map(list), max_size=3)),
    "ledger_escrow": (st.binary(min_size=32, max_size=32),
                      st.tuples(st.binary(min_size=32, max_size=32), counts).map(list)),
    "ledger_totals": (meta_keys, st.dictionaries(texts, counts, max_size=6)),
    "state": (meta_keys, msgpack_scalars | st.lists(msgpack_scalars, max_size=4)),
    "slashed": (st.binary(min_size=32, max_size=32), counts),
    "offers": (st.binary(min_size=32, max_size=32), st.dictionaries(texts, msgpack_scalars, max_size=3)),
    "jobs": (st.binary(min_size=32, max_size=32), st.dictionaries(texts, msgpack_scalars, max_size=5)),
    "job_index": (st.binary(min_size=1, max_size=41), st.binary(max_size=32)),
    "nodes": (st.binary(min_size=32, max_size=32), st.dictionaries(texts, msgpack_scalars, max_size=4)),
    "blobs": (st.binary(min_size=32, max_size=32), st.dictionaries(texts, msgpack_scalars, max_size=4)),
    "executions": (st.binary(min_size=32, max_size=32),
                   st.dictionaries(texts, msgpack_scalars, max_size=5)),
}


def test_every_table_has_a_record_strategy() -> None:
    assert {t.name for t in schema.TABLES} == set(RECORDS)


@pytest.mark.parametrize("table", schema.TABLES, ids=lambda t: t.name)
@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture],
          deadline=None)
@given(data=st.data())
def test_records_round_trip(shared_store: Store, table: schema.Table, data: st.DataObject) -> None:
    key_strategy, record_strategy = RECORDS[table.name]
    key = data.draw(key_strategy, label="key")
    record = data.draw(record_strategy, label="record")
    shared_store.write(lambda tx: tx.put(table, key, record))
    back = shared_store.read(lambda tx: tx.get(table, key))
    assert back == record
    assert type(back) is type(record)  # True must not come back as 1, nor 1.0 as 1
    assert shared_store.read(lambda tx: dict(tx.items(table))).get(key) == record


def test_optional_fields_round_trip_as_none_and_values(store: Store) -> None:
    both = [AgentRun(1.5, 10, "0.1.0"), AgentRun(1.5, 10, "0.1.0", 2.25, "stopped by SIGTERM")]
    keys = store.write(lambda tx: [tx.append(RUNS, r) for r in both])
    assert store.read(lambda tx: [tx.get(RUNS, k) for k in keys]) == both


def test_real_inventory_round_trips_and_survives_reopening(tmp_path: Path) -> None:
    inventory = collect_inventory(tmp_path, 1_700_000_000.25)
    path = tmp_path / "state.lmdb"
    with Store.open(path) as s:
        s.write(lambda tx: tx.put(INVENTORY, schema.INVENTORY_LATEST, inventory))
    with Store.open(path) as s:
        assert s.read(lambda tx: tx.get(INVENTORY, schema.INVENTORY_LATEST)) == inventory


def test_get_missing_returns_default_and_delete_reports(store: Store) -> None:
    assert store.read(lambda tx: tx.get(EVENTS, 99)) is None
    assert store.read(lambda tx: tx.get(EVENTS, 99, "none")) == "none"
    store.write(lambda tx: tx.put(META, "gone", 1))
    assert store.write(lambda tx: tx.delete(META, "gone")) is True
    assert store.write(lambda tx: tx.delete(META, "gone")) is False
    assert store.read(lambda tx: tx.get(META, "gone")) is None


# --- sequences and ordering -----------------------------------------------------------------


def test_append_gives_increasing_keys_and_items_iterate_in_order(store: Store) -> None:
    assert store.read(lambda tx: tx.last_key(EVENTS)) is None
    events = [NodeEvent(float(i), "k", str(i)) for i in range(300)]
    keys = [store.write(lambda tx, e=e: tx.append(EVENTS, e)) for e in events[:5]]
    keys += store.write(lambda tx: [tx.append(EVENTS, e) for e in events[5:]])
    assert keys == list(range(1, 301))
    forward = store.read(lambda tx: list(tx.items(EVENTS)))
    assert forward == list(zip(keys, events))
    backward = store.read(lambda tx: list(tx.items(EVENTS, reverse=True)))
    assert backward == forward[::-1]
    assert store.read(lambda tx: (tx.count(EVENTS), tx.last_key(EVENTS))) == (300, 300)
    # Numeric order holds past one byte (256) and across the 64-bit range.
    store.write(lambda tx: tx.put(EVENTS, 2**40, events[0]))
    assert store.read(lambda tx: next(tx.items(EVENTS, reverse=True))[0]) == 2**40
    assert store.write(lambda tx: tx.append(EVENTS, events[1])) == 2**40 + 1


def test_append_after_deleting_the_newest_does_not_reorder(store: Store) -> None:
    store.write(lambda tx: [tx.append(EVENTS, NodeEvent(0.0, "k", "")) for _ in range(3)])
    store.write(lambda tx: tx.delete(EVENTS, 2))
    assert store.write(lambda tx: tx.append(EVENTS, NodeEvent(1.0, "k", ""))) == 4
    assert [k for k, _ in store.read(lambda tx: list(tx.items(EVENTS)))] == [1, 3, 4]


# --- atomicity ------------------------------------------------------------------------------


class Boom(Exception):
    pass


def test_write_that_raises_commits_nothing(store: Store) -> None:
    store.write(lambda tx: tx.put(META, "before", 1))

    def two_puts_then_fail(tx: Any) -> None:
        tx.put(META, "a", 1)
        tx.append(EVENTS, NodeEvent(1.0, "k", "d"))
        tx.delete(META, "before")
        raise Boom()

    with pytest.raises(Boom):
        store.write(two_puts_then_fail)
    assert store.read(lambda tx: (tx.get(META, "a"), tx.count(EVENTS), tx.get(META, "before"))) \
        == (None, 0, 1)
    # The store is still writable afterwards.
    store.write(lambda tx: tx.put(META, "a", 2))
    assert store.read(lambda tx: tx.get(META, "a")) == 2


def test_write_returns_the_function_result(store: Store) -> None:
    assert store.write(lambda tx: (tx.append(EVENTS, NodeEvent(1.0, "k", "")), "done")) == (1, "done")


# --- growth ---------------------------------------------------------------------------------


@pytest.mark.parametrize("initial", [4096, 64 << 10])
def test_map_grows_instead_of_failing(tmp_path: Path, initial: int) -> None:
    path = tmp_path / "state.lmdb"
    detail = "x" * 1000
    with Store.open(path, map_size=initial) as s:
        start = s.map_size
        assert start < 1 << 20
        # One big transaction of about 2 MiB, then several of about 256 KiB: about 4 MiB.
        s.write(lambda tx: [tx.append(EVENTS, NodeEvent(0.0, "big", detail)) for _ in range(2000)])
        for n in range(8):
            s.write(lambda tx, n=n: [tx.append(EVENTS, NodeEvent(float(n), "s", detail))
                                     for _ in range(256)])
        s.write(lambda tx: tx.put(META, "blob", os.urandom(1 << 20)))
        assert s.map_size > 4 << 20
        assert s.read(lambda tx: tx.count(EVENTS)) == 2000 + 8 * 256
    with Store.open(path, map_size=initial) as s:
        events = s.read(lambda tx: list(tx.items(EVENTS)))
        assert [k for k, _ in events] == list(range(1, 2000 + 8 * 256 + 1))
        assert all(e.detail == detail for _, e in events)
        assert len(s.read(lambda tx: tx.get(META, "blob"))) == 1 << 20
        s.write(lambda tx: tx.append(EVENTS, NodeEvent(9.0, "after", "reopen")))


# --- corrupt records ------------------------------------------------------------------------


def pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


GOOD_EVENT = {"at": 1.0, "kind": "k", "detail": "d"}
GOOD_RUN = {"started_at": 1.0, "pid": 1, "version": "v", "stopped_at": None, "exit_reason": None}


@pytest.mark.parametrize("table, raw", [
    ("events", b"\xc1"),
    ("events", b"\x83\xa2at"),
    ("events", pack(GOOD_EVENT) + b"\x00"),
    ("events", pack([1.0, "k", "d"])),
    ("events", pack({"at": 1.0, "kind": "k"})),
    ("events", pack({**GOOD_EVENT, "extra": 1})),
    ("events", pack({**GOOD_EVENT, "at": "yesterday"})),
    ("events", pack({**GOOD_EVENT, "at": True})),
    ("events", pack({**GOOD_EVENT, "kind": None})),
    ("events", pack({**GOOD_EVENT, "detail": b"bytes"})),
    ("events", pack({1: 2})),
    ("runs", pack({**GOOD_RUN, "pid": 1.5})),
    ("runs", pack({**GOOD_RUN, "pid": False})),
    ("runs", pack({**GOOD_RUN, "stopped_at": "never"})),
    ("inventory", pack({"taken_at": 1.0})),
    ("inventory", pack("not an inventory")),
    ("inventory", b"\xa3ab"),
    ("meta", b"\xc1"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_malformed_record_is_store_corrupt(tmp_path: Path, table: str, raw: bytes) -> None:
    path = tmp_path / "state.lmdb"
    Store.open(path).close()
    key = b"\x00" * 7 + b"\x01" if table in ("events", "runs") else b"latest"
    raw_put(path, table, key, raw)
    tab = {t.name: t for t in schema.TABLES}[table]
    decoded_key = tab.key.decode(key)
    with Store.open(path) as s:
        with pytest.raises(StoreCorrupt) as info:
            s.read(lambda tx: tx.get(tab, decoded_key))
        assert table in str(info.value)
        with pytest.raises(StoreCorrupt):
            s.read(lambda tx: list(tx.items(tab)))
        # The bad record can be replaced with a good one.
        good = {"events": NodeEvent(1.0, "k", "d"), "runs": AgentRun(1.0, 1, "v"),
                "inventory": collect_inventory(tmp_path, 1.0), "meta": 1}[table]
        s.write(lambda tx: tx.put(tab, decoded_key, good))
        assert s.read(lambda tx: tx.get(tab, decoded_key)) == good


def test_well_formed_raw_record_decodes(tmp_path: Path) -> None:
    # The raw form the corruption tests start from is the store's real encoding.
    path = tmp_path / "state.lmdb"
    Store.open(path).close()
    raw_put(path, "events", (1).to_bytes(8, "big"), pack({**GOOD_EVENT, "at": 3}))
    with Store.open(path) as s:
        assert s.read(lambda tx: tx.get(EVENTS, 1)) == NodeEvent(3.0, "k", "d")


# --- crash safety ---------------------------------------------------------------------------


def test_every_commit_reported_before_kill_9_survives(tmp_path: Path) -> None:
    writer = _load_writer()
    path = tmp_path / "state.lmdb"
    proc = subprocess.Popen([sys.executable, str(WRITER), str(path), "100000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watchdog = threading.Timer(60.0, proc.kill)  # never hang the suite on a stuck writer
    watchdog.start()
    try:
        seen: list[str] = []
        while len(seen) < 200:
            line = proc.stdout.readline()  # type: ignore[union-attr]
            if not line:
                break
            seen.append(line)
        assert len(seen) == 200, f"writer stopped early: {proc.stderr.read()}"  # type: ignore[union-attr]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        rest = proc.stdout.read()  # type: ignore[union-attr]
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    printed = [tuple(map(int, line.split())) for line in seen + rest.splitlines(keepends=True)
               if line.endswith("\n")]
    assert len(printed) >= 200
    with Store.open(path) as s:
        for key, i in printed:
            assert s.read(lambda tx, key=key: tx.get(EVENTS, key)) == writer.event_for(i)
        stored = s.read(lambda tx: list(tx.items(EVENTS)))
    # Nothing half-written: the stored keys are 1..n, every record decodes, and at most the
    # one commit in flight when the kill landed is there without having been printed.
    assert [k for k, _ in stored] == list(range(1, len(stored) + 1))
    assert len(printed) <= len(stored) <= len(printed) + 1
    assert all(e == writer.event_for(k - 1) for k, e in stored)


# --- read-only and full locations -----------------------------------------------------------


@contextlib.contextmanager
def tmpfs(where: Path, size: str) -> Iterator[Path]:
    """A fresh tmpfs of `size` mounted at `where`; skips the test where mounting is impossible."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs (read-only and full filesystems)")
    if shutil.which("mount") is None or shutil.which("umount") is None:
        pytest.skip("needs mount(8) and umount(8)")
    where.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs",
                             str(where)], capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], capture_output=True, timeout=30, check=True)


def remount(where: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(where)], capture_output=True,
                   text=True, timeout=30, check=True)


def test_full_filesystem_gives_store_error_and_keeps_committed_data(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "mnt", "2m") as root:
        path = root / "state.lmdb"
        s = Store.open(path)
        try:
            s.write(lambda tx: tx.put(META, "kept", "before the disk filled"))
            detail = "y" * 50_000
            committed = 0
            with pytest.raises(StoreError) as info:
                for _ in range(1000):  # 2 MiB fills long before 1000 * 50 kB
                    s.write(lambda tx: tx.append(EVENTS, NodeEvent(1.0, "fill", detail)))
                    committed += 1
            assert committed > 0
            assert "nothing of this write was committed" in str(info.value)
            assert "disk full or read-only" in str(info.value)
            assert s.read(lambda tx: tx.count(EVENTS)) == committed
        finally:
            s.close()
        with Store.open(path) as s:
            assert s.read(lambda tx: tx.get(META, "kept")) == "before the disk filled"
            events = s.read(lambda tx: list(tx.items(EVENTS)))
            assert [k for k, _ in events] == list(range(1, committed + 1))
            assert all(e.detail == detail for _, e in events)


def test_read_only_filesystem_gives_store_error_and_keeps_data(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "mnt", "4m") as root:
        path = root / "state.lmdb"
        with Store.open(path) as s:
            s.write(lambda tx: tx.put(META, "kept", 42))
        remount(root, "ro")
        try:
            with pytest.raises(StoreError) as info:
                Store.open(path)
            assert str(path) in str(info.value)
            with pytest.raises(StoreError):
                Store.open(root / "new.lmdb")
        finally:
            remount(root, "rw")
        with Store.open(path) as s:
            assert s.read(lambda tx: tx.get(META, "kept")) == 42


def test_unwritable_directory_gives_store_error(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root ignores directory permissions; the tmpfs tests cover this as root")
    parent = tmp_path / "locked"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        with pytest.raises(StoreError):
            Store.open(parent / "state.lmdb")
    finally:
        parent.chmod(0o700)


def test_store_path_that_is_a_file_gives_store_error(tmp_path: Path) -> None:
    path = tmp_path / "state.lmdb"
    path.write_text("not a directory")
    with pytest.raises(StoreError) as info:
        Store.open(path)
    assert str(path) in str(info.value)
    assert path.read_text() == "not a directory"



def test_a_record_that_could_not_be_read_back_is_refused_at_write(tmp_path: Path) -> None:
    import dataclasses as dc

    from hmnode.hardware import collect_inventory

    inventory = collect_inventory(tmp_path, 1.0)
    broken = dc.replace(inventory, memory=dc.replace(inventory.memory, total_bytes=-1))
    with Store.open(tmp_path / "s") as store:
        for table, key, record in [
            (schema.EVENTS, 1, schema.NodeEvent(at=1.0, kind=7, detail="x")),  # type: ignore[arg-type]
            (schema.INVENTORY, schema.INVENTORY_LATEST, broken),
        ]:
            with pytest.raises(ValueError):
                store.write(lambda tx: tx.put(table, key, record))
            assert store.read(lambda tx: tx.count(table)) == 0
