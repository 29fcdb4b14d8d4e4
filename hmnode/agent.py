"""The agent's lifecycle: initialise a data dir, run the subsystems, shut down cleanly."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import signal
import time
from dataclasses import dataclass, replace
from collections.abc import Callable
from typing import Any, Mapping, TypeVar

from hmnode import __version__, schema
from hmnode.chain_node import ChainConfig
from hmnode.chain_service import ChainService
from hmnode.config import Config, PeerAddress, load_config, write_config
from hmnode.control import ControlServer, MethodError
from hmnode.datadir import DataDir
from hmnode.errors import HmnodeError, IdentityError
from hmnode.hardware import Inventory, NetInterface, collect_inventory, probe_network
from hmnode.identity import NodeId, NodeKey, load_or_create_key
from hmnode.mesh import Mesh, format_addr
from hmnode.schema import AgentRun, NodeEvent
from hmnode.store import Store, Txn
from hmnode.supervisor import Subsystem, Supervisor
from hmnode.transport.connection import Handlers
from hmnode.transport.endpoint import ConnectionLimits, Endpoint
from hmnode.transport.relay import RelayLimits
from hmnode.transport.traversal import NatTraversal, TraversalConfig
from hmnode.metrics import SNAPSHOT_S, MetricsServer, NodeSnapshot
from hmnode.sharing import ShareMonitor
from hmnode.workloads import WorkloadService

log = logging.getLogger(__name__)

# What a user may have this node sign through the control API (`hmnode stake`, ...). An
# offer without proofs gets this node's (registering it first where needed).
OWN_TX_KINDS = ("ledger.transfer", "ledger.faucet", "stake.bond", "stake.unbond", "kv.put",
                "kv.delete", "offer.commit", "offer.withdraw", "job.submit", "job.cancel",
                "job.receipt")

SHUTDOWN_GRACE_S = 4.0
# How long an offer waits for this node's registration to commit, when it has to register.
OFFER_REGISTER_WAIT_S = 30.0
# What is left after the supervisor's grace gets this much longer before the loop is closed,
# so that SIGTERM to exit stays within 5 s.
LEFTOVER_WAIT_S = 0.4


@dataclass(frozen=True)
class Initialised:
    """What `initialise` found or created."""

    node_id: NodeId
    created_key: bool
    created_config: bool


def initialise(data_dir: DataDir, config: Config) -> tuple[NodeKey, Store, Initialised]:
    """Create what a data dir lacks (key, config.toml, store), check that it belongs together,
    and return the key and the open store.

    The caller holds the data dir's lock. The key is checked first, so that a refused key
    leaves the data dir as it was.
    """
    key, created_key = load_or_create_key(data_dir.key_file)
    created_config = not data_dir.config_file.exists()
    if created_config:
        write_config(data_dir.config_file, config)
    store = Store.open(data_dir.store_dir)
    try:
        _bind_store_to_key(store, key.node_id, data_dir)
    except BaseException:
        store.close()
        raise
    return key, store, Initialised(key.node_id, created_key, created_config)


def _bind_store_to_key(store: Store, node_id: NodeId, data_dir: DataDir) -> None:
    def bind(tx: Txn) -> str | None:
        owner = tx.get(schema.META, schema.META_NODE_ID)
        if owner is None:
            tx.put(schema.META, schema.META_NODE_ID, str(node_id))
            tx.put(schema.META, schema.META_CREATED_AT, time.time())
        return owner

    owner = store.write(bind)
    if owner is not None and owner != str(node_id):
        raise IdentityError(
            f"the store in {data_dir.path} belongs to node {owner}, but {data_dir.key_file} "
            f"is the key of {node_id}; put the original key back, or use another --data-dir"
        )


class Agent:
    """A running node: its identity, store and subsystems, and the control API over them."""

    def __init__(self, data_dir: DataDir, config: Config, key: NodeKey, store: Store) -> None:
        self.data_dir = data_dir
        self.config = config
        self.key = key
        self.store = store
        self.supervisor = Supervisor(grace_s=SHUTDOWN_GRACE_S)
        self.started_at = time.time()
        self._started_mono = time.monotonic()
        self._inventory: Inventory | None = store.read(
            lambda tx: tx.get(schema.INVENTORY, schema.INVENTORY_LATEST))
        self._inventory_fresh = asyncio.Event()
        self.endpoint = Endpoint(key, Handlers(), limits=ConnectionLimits(
            max_connections=config.max_connections, max_per_ip=config.max_connections_per_ip))
        self.mesh = Mesh(key, self.endpoint, store, self._describe)
        self.traversal = NatTraversal(
            self.endpoint, key, TraversalConfig(relay=RelayLimits(
                enabled=config.relay_enabled, max_reservations=config.relay_max_reservations,
                max_circuits_per_peer=config.relay_max_circuits_per_peer,
                circuit_bytes=config.relay_circuit_mib << 20, circuit_s=config.relay_circuit_s)),
            addresses_of=self.mesh.addresses_of, on_addresses_changed=self.mesh.addresses_changed)
        self.traversal.relaying.candidates = [((p.addr.host, p.addr.port), p.node_id)
                                           for p in config.bootstrap]
        self.mesh.traversal = self.traversal
        self.chain = ChainService(key, store, self.endpoint, self.mesh, config.chain_genesis,
                                  config.bootstrap,
                                  ChainConfig(empty_block_s=config.chain_empty_block_s),
                                  data_dir.path)
        self.workloads = WorkloadService(key, store, data_dir.path, self.chain, self.mesh,
                                         self.endpoint, process=config.share_process,
                                         unsandboxed=config.share_unsandboxed,
                                         gpus=lambda: () if self._inventory is None
                                         else self._inventory.gpu.gpus,
                                         storage_bytes=self._storage_bytes)
        self.share = ShareMonitor(config, data_dir.path, key.node_id, lambda: self._inventory,
                                  self.workloads.executor, on_change=self.mesh.addresses_changed,
                                  offered=self._offered)
        self.chain.offer_source = lambda height: self.share.offer(height,
                                                                  self.workloads.runtimes)
        self.metrics = MetricsServer()
        self.control = ControlServer(data_dir.control_socket, {
            "status": self._status,
            "assets": self._assets,
            "peers": self._peers,
            "join": self._join,
            "adverts": self._adverts,
            "advertise": self._advertise,
            "mesh_stats": self._mesh_stats,
            "connect": self._connect,
            "chain": self._chain,
            "submit_txs": self._submit_txs,
            "kv_put": self._kv_put,
            "kv_get": self._kv_get,
            "transaction": self._own_transaction,
            "ledger": self._ledger,
            "jobs": self._jobs,
            "commits": self._commits,
            "share": self._share,
            "earnings": self._earnings,
            "share_reload": self._share_reload,
            **self.workloads.methods(),
        })

    # --- lifecycle --------------------------------------------------------------------------

    async def run(self) -> str | None:
        """Serve until stopped; returns None after a clean stop, or what failed."""
        # Bind before anything is recorded, so that a taken port fails the start cleanly.
        addresses = await self.endpoint.start(self.config.listen.host, self.config.listen.port)
        try:
            run_key = self.store.write(self._record_start)
            await self.control.start()
            log.info("node %s ready: listening on %s, control socket %s", self.key.node_id,
                     ", ".join(format_addr(a) for a in addresses), self.data_dir.control_socket,
                     extra={"event": "ready", "node_id": str(self.key.node_id),
                            "addresses": [format_addr(a) for a in addresses]})
            self.mesh.load()
            self.mesh.bootstrap = self.config.bootstrap
            try:
                failure = await self.supervisor.run([
                    Subsystem("inventory", self._refresh_inventory),
                    Subsystem("mesh", self.mesh.run),
                    Subsystem("nat", self.traversal.run),
                    Subsystem("chain", self.chain.run),
                    Subsystem("workloads", self.workloads.run),
                    Subsystem("share", self.share.run),
                    Subsystem("metrics", self._serve_metrics),
                ])
            finally:
                await self.control.close()
                await self.mesh.close()
        finally:
            await self.endpoint.close()
        reason = failure or self.supervisor.stop_reason or "stopped"
        log.info("node %s stopped (%s)", self.key.node_id, reason,
                 extra={"event": "stopped", "clean": failure is None})
        self.store.write(lambda tx: self._record_stop(tx, run_key, reason, clean=failure is None))
        return failure

    def _record_start(self, tx: Txn) -> int:
        last = next(tx.items(schema.RUNS, reverse=True), None)
        if last is not None and last[1].stopped_at is None:
            log.warning("the previous run (pid %d) did not stop cleanly; its committed state is kept",
                        last[1].pid)
            _append_event(tx, NodeEvent(time.time(), "unclean_stop",
                                        f"run {last[0]} (pid {last[1].pid}) ended without a stop"))
        _append_event(tx, NodeEvent(self.started_at, "started", f"pid {os.getpid()}, {__version__}"))
        return tx.append(schema.RUNS, AgentRun(self.started_at, os.getpid(), __version__))

    def _record_stop(self, tx: Txn, run_key: int, reason: str, clean: bool) -> None:
        run: AgentRun = tx.get(schema.RUNS, run_key)
        tx.put(schema.RUNS, run_key, AgentRun(run.started_at, run.pid, run.version,
                                              stopped_at=time.time(), exit_reason=reason))
        _append_event(tx, NodeEvent(time.time(), "stopped" if clean else "failed", reason))

    def install_signal_handlers(self) -> None:
        """SIGINT and SIGTERM ask for a graceful stop."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.supervisor.request_stop, f"signal {sig.name}")

    # --- subsystems -------------------------------------------------------------------------

    async def _refresh_inventory(self) -> None:
        while True:
            now = time.time()
            # psutil and NVML calls block; keep them off the event loop.
            inventory = await asyncio.to_thread(collect_inventory, self.data_dir.path, now)
            self.store.write(lambda tx: tx.put(schema.INVENTORY, schema.INVENTORY_LATEST, inventory))
            self._inventory = inventory
            self._inventory_fresh.set()
            await asyncio.sleep(self.config.inventory_interval_s)

    def _describe(self) -> tuple[list[str], dict[str, Any]]:
        """What this node's advert says: where to reach it and what it could share."""
        # Before the first inventory, ask the interfaces directly (cheap, and needed at start).
        network = self._inventory.network if self._inventory else probe_network()
        local = advertised_addresses(self.endpoint.addresses, network)
        share = self.share.describe(self.workloads.runtimes)
        # Not the reasons of a pause: they change with every reading of the machine.
        share.pop("why_not", None)
        return self.traversal.advertised(local), {**shareable(self._inventory), "share": share}

    async def _serve_metrics(self) -> None:
        """Serve /metrics where the config says (a port taken only costs the metrics)."""
        listen = self.config.metrics_listen
        if listen is None:
            await asyncio.Event().wait()  # a subsystem runs until the node stops
        try:
            host, port = self.metrics.start(listen.host, listen.port)
        except OSError as exc:
            log.warning("metrics are not served: cannot listen on %s (%s); set metrics.listen",
                        listen, exc.strerror or exc)
            await asyncio.Event().wait()
        log.info("metrics at http://%s/metrics", format_addr((host, port)),
                 extra={"event": "metrics_listening", "address": format_addr((host, port))})
        self.chain.commit_listeners.append(self._commit_observed)
        try:
            while True:
                try:
                    self.metrics.collector.update(self._snapshot())
                except HmnodeError:
                    pass  # the chain is not ready yet: the last snapshot stands
                await asyncio.sleep(SNAPSHOT_S)
        finally:
            self.metrics.stop()

    def _commit_observed(self) -> None:
        node = self.chain.node
        if node is not None and node.last_commit_ms is not None:
            self.metrics.commit_latency.observe(node.last_commit_ms / 1000)

    def _snapshot(self) -> NodeSnapshot:
        """The figures /metrics shows, read here on the event loop."""
        chain = self.chain.status()
        paths: dict[str, int] = {}
        for conn in self.endpoint.peers.values():
            path = self.traversal.path_of(conn)["path"]
            paths[path] = paths.get(path, 0) + 1
        share = self._share_status(chain)
        earned, balance = self.chain.earned() if chain.get("ready") else (0, 0)
        return NodeSnapshot(
            node_id=str(self.key.node_id), version=__version__, peers=len(self.endpoint.peers),
            paths=paths, gossip=self.mesh.stats()["broadcast"], height=chain["height"] or 0,
            validators=len(chain["validators"]), is_validator=chain["is_validator"],
            mempool=chain.get("mempool", 0),
            jobs=self.chain.job_counts() if chain.get("ready") else {},
            executions=self.workloads.executor.states(),
            sandbox={k: dict(v) for k, v in self.workloads.executor.sandbox_stats.items()},
            earned=earned, balance=balance, sharing=share["sharing"],
            why_not=len(share["why_not"]))

    def _storage_bytes(self) -> int:
        """Disk for other nodes' unpinned blobs, as the contributor shares it."""
        total = self._inventory.disk.total_bytes if self._inventory else 0
        return self.share.config.share_storage.of(total)

    def _offered(self) -> bool:
        """Whether this node has an offer on the chain."""
        me = self.key.node_id.key
        return self.store.read(lambda txn: txn.get(schema.OFFERS, me)) is not None

    # --- control methods --------------------------------------------------------------------

    async def _join(self, params: Mapping[str, Any]) -> dict[str, Any]:
        try:
            peer = PeerAddress.parse(params.get("peer"))  # type: ignore[arg-type]
        except ValueError as exc:
            raise MethodError("bad_request", str(exc)) from None
        try:
            joined = await self.mesh.join(peer.addr, peer.node_id)
        except HmnodeError as exc:
            raise MethodError("join_failed", str(exc)) from None
        return {"node_id": str(joined)}

    async def _connect(self, params: Mapping[str, Any]) -> dict[str, Any]:
        try:
            peer = NodeId.parse(params.get("node_id"))  # type: ignore[arg-type]
            timeout = float(params.get("timeout", 10.0))
        except (TypeError, ValueError) as exc:
            raise MethodError("bad_request", f"connect takes a node_id and a timeout: {exc}") from None
        started = time.monotonic()
        try:
            conn = await self.traversal.connect_checked(peer, timeout=timeout)
        except HmnodeError as exc:
            raise MethodError("connect_failed", str(exc)) from None
        return {"node_id": str(peer), **self.traversal.path_of(conn),
                "rtt_ms": None if conn.rtt_s is None else round(conn.rtt_s * 1000, 3),
                "elapsed_ms": round((time.monotonic() - started) * 1000, 1)}

    async def _adverts(self, params: Mapping[str, Any]) -> list[dict[str, Any]]:
        return self.mesh.advert_list()

    async def _advertise(self, params: Mapping[str, Any]) -> dict[str, Any]:
        advert = self.mesh.publish()
        return {"seq": advert.seq, "issued_at": advert.issued_at}

    async def _mesh_stats(self, params: Mapping[str, Any]) -> dict[str, Any]:
        return self.mesh.stats()

    async def _status(self, params: Mapping[str, Any]) -> dict[str, Any]:
        chain = self.chain.status()
        return {
            # The chain's headline figures at the top; the whole of it under "chain".
            "height": chain["height"],
            "validators": chain["validators"],
            "is_validator": chain["is_validator"],
            "last_commit_ms": chain["last_commit_ms"],
            "node_id": str(self.key.node_id),
            "version": __version__,
            "pid": os.getpid(),
            "data_dir": str(self.data_dir.path),
            "uptime_s": round(time.monotonic() - self._started_mono, 3),
            "started_at": self.started_at,
            "listen": str(self.config.listen),
            "addresses": [format_addr(a) for a in self.endpoint.addresses],
            "peers": len(self.endpoint.peers),
            "store_map_bytes": self.store.map_size,
            "nat": self.traversal.status(),
            "metrics": None if self.metrics.address is None
            else f"http://{format_addr(self.metrics.address)}/metrics",
            "share": self._share_status(chain),
            "chain": chain,
        }

    def _share_status(self, chain: dict[str, Any]) -> dict[str, Any]:
        """Whether this node shares right now and, if it does not or cannot get work, why:
        the contributor's rules, and what the mesh lacks (peers, a live validator)."""
        out = self.share.describe(self.workloads.runtimes)
        why = out["why_not"]
        registry = chain.get("registry")
        if self.share.enabled and registry is not None and not registry["offering"]:
            why.append("no offer on the chain yet: "
                       + (self.chain.offer_note or "it is being registered and made"))
        validators = chain.get("validators") or []
        if len(validators) > 1 or self.config.bootstrap:
            if not self.endpoint.peers:
                why.append("no peers: nothing reaches this node")
            age, limit = chain.get("last_commit_age_s"), 3 * self.config.chain_empty_block_s
            if age is None or age > limit:
                why.append(f"no validator reachable: no block committed in the last {limit:g} s")
        out["sharing"] = out["sharing"] and not why
        return out

    async def _earnings(self, params: Mapping[str, Any]) -> dict[str, Any]:
        since = params.get("since_ms", 0)
        if isinstance(since, bool) or not isinstance(since, int) or since < 0:
            raise MethodError("bad_request", "since_ms is a time in ms since the epoch")
        return _answer(lambda: self.chain.earnings(since))

    async def _share(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """The share and price settings in effect, and whether this node shares now."""
        return {"settings": self.share.config.show("share.", "price."),
                "status": self._share_status(self.chain.status())}

    async def _share_reload(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """Read config.toml again and apply its [share] and [price] settings now (the process
        runtime's settings take effect at the next start)."""
        try:
            fresh = load_config(self.data_dir.config_file)
        except HmnodeError as exc:
            raise MethodError("bad_config", str(exc)) from None
        changes = {f: getattr(fresh, f) for f in vars(fresh) if f.startswith(("share_", "price_"))}
        self.config = replace(self.config, **changes)
        self.share.reload(self.config)
        await self.share.check()  # so that the answer says what the new rules make of now
        return await self._share(params)

    async def _chain(self, params: Mapping[str, Any]) -> dict[str, Any]:
        height = params.get("height")
        if height is not None and (isinstance(height, bool) or not isinstance(height, int)
                                   or height < 0):
            raise MethodError("bad_request", "height is a whole number")
        return _answer(lambda: self.chain.block(height), "not_found")

    async def _submit_txs(self, params: Mapping[str, Any]) -> dict[str, Any]:
        txs = params.get("txs")
        if not isinstance(txs, list) or len(txs) > 10_000 or not all(
                isinstance(t, bytes) for t in txs):
            raise MethodError("bad_request", "txs is a list of at most 10000 encoded transactions")
        return {"results": _answer(lambda: self.chain.submit(txs))}

    async def _commits(self, params: Mapping[str, Any]) -> dict[str, Any]:
        after = params.get("after", 0)
        if isinstance(after, bool) or not isinstance(after, int):
            raise MethodError("bad_request", "after is a height")
        return {"commits": self.chain.commits(after)}

    async def _kv_put(self, params: Mapping[str, Any]) -> dict[str, Any]:
        key, value = params.get("key"), params.get("value")
        if not isinstance(key, str) or not isinstance(value, bytes):
            raise MethodError("bad_request", "kv_put takes a text key and a bytes value")
        return await self._own_tx("kv.put", {"key": key, "value": value}, params.get("wait"))

    async def _own_transaction(self, params: Mapping[str, Any]) -> dict[str, Any]:
        kind, body = params.get("kind"), params.get("body")
        if kind not in OWN_TX_KINDS or not isinstance(body, dict):
            raise MethodError("bad_request", f"kind is one of {', '.join(OWN_TX_KINDS)} and "
                                             "body a map")
        return await self._own_tx(kind, body, params.get("wait"))

    async def _own_tx(self, kind: str, body: dict[str, Any], wait: Any) -> dict[str, Any]:
        """Sign a transaction with this node's key, submit it, and wait for its commit."""
        waiting = float(wait) if isinstance(wait, (int, float)) and not isinstance(wait, bool) \
            else 0.0
        try:
            if kind == "offer.commit" and "proofs" not in body:
                body = await self.chain.prepare_offer(body, max(waiting, OFFER_REGISTER_WAIT_S))
            tx = self.chain.sign_and_submit(kind, body)
        except HmnodeError as exc:
            raise MethodError("refused", str(exc)) from None
        answer: dict[str, Any] = {"tx_id": tx.tx_id.hex(), "nonce": tx.nonce, "kind": kind}
        if waiting > 0:
            try:
                await self.chain.wait_committed(tx.tx_id, waiting)
            except TimeoutError:
                raise MethodError("timeout", f"transaction {tx.tx_id.hex()} was not committed "
                                             f"within {wait:g} s; it may still be") from None
            answer.update(self.chain.tx_result(tx.tx_id) or {})
        return answer

    async def _jobs(self, params: Mapping[str, Any]) -> dict[str, Any]:
        limit = params.get("limit", 100)
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 10_000:
            raise MethodError("bad_request", "limit is 1..10000")
        return _answer(lambda: self.chain.jobs(limit))

    async def _ledger(self, params: Mapping[str, Any]) -> dict[str, Any]:
        return _answer(self.chain.ledger)

    async def _kv_get(self, params: Mapping[str, Any]) -> dict[str, Any]:
        key = params.get("key")
        if not isinstance(key, str):
            raise MethodError("bad_request", "kv_get takes a text key")
        try:
            value = self.chain.kv_get(key)
            height = self.chain.status().get("height")
        except HmnodeError as exc:
            raise MethodError("not_ready", str(exc)) from None
        return {"key": key, "value": value, "found": value is not None, "height": height}

    async def _assets(self, params: Mapping[str, Any]) -> dict[str, Any]:
        if not self._inventory_fresh.is_set():
            try:
                await asyncio.wait_for(self._inventory_fresh.wait(), timeout=5.0)
            except TimeoutError:
                if self._inventory is None:
                    raise MethodError("not_ready", "the first hardware inventory is not done yet; "
                                                   "try again in a moment") from None
        assert self._inventory is not None
        return self._inventory.to_dict()


    async def _peers(self, params: Mapping[str, Any]) -> dict[str, Any]:
        now = time.monotonic()
        return {**self.mesh.snapshot(), "misbehaviour": dict(sorted(self.endpoint.misbehaviour.items())),
                "connections": [{
            "node_id": str(node_id),
            "address": self.traversal.dial_address(conn),
            **self.traversal.path_of(conn),
            "time_to_direct_ms": self.traversal.time_to_direct_ms.get(node_id),
            "direction": "out" if conn.is_client else "in",
            "rtt_ms": None if conn.rtt_s is None else round(conn.rtt_s * 1000, 3),
            "bytes_in": conn.bytes_in,
            "bytes_out": conn.bytes_out,
            "connected_s": round(now - conn.created_at, 3),
            "malformed": self.endpoint.misbehaviour[str(node_id)],
        } for node_id, conn in sorted(self.endpoint.peers.items())]}


T = TypeVar("T")


def _answer(call: Callable[[], T], code: str = "not_ready") -> T:
    """What a control method returns from the chain; its refusal as the method's error."""
    try:
        return call()
    except HmnodeError as exc:
        raise MethodError(code, str(exc)) from None


def advertised_addresses(bound: list[tuple], network: tuple[NetInterface, ...]) -> list[str]:
    """Where peers can reach this node: the bound addresses, with a wildcard replaced by the
    machine's interface addresses (loopback only when there is nothing else)."""
    out: list[tuple[str, int]] = []
    for host, port in (a[:2] for a in bound):
        if host not in ("0.0.0.0", "::"):
            out.append((host, port))
            continue
        out.extend((ip, port) for iface in network if iface.is_up
                   for ip in iface.addresses if (":" in ip) == (host == "::") and "%" not in ip)
    # Loopback only reaches this machine: worth advertising only when there is nothing else.
    reachable = [a for a in out if not ipaddress.ip_address(a[0].split("%")[0]).is_loopback]
    return [format_addr(a) for a in (reachable or out)][:16]


def shareable(inventory: Inventory | None) -> dict[str, Any]:
    """The stable part of the inventory that an advert carries (not load or free memory, which
    change every minute and would make every refresh a new advert)."""
    if inventory is None:
        return {}
    return {
        "cpu": {"model": inventory.cpu.model, "logical_cores": inventory.cpu.logical_cores,
                "physical_cores": inventory.cpu.physical_cores},
        "memory_bytes": inventory.memory.total_bytes,
        "disk_bytes": inventory.disk.total_bytes,
        "gpus": [{"name": g.name, "memory_bytes": g.memory_total_bytes,
                  "compute_capability": g.compute_capability} for g in inventory.gpu.gpus],
    }


def _append_event(tx: Txn, event: NodeEvent) -> None:
    key = tx.append(schema.EVENTS, event)
    if key > schema.EVENTS_KEPT:
        tx.delete(schema.EVENTS, key - schema.EVENTS_KEPT)


def run_agent(data_dir: DataDir, config: Config, file_defaults: Config | None = None) -> int:
    """Run a node in the foreground until SIGINT/SIGTERM; returns the process exit code.

    `file_defaults` is what a first start writes to config.toml (default: `config`).
    """
    data_dir.create()
    with data_dir.lock():
        key, store, init = initialise(data_dir, file_defaults or config)
        if init.created_key:
            log.info("created node key %s for node %s", data_dir.key_file, init.node_id)
        try:
            failure = _run_loop(_serve(data_dir, config, key, store))
        finally:
            store.close()
    return 0 if failure is None else 1


async def _serve(data_dir: DataDir, config: Config, key: NodeKey, store: Store) -> str | None:
    agent = Agent(data_dir, config, key, store)
    agent.install_signal_handlers()
    return await agent.run()


def _run_loop(main: Any) -> Any:
    """Run `main` on uvloop where installed; unlike asyncio.run, a task that refuses to be
    cancelled cannot hold the process past a bounded wait."""
    try:
        import uvloop
        loop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        return loop.run_until_complete(main)
    finally:
        try:
            pending = [task for task in asyncio.all_tasks(loop) if not task.done()]
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.wait(pending, timeout=LEFTOVER_WAIT_S))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(
                asyncio.wait([loop.create_task(loop.shutdown_default_executor())],
                             timeout=LEFTOVER_WAIT_S))
        finally:
            asyncio.set_event_loop(None)
            loop.close()
