"""A mesh of real `hmnode run` processes on loopback, for trying the mesh out and for tests and
benchmarks.

Each node has its own data dir `DIR/node00`, `DIR/node01`, ... (so `hmnode status --data-dir
DIR/node03` works on any of them) and logs to `agent.log` there. node00 starts first; every other
node joins through it with `--bootstrap`. Each node listens on an address of its own in
127.0.0.0/8 (node00 on 127.0.0.1, node01 on 127.0.0.2, ...), as separate machines would: a node
accepts at most 16 connections from one IP address, so nodes that all shared 127.0.0.1 could not
all join through node00 in a mesh of more than 17.

The processes run in their own sessions, so they outlive the command that started them;
`DIR/simnet.json` records their pids, addresses and node ids, which is how a later `hmnode simnet
status` or `down` finds them. A pid is only ever signalled after checking that it is still the
`hmnode run` started for that data dir.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import psutil

from hmnode import control
from hmnode.chain_service import LOCAL_APP_STATE, write_genesis
from hmnode.consensus.chain import Genesis
from hmnode.consensus.validators import ValidatorSet
from hmnode.identity import load_or_create_key
from hmnode.datadir import DataDir
from hmnode.errors import AgentNotRunning, HmnodeError, UsageError

STATE_FILE = "simnet.json"
LOG_FILE = "agent.log"
HOST = "127.0.0.1"
MAX_NODES = 250 * 256
STATE_FORMAT = 1
# A first start creates a key, a config and an LMDB store; on a small machine starting many
# Python processes at once, that takes a while for each.
READY_TIMEOUT_S = 30.0
READY_TIMEOUT_PER_NODE_S = 1.0
CALL_TIMEOUT_S = 2.0
# Node dirs are recognised by what an agent writes there, so that `up` never removes anything
# that is not a node dir it (or an earlier `up`) made.
_NODE_DIR_MARKERS = ("node.key", "config.toml")


class MeshRunning(UsageError):
    """`up` was asked for a directory whose mesh still runs."""


class NoMesh(AgentNotRunning):
    """A command needs a mesh in the directory and none was started there."""


class MeshStartFailed(HmnodeError):
    """A node exited, or did not answer, before it was ready."""


def node_name(index: int) -> str:
    """The name (and data dir name) of the index-th node: node00, node01, ..."""
    return f"node{index:02d}"


def node_host(index: int, distinct: bool = True) -> str:
    """The loopback address the index-th node listens on: 127.0.0.1, 127.0.0.2, ... (skipping
    the .0 and .255 of each /24), or 127.0.0.1 for all where `distinct` is off."""
    if not distinct:
        return HOST
    return f"127.0.{index // 250}.{index % 250 + 1}"


def _distinct_loopback_works() -> bool:
    """Whether addresses of 127.0.0.0/8 other than 127.0.0.1 can be bound (Linux: yes; some
    systems only route 127.0.0.1 unless the others are configured)."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.bind((node_host(1), 0))
        return True
    except OSError:
        return False
    finally:
        probe.close()


@dataclass(frozen=True)
class NodeRecord:
    """What `simnet.json` keeps of one node: enough to find, check and restart its process."""

    name: str
    pid: int
    # The process's start time as psutil reports it: a pid reused by another process after the
    # node died has a different one, so that process is never mistaken for the node.
    create_time: float
    host: str
    port: int
    node_id: str

    @property
    def address(self) -> str:
        """HOST:PORT the node listens on."""
        return f"{self.host}:{self.port}"

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "NodeRecord":
        return cls(str(raw["name"]), int(raw["pid"]), float(raw["create_time"]),
                   str(raw["host"]), int(raw["port"]), str(raw["node_id"]))


@dataclass(frozen=True)
class NodeStatus:
    """One node as seen now: its process, and what it says through its control socket."""

    name: str
    node_id: str
    pid: int
    address: str
    alive: bool
    peers: int | None = None  # size of its active view (its neighbours)
    passive: int | None = None
    adverts_known: int | None = None  # adverts it holds of this mesh's nodes
    adverts_total: int | None = None  # every advert it holds, stale ones included
    rss_bytes: int | None = None
    error: str | None = None  # why the control socket did not answer, when alive

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class StopOutcome:
    """What became of one node on `down`."""

    name: str
    pid: int
    outcome: str  # "clean", "unclean" (exited, but not cleanly), "killed", "not running"
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class LocalMesh:
    """N `hmnode run` processes on loopback, sharing one directory."""

    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory).expanduser().absolute()
        # Processes this object started: kept so that their exit is reaped here (a dead child
        # that is never waited for stays a zombie, and psutil still reports its pid).
        self._children: dict[int, subprocess.Popen] = {}
        self._env: dict[str, str] = {}  # HMNODE_* settings `up` gives every node

    # --- files ------------------------------------------------------------------------------

    @property
    def state_file(self) -> Path:
        return self.dir / STATE_FILE

    def data_dir(self, name: str) -> DataDir:
        """The data dir of node `name`."""
        return DataDir(self.dir / name)

    def log_file(self, name: str) -> Path:
        """Where node `name` writes its stdout and stderr."""
        return self.dir / name / LOG_FILE

    def records(self) -> list[NodeRecord]:
        """The nodes recorded in simnet.json; raises NoMesh if there is none."""
        try:
            raw = json.loads(self.state_file.read_text())
        except FileNotFoundError:
            raise NoMesh(f"no simnet mesh in {self.dir}; start one with "
                         f"`hmnode simnet up -n N --dir {self.dir}`") from None
        except (OSError, ValueError) as exc:
            raise HmnodeError(f"cannot read {self.state_file}: {exc}; stop any nodes left with "
                              f"`hmnode simnet down --dir {self.dir}`, or remove the file") from exc
        try:
            return [NodeRecord.from_dict(node) for node in raw["nodes"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise HmnodeError(f"{self.state_file} is damaged ({exc!r}); stop its nodes by their "
                              "pids, then remove the file") from exc

    def record(self, name: str) -> NodeRecord:
        """The record of node `name`."""
        for rec in self.records():
            if rec.name == name:
                return rec
        raise UsageError(f"no node {name} in the mesh in {self.dir}; "
                         f"`hmnode simnet status --dir {self.dir}` lists them")

    def _write_records(self, records: Iterable[NodeRecord]) -> None:
        # Written whole to a temporary file and renamed, so that a concurrent `status` never
        # reads half a file.
        doc = {"format": STATE_FORMAT, "updated_at": time.time(),
               "nodes": [asdict(rec) for rec in records]}
        tmp = self.state_file.with_name(STATE_FILE + ".tmp")
        with tmp.open("w") as fh:
            json.dump(doc, fh, indent=2)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.state_file)

    def call(self, name: str, method: str, timeout: float = CALL_TIMEOUT_S) -> Any:
        """Call `method` on node `name`'s control socket."""
        return control.call(self.data_dir(name).control_socket, method, timeout=timeout)

    def _replace_record(self, new: NodeRecord) -> None:
        self._write_records([new if rec.name == new.name else rec for rec in self.records()])

    # --- processes --------------------------------------------------------------------------

    def process(self, rec: NodeRecord) -> psutil.Process | None:
        """The live `hmnode run` process of `rec`, or None if it is gone (or its pid now belongs
        to something else): what may be signalled."""
        if self._exited(rec):
            return None
        try:
            proc = psutil.Process(rec.pid)
            cmdline = proc.cmdline()
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            return None
        data_dir = str(self.data_dir(rec.name).path)
        if "run" not in cmdline or data_dir not in cmdline:
            return None
        return proc

    def _exited(self, rec: NodeRecord) -> bool:
        """Whether `rec`'s process has exited. By its start time, not its command line: a dying
        process's command line reads empty before it is gone."""
        child = self._children.get(rec.pid)
        if child is not None:
            # Our own child: its pid cannot be reused before it is reaped, which poll() does.
            return child.poll() is not None
        try:
            proc = psutil.Process(rec.pid)
            return (abs(proc.create_time() - rec.create_time) > 0.05
                    or proc.status() == psutil.STATUS_ZOMBIE)
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            return True
        except psutil.AccessDenied:
            return False

    def running(self) -> list[NodeRecord]:
        """The recorded nodes whose processes still run (empty if there is no mesh)."""
        try:
            records = self.records()
        except NoMesh:
            return []
        return [rec for rec in records if self.process(rec) is not None]

    @property
    def genesis_file(self) -> Path:
        return self.dir / "genesis.json"

    def _spawn(self, name: str, host: str, port: int, bootstrap: str | None,
               env_extra: dict[str, str] | None = None) -> subprocess.Popen:
        data_dir = self.data_dir(name)
        data_dir.create()
        cmd = [sys.executable, "-m", "hmnode", "run", "--data-dir", str(data_dir.path),
               "--listen", f"{host}:{port}", "--log-level", "info"]
        if bootstrap is not None:
            cmd += ["--bootstrap", bootstrap]
        if self.genesis_file.exists():
            cmd += ["--genesis", str(self.genesis_file)]
        # Settings come from the flags and the node's own config.toml only, never from the
        # environment of whoever ran `up`.
        env = {k: v for k, v in os.environ.items() if not k.startswith("HMNODE_")}
        # Many nodes on one machine: each serves its metrics on a port of its own (status
        # says which), not all on the default one.
        env["HMNODE_METRICS_LISTEN"] = f"{host}:0"
        env.update(self._env)
        env.update(env_extra or {})
        with self.log_file(name).open("ab") as log:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, env=env, close_fds=True,
                                    start_new_session=True, cwd=self.dir)
        self._children[proc.pid] = proc
        return proc

    def _wait_ready(self, name: str, proc: subprocess.Popen, deadline: float) -> NodeRecord:
        """Poll node `name`'s control socket until it answers; its record."""
        sock_path = self.data_dir(name).control_socket
        create_time = psutil.Process(proc.pid).create_time()
        while True:
            if proc.poll() is not None:
                raise MeshStartFailed(
                    f"{name} exited with code {proc.returncode} before it was ready; its log "
                    f"{self.log_file(name)} says why:\n{log_tail(self.log_file(name))}")
            try:
                info = self.call(name, "status")
                if info.get("pid") == proc.pid:
                    break
            except HmnodeError:
                pass
            if time.monotonic() > deadline:
                raise MeshStartFailed(
                    f"{name} (pid {proc.pid}) did not answer on {sock_path} in time; see "
                    f"{self.log_file(name)}:\n{log_tail(self.log_file(name))}")
            time.sleep(0.05)
        host, _, port = info["addresses"][0].rpartition(":")
        return NodeRecord(name, proc.pid, create_time, host, int(port), str(info["node_id"]))

    # --- commands ---------------------------------------------------------------------------

    def up(self, n: int, base_port: int = 0,
           progress: Callable[[str], None] = lambda line: None,
           validators: int = 1, app_state: dict[str, Any] | None = None,
           env: dict[str, str] | None = None) -> list[NodeRecord]:
        """Start a fresh mesh of `n` nodes; returns once every node answers on its control socket.

        The first `validators` nodes validate the mesh's chain (each with power 1, from a
        genesis file written here); the others follow it. With 1, node 0 starts its own chain
        and the others take it from node 0 when they join.

        `app_state` replaces the chain's rules (a local mesh's, with a faucet, by default; a
        genesis file is then written even for one validator). `env` adds HMNODE_* settings to
        every node's environment.

        `base_port` 0 lets each node pick a free port; otherwise node i listens on base_port + i.
        Node dirs left in the directory by an earlier mesh are removed first, so that old keys,
        peers and adverts do not leak into this one. Raises MeshRunning if a mesh runs there.
        """
        if not 1 <= n <= MAX_NODES:
            raise UsageError(f"a mesh has 1 to {MAX_NODES} nodes, not {n}")
        if base_port and base_port + n - 1 > 65535:
            raise UsageError(f"ports {base_port}..{base_port + n - 1} do not fit below 65536; "
                             "choose a lower --base-port, or 0 for free ports")
        self._refuse_if_running()
        # A socket path that is too long fails every node identically; say so once, up front.
        longest = self.data_dir(node_name(n - 1)).control_socket
        if len(os.fsencode(longest)) > control.MAX_SOCKET_PATH:
            raise UsageError(f"the control socket path {longest} is longer than the "
                             f"{control.MAX_SOCKET_PATH} bytes Unix sockets allow; give a shorter --dir")
        progress(f"starting {n} node{'s' if n > 1 else ''} in {self.dir}")
        self.dir.mkdir(parents=True, exist_ok=True)
        self._remove_old_node_dirs()
        self.state_file.unlink(missing_ok=True)
        self.genesis_file.unlink(missing_ok=True)
        if not 1 <= validators <= n:
            raise UsageError(f"a mesh of {n} nodes has 1 to {n} validators, not {validators}")
        if validators > 1 or app_state is not None:
            self._write_genesis(validators, LOCAL_APP_STATE if app_state is None else app_state)
        self._env = dict(env or {})
        timeout = READY_TIMEOUT_S + READY_TIMEOUT_PER_NODE_S * n
        distinct = n > 1 and _distinct_loopback_works()
        if n > 1 and not distinct:
            progress("only 127.0.0.1 can be bound here, so all nodes share it; a node accepts "
                     "16 connections from one address, so more than 17 nodes may not all join")
        records: list[NodeRecord] = []
        try:
            first = self._spawn(node_name(0), node_host(0), base_port, None)
            records.append(self._provisional(node_name(0), first, node_host(0), base_port))
            self._write_records(records)
            seed = self._wait_ready(node_name(0), first, time.monotonic() + timeout)
            records[0] = seed
            self._write_records(records)
            progress(f"{seed.name} ready: {seed.node_id} at {seed.address} (pid {seed.pid})")
            bootstrap = f"{seed.node_id}@{seed.address}"
            procs = []
            for i in range(1, n):
                host, port = node_host(i, distinct), base_port + i if base_port else 0
                proc = self._spawn(node_name(i), host, port, bootstrap)
                procs.append(proc)
                records.append(self._provisional(node_name(i), proc, host, port))
            self._write_records(records)
            deadline = time.monotonic() + timeout
            for i, proc in enumerate(procs, start=1):
                records[i] = self._wait_ready(node_name(i), proc, deadline)
                progress(f"{records[i].name} ready: {records[i].node_id} at "
                         f"{records[i].address} (pid {records[i].pid})")
            self._write_records(records)
        except BaseException:
            # Half a mesh is of no use and would block the next `up`: stop what was started.
            if self.state_file.exists():
                self.down(timeout=5.0)
            raise
        return records

    def _write_genesis(self, validators: int, app_state: dict[str, Any]) -> None:
        """Give the first `validators` nodes their keys now, and a genesis naming them."""
        keys = []
        for i in range(validators):
            data_dir = self.data_dir(node_name(i))
            data_dir.create()
            key, _ = load_or_create_key(data_dir.key_file)
            keys.append(key.node_id.key)
        write_genesis(self.genesis_file, Genesis(
            f"simnet-{int(time.time())}", int(time.time() * 1000),
            ValidatorSet.of((k, 1) for k in keys), app_state=app_state))

    def _provisional(self, name: str, proc: subprocess.Popen, host: str, port: int) -> NodeRecord:
        """A record of a node that is not ready yet, so that `down` can stop it meanwhile."""
        try:
            create_time = psutil.Process(proc.pid).create_time()
        except psutil.NoSuchProcess:
            create_time = 0.0
        return NodeRecord(name, proc.pid, create_time, host, port, "")

    def _refuse_if_running(self) -> None:
        running = self.running()
        if running:
            raise MeshRunning(
                f"a mesh is already running in {self.dir} ({len(running)} nodes, {running[0].name} "
                f"pid {running[0].pid}); stop it with `hmnode simnet down --dir {self.dir}`, "
                "or give another --dir")
        # An agent started by hand on one of the node dirs would make its node fail to start.
        for path in self._old_node_dirs():
            try:
                info = control.call(DataDir(path).control_socket, "status", timeout=1.0)
            except HmnodeError:
                continue
            raise MeshRunning(f"an hmnode agent (pid {info.get('pid')}) is running on {path}; "
                              "stop it, or give another --dir")

    def _old_node_dirs(self) -> list[Path]:
        if not self.dir.is_dir():
            return []
        return sorted(p for p in self.dir.iterdir()
                      if p.is_dir() and p.name.startswith("node") and p.name[4:].isdigit()
                      and any((p / marker).exists() for marker in _NODE_DIR_MARKERS))

    def _remove_old_node_dirs(self) -> None:
        for path in self._old_node_dirs():
            shutil.rmtree(path)

    def status(self) -> list[NodeStatus]:
        """Every recorded node: its process, neighbours, adverts known and RSS (asked in
        parallel, so that one slow node does not hold up the rest)."""
        records = self.records()
        mesh_ids = {rec.node_id for rec in records if rec.node_id}
        with ThreadPoolExecutor(max_workers=min(16, max(1, len(records)))) as pool:
            return list(pool.map(lambda rec: self._node_status(rec, mesh_ids), records))

    def _node_status(self, rec: NodeRecord, mesh_ids: set[str]) -> NodeStatus:
        proc = self.process(rec)
        base = NodeStatus(rec.name, rec.node_id, rec.pid, rec.address, alive=proc is not None)
        if proc is None:
            return base
        try:
            rss: int | None = proc.memory_info().rss
        except psutil.Error:
            rss = None
        try:
            stats = self.call(rec.name, "mesh_stats")
            adverts = self.call(rec.name, "adverts")
        except HmnodeError as exc:
            return replace(base, rss_bytes=rss, error=str(exc))
        known = {ad["node_id"] for ad in adverts}
        return replace(base, peers=stats.get("active"), passive=stats.get("passive"),
                       adverts_known=len(known & mesh_ids), adverts_total=len(known),
                       rss_bytes=rss)

    def converged(self, statuses: list[NodeStatus] | None = None) -> bool:
        """Whether every node runs and holds the advert of every node of the mesh."""
        statuses = self.status() if statuses is None else statuses
        n = len(statuses)
        return n > 0 and all(s.alive and s.adverts_known == n for s in statuses)

    def wait_converged(self, timeout: float, poll_s: float = 0.5,
                       on_status: Callable[[list[NodeStatus]], None] = lambda s: None) -> bool:
        """Poll `status` until converged (True), or until `timeout` seconds pass or a node has
        exited (False: a dead node never comes back by itself); each poll goes to `on_status`."""
        deadline = time.monotonic() + timeout
        while True:
            started = time.monotonic()
            statuses = self.status()
            on_status(statuses)
            if self.converged(statuses):
                return True
            if time.monotonic() >= deadline or not all(s.alive for s in statuses):
                return False
            time.sleep(max(0.0, min(poll_s - (time.monotonic() - started),
                                    deadline - time.monotonic())))

    def down(self, timeout: float = 10.0) -> list[StopOutcome]:
        """SIGTERM every node, wait up to `timeout` s, SIGKILL what is left, and remove
        simnet.json; what became of each node."""
        records = self.records()
        procs = {rec.name: self.process(rec) for rec in records}
        for proc in procs.values():
            if proc is not None:
                try:
                    proc.send_signal(signal.SIGTERM)
                except psutil.NoSuchProcess:
                    pass
        exited = self._wait_gone([rec for rec in records if procs[rec.name] is not None], timeout)
        outcomes: list[StopOutcome] = []
        killed: list[NodeRecord] = []
        for rec in records:
            if procs[rec.name] is None:
                outcomes.append(StopOutcome(rec.name, rec.pid, "not running"))
            elif rec.name in exited:
                clean, detail = self._stopped_cleanly(rec)
                outcomes.append(StopOutcome(rec.name, rec.pid, "clean" if clean else "unclean", detail))
            else:
                self._signal_checked(rec, signal.SIGKILL)
                outcomes.append(StopOutcome(rec.name, rec.pid, "killed",
                                            f"still running {timeout:g} s after SIGTERM"))
                killed.append(rec)
        self._wait_gone(killed, 5.0)
        self.state_file.unlink(missing_ok=True)
        return outcomes

    def kill(self, name: str) -> NodeRecord:
        """SIGKILL node `name` (a crash, for tests); returns its record."""
        rec = self.record(name)
        if not self._signal_checked(rec, signal.SIGKILL):
            raise UsageError(f"{name} is not running; `hmnode simnet status --dir {self.dir}`")
        self._wait_gone([rec], 5.0)
        return rec

    def start(self, name: str, timeout: float = READY_TIMEOUT_S,
              env: dict[str, str] | None = None) -> NodeRecord:
        """Start node `name` again on its address, without any bootstrap peer, so that it has
        to rejoin through the peers it stored (`env` adds settings); returns its new record
        once it is ready."""
        rec = self.record(name)
        if self.process(rec) is not None:
            raise UsageError(f"{name} is already running (pid {rec.pid})")
        # config.toml of every node but node00 holds the bootstrap peer it was started with; an
        # empty HMNODE_BOOTSTRAP overrides it, so the rejoin is through stored peers alone.
        proc = self._spawn(name, rec.host, rec.port, None, {**(env or {}), "HMNODE_BOOTSTRAP": ""})
        self._replace_record(self._provisional(name, proc, rec.host, rec.port))
        try:
            new = self._wait_ready(name, proc, time.monotonic() + timeout)
        except MeshStartFailed:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            raise
        self._replace_record(new)
        return new

    # --- helpers ----------------------------------------------------------------------------

    def _signal_checked(self, rec: NodeRecord, sig: int) -> bool:
        """Send `sig` to `rec`'s process if it is still that node; whether it was sent."""
        proc = self.process(rec)
        if proc is None:
            return False
        try:
            proc.send_signal(sig)
        except psutil.NoSuchProcess:
            return False
        return True

    def _wait_gone(self, records: Iterable[NodeRecord], timeout: float) -> set[str]:
        """Wait until the processes of `records` have exited; the names of those that did."""
        pending = {rec.name: rec for rec in records}
        gone: set[str] = set()
        deadline = time.monotonic() + timeout
        while pending:
            for name, rec in list(pending.items()):
                if self._exited(rec):
                    gone.add(name)
                    del pending[name]
            if not pending or time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        return gone

    def _stopped_cleanly(self, rec: NodeRecord) -> tuple[bool, str]:
        """Whether an exited node stopped cleanly: by its exit code when it was our child, and
        by the stop line of its log otherwise (another process started it)."""
        child = self._children.get(rec.pid)
        if child is not None and child.returncode is not None:
            if child.returncode == 0:
                return True, ""
            return False, f"exit code {child.returncode}; see {self.log_file(rec.name)}"
        tail = log_tail(self.log_file(rec.name), lines=40)
        stops = [line for line in tail.splitlines() if " stopped (" in line]
        if stops and "stopped (signal SIGTERM)" in stops[-1]:
            return True, ""
        return False, f"no clean stop in its log; see {self.log_file(rec.name)}"


def log_tail(path: Path, lines: int = 15) -> str:
    """The last `lines` lines of a log file (empty if there is none)."""
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 16384))
            text = fh.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])
