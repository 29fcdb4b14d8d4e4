"""The NAT lab: real `hmnode run` processes in Linux network namespaces behind iptables NATs
(built by `natlab_topology`), made to connect pair by pair, with a matrix of what connected, over
which path and how fast it went direct.

A run: build the topology; self-check that every NAT behaves as its kind (or fail); start the
public node (bootstrap and relay), then every other node bootstrapping through it; wait, bounded,
for adverts and relay reservations; for every pair ask one node to `connect` to the other and
watch its `peers` until the connection is direct; kill one direct pair's NAT binding and check
the pair reconnects (the fallback); report. Teardown (every process, every namespace) happens
whatever happens: exceptions, Ctrl-C, SIGTERM, SIGHUP, and an atexit hook as a last resort.

Nothing here judges the nodes kindly: a node that does not answer, lacks a control method or
never reports a direct path simply scores that, with the error kept in the matrix.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import hmnode
from hmnode import control
from hmnode.datadir import DataDir
from hmnode.errors import HmnodeError, UsageError
from hmnode.simnet.natlab_topology import (
    NODE_PORT, KindCheck, LabInterrupted, Namespaces, NatLabError, Processes, Progress, Site,
    Topology, build_topology, check_requirements, clean_leftovers, flush_conntrack, in_ns,
    new_prefix, require_kinds, run_cmd, self_check, validate_kinds)

REDUCED = ("public", "cone", "cone", "symmetric", "double")
FULL = ("public", "cone", "cone", "symmetric", "symmetric", "fullcone", "double")

LOG_FILE = "agent.log"
READY_TIMEOUT_S = 30.0
ADVERTS_TIMEOUT_S = 30.0
RELAY_TIMEOUT_S = 30.0
CONNECT_TIMEOUT_S = 20.0
# The control call waits a little longer than the node's own connect timeout, so a node that
# honours its timeout is always heard.
CONTROL_SLACK_S = 5.0
DIRECT_WAIT_S = 15.0
DIRECT_POLL_S = 0.1
FALLBACK_WINDOW_S = 10.0
STOP_GRACE_S = 5.0
CALL_TIMEOUT_S = 3.0
POLL_S = 0.25

# What the lab must reach once the nodes' NAT traversal works (the end-to-end test asserts them;
# `nat-lab --check` exits 1 when one is missed).
FLOORS: dict[str, tuple[str, float | bool]] = {
    "connected_ratio": ("==", 1.0),
    "direct_ratio_cone_pairs": ("==", 1.0),
    "direct_ratio_easy_hard": (">=", 0.9),
    "fallback_ok": ("is", True),
}


# --- records -----------------------------------------------------------------------------------


def pair_class(kind_a: str, kind_b: str) -> str:
    """`cone` (both sides in public/cone/fullcone/double), `easy_hard` (exactly one side
    symmetric) or `hard_hard` (both symmetric)."""
    hard = (kind_a == "symmetric") + (kind_b == "symmetric")
    return ("cone", "easy_hard", "hard_hard")[hard]


@dataclass(frozen=True)
class PairResult:
    """One pair of the matrix: `a` was asked to connect to `b`."""

    a: str
    b: str
    kind_a: str
    kind_b: str
    connected: bool
    # The last path seen: "direct" once a's peers showed it, else what `connect` answered.
    path: str | None
    # From the start of the connect call to the first sight of a direct path; None if never.
    time_to_direct_ms: float | None
    connect_ms: float | None  # how long the connect call took
    rtt_ms: float | None
    error: str | None

    @property
    def pair_class(self) -> str:
        """See `pair_class`."""
        return pair_class(self.kind_a, self.kind_b)

    @property
    def direct(self) -> bool:
        """Whether the pair went direct."""
        return self.time_to_direct_ms is not None

    def to_dict(self) -> dict[str, Any]:
        """This record as JSON-ready data."""
        return {**asdict(self), "class": self.pair_class}


@dataclass(frozen=True)
class Fallback:
    """The fallback check: a direct pair's NAT binding killed, then the pair asked to connect."""

    ok: bool | None
    reason: str | None = None  # why it did not run, or why it failed
    a: str | None = None
    b: str | None = None
    router: str | None = None  # the namespace whose bindings were killed
    method: str | None = None  # "conntrack -F", or "udp timeout" without the conntrack tool
    elapsed_ms: float | None = None  # from the kill to the successful connect
    path: str | None = None
    attempts: int = 0
    # Whether a's byte count from b grew after the kill (evidence of real traffic; None when
    # `peers` does not say).
    traffic_after: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        """This record as JSON-ready data."""
        return asdict(self)


@dataclass(frozen=True)
class Readiness:
    """How the bounded waits before the matrix ended."""

    # NATed site -> "held", "missing", "not needed" (the node finds itself publicly reachable,
    # as a port-forwarded one may) or "not reported" (its status has no "nat").
    relays: dict[str, str]
    relay_wait_s: float
    # Every node knows every NATed node's advert, and at the sequence number that node itself
    # holds (so what it advertised after its relay reservation has spread).
    adverts_complete: bool
    adverts_current: bool
    adverts_wait_s: float
    adverts_missing: dict[str, list[str]]  # site -> sites whose advert it lacks
    adverts_stale: dict[str, list[str]]  # site -> sites of which it holds an older advert

    def to_dict(self) -> dict[str, Any]:
        """This record as JSON-ready data."""
        return asdict(self)


@dataclass(frozen=True)
class NodeLog:
    """What a node's JSON log says that a person should look at."""

    site: str
    lines: int
    warnings: int
    errors: int  # error and critical records
    tracebacks: int
    not_json: int  # lines that are not JSON records (a crash prints those)
    first_problems: tuple[str, ...]
    path: str | None  # where the log is kept (None once the temporary dir is gone)

    def to_dict(self) -> dict[str, Any]:
        """This record as JSON-ready data."""
        return asdict(self)


def ratio(items: Sequence[PairResult], test: Callable[[PairResult], bool]) -> float | None:
    """The share of `items` passing `test`, rounded; None for no items."""
    return round(sum(map(test, items)) / len(items), 4) if items else None


def floors_met(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each floor of FLOORS with what the run got and whether it holds."""
    out = {}
    for key, (op, want) in FLOORS.items():
        got = summary.get(key)
        if op == "is":
            ok = got is want
        elif got is None:
            ok = False
        else:
            ok = got == want if op == "==" else got >= want
        out[key] = {"want": f"{op} {want}", "got": got, "ok": ok}
    return out


def summarise(pairs: Sequence[PairResult], fallback: Fallback) -> dict[str, Any]:
    """The matrix's figures."""
    cone = [p for p in pairs if p.pair_class == "cone"]
    easy_hard = [p for p in pairs if p.pair_class == "easy_hard"]
    hard_hard = [p for p in pairs if p.pair_class == "hard_hard"]
    times = [p.time_to_direct_ms for p in pairs if p.time_to_direct_ms is not None]
    natted = [p.time_to_direct_ms for p in pairs if p.time_to_direct_ms is not None
              and p.kind_a != "public" and p.kind_b != "public"]
    return {
        "connected_ratio": ratio(pairs, lambda p: p.connected),
        "direct_ratio": ratio(pairs, lambda p: p.direct),
        "direct_ratio_cone_pairs": ratio(cone, lambda p: p.direct),
        "direct_ratio_easy_hard": ratio(easy_hard, lambda p: p.direct),
        "direct_ratio_hard_hard": ratio(hard_hard, lambda p: p.direct),
        "time_to_direct_ms_p50": round(statistics.median(times), 1) if times else None,
        # Pairs with the public node are direct from the start; this one is about traversal.
        "time_to_direct_ms_p50_natted": round(statistics.median(natted), 1) if natted else None,
        "fallback_ok": fallback.ok,
    }


# --- node logs ---------------------------------------------------------------------------------


def read_node_log(site: str, path: Path, kept: bool) -> NodeLog:
    """Count the warnings, errors and tracebacks of a node's JSON log."""
    lines = warnings = errors = tracebacks = not_json = 0
    problems: list[str] = []
    try:
        text = path.read_text(errors="replace")
    except OSError:
        text = ""
    raw: list[str] = []  # a run of lines that are not JSON records: one problem

    def end_raw() -> None:
        if raw and len(problems) < 5:
            last = f" … {raw[-1].strip()[:200]}" if len(raw) > 1 else ""
            problems.append(f"(not json, {len(raw)} lines) {raw[0].strip()[:200]}{last}")
        raw.clear()

    for line in text.splitlines():
        if not line.strip():
            continue
        lines += 1
        try:
            rec = json.loads(line)
            level = str(rec.get("level", ""))
        except (ValueError, AttributeError):
            not_json += 1
            if line.startswith("Traceback"):
                tracebacks += 1
            raw.append(line)
            continue
        end_raw()
        if rec.get("exc"):
            tracebacks += 1
        if level == "warning":
            warnings += 1
        elif level in ("error", "critical"):
            errors += 1
        else:
            continue
        if len(problems) < 5:
            exc_last = str(rec.get("exc", "")).strip().splitlines()[-1:] or [""]
            msg = " | ".join(str(rec.get("msg", "")).splitlines())  # one line per problem
            problems.append(f"{level}: {msg[:200]}"
                            + (f" [{exc_last[0][:200]}]" if exc_last[0] else ""))
    end_raw()
    return NodeLog(site, lines, warnings, errors, tracebacks, not_json, tuple(problems),
                   str(path) if kept else None)


# --- the lab -----------------------------------------------------------------------------------


@dataclass
class _Node:
    """A node process of the lab (mutable: filled in as it starts)."""

    site: Site
    data_dir: DataDir
    proc: subprocess.Popen | None = None
    node_id: str | None = None
    final_status: dict[str, Any] | None = field(default=None)

    @property
    def log_file(self) -> Path:
        """Where the node's stdout and stderr (its JSON log) go."""
        return self.data_dir.path / LOG_FILE

    def call(self, method: str, params: dict[str, Any] | None = None,
             timeout: float = CALL_TIMEOUT_S) -> Any:
        """Call `method` on this node's control socket (reachable from the root namespace)."""
        return control.call(self.data_dir.control_socket, method, params, timeout=timeout)


def _child_env() -> dict[str, str]:
    """The nodes' environment: none of the caller's HMNODE_* settings, and the lab's own hmnode
    on the path, so that the nodes run the code the lab was started with."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HMNODE_")}
    tree = str(Path(hmnode.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([tree, *filter(None, [env.get("PYTHONPATH")])])
    return env


def _short_error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:500]


class NatLab:
    """One lab run: a context manager owning its namespaces and processes, torn down on exit
    (and on SIGTERM/SIGHUP, turned into LabInterrupted while it is entered in the main thread)."""

    def __init__(self, kinds: Sequence[str], keep_logs: Path | None = None,
                 progress: Progress = lambda line: None) -> None:
        validate_kinds(kinds)
        self.kinds = tuple(kinds)
        self.progress = progress
        self.prefix = new_prefix()
        self.spaces = Namespaces(self.prefix)
        self.helpers = Processes()  # the self-check's programs
        self.node_procs = Processes()
        self.topology: Topology | None = None
        self.nodes: dict[str, _Node] = {}
        self.kept = keep_logs is not None
        if keep_logs is not None:
            self.workdir = keep_logs.expanduser().absolute() / self.prefix.rstrip("-")
        else:
            # Made when the nodes start (the prefix is unique to this run, so is the name).
            self.workdir = Path(tempfile.gettempdir()) / self.prefix.rstrip("-")
        self._closed = self._closing = False
        self.final_logs: list[NodeLog] = []
        self._old_handlers: dict[int, Any] = {}

    # --- context and teardown ----------------------------------------------------------------

    def __enter__(self) -> "NatLab":
        atexit.register(self.close)
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGHUP):
                self._old_handlers[sig] = signal.signal(sig, self._interrupt)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def _interrupt(self, signum: int, frame: FrameType | None) -> None:
        if self._closing:
            return  # already tearing down: let it finish
        raise LabInterrupted(f"stopped by {signal.Signals(signum).name}; the lab was torn down")

    def close(self) -> list[str]:
        """Stop every process and delete every namespace of this run (idempotent); problems."""
        if self._closed:
            return []
        self._closed = self._closing = True
        main = threading.current_thread() is threading.main_thread()
        # A second Ctrl-C must not cut the teardown short and leave namespaces behind; the
        # teardown itself is bounded (a few seconds).
        old_int = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
        problems: list[str] = []
        try:
            self.progress("tearing down")
            problems += self.node_procs.stop(STOP_GRACE_S)
            problems += self.helpers.stop(1.0)
            problems += self.spaces.destroy()
            # Read once the nodes have stopped (their last words count) and before a temporary
            # directory goes.
            self.final_logs = self.logs()
            if not self.kept:
                shutil.rmtree(self.workdir, ignore_errors=True)
        finally:
            if main:
                signal.signal(signal.SIGINT, old_int)
                for sig, handler in self._old_handlers.items():
                    signal.signal(sig, handler)
            atexit.unregister(self.close)
        for problem in problems:
            self.progress(f"teardown: {problem}")
        return problems

    # --- phases ------------------------------------------------------------------------------

    def build(self) -> Topology:
        """Build the namespaces, links and NATs."""
        self.progress(f"building {len(self.kinds)} sites (namespaces {self.prefix}*)")
        self.topology = build_topology(self.kinds, self.spaces, self.progress)
        return self.topology

    def check_kinds(self) -> list[KindCheck]:
        """Self-check every NAT's behaviour; raises NatKindMisbehaves if one is wrong."""
        assert self.topology is not None
        self.progress("self-check: does every NAT behave as its kind?")
        checks = self_check(self.topology, self.helpers, self.progress)
        require_kinds(checks)
        return checks

    def _hmnode(self, *args: str) -> str:
        return run_cmd([sys.executable, "-m", "hmnode", *args], timeout=60.0, env=_child_env())

    def start_nodes(self) -> None:
        """Start the public node, then every other one bootstrapping through it; returns once
        every node answers `status`."""
        assert self.topology is not None
        self.workdir.mkdir(mode=0o700, parents=True, exist_ok=self.kept)
        for site in self.topology.sites:
            node = _Node(site, DataDir(self.workdir / site.name))
            if len(os.fsencode(node.data_dir.control_socket)) > control.MAX_SOCKET_PATH:
                raise UsageError(f"the control socket path {node.data_dir.control_socket} is too "
                                 "long for a Unix socket; give a shorter --keep-logs DIR")
            self.nodes[site.name] = node
        boot = self.nodes[self.topology.bootstrap.name]
        self._hmnode("init", "--data-dir", str(boot.data_dir.path))
        boot_id = json.loads(self._hmnode("id", "--data-dir", str(boot.data_dir.path),
                                          "--json"))["node_id"]
        self.progress(f"starting the bootstrap node {boot_id[:16]}… in {boot.site.name}")
        self._spawn(boot, None)
        self._wait_answering([boot])
        bootstrap = f"{boot_id}@{boot.site.host_ip}:{NODE_PORT}"
        others = [n for n in self.nodes.values() if n is not boot]
        self.progress(f"starting {len(others)} nodes bootstrapping through {bootstrap[:16]}…")
        for node in others:
            self._spawn(node, bootstrap)
        self._wait_answering(others)

    def _spawn(self, node: _Node, bootstrap: str | None) -> None:
        node.data_dir.create()
        argv = in_ns(node.site.host_ns, sys.executable, "-m", "hmnode", "run", "--data-dir",
                     str(node.data_dir.path), "--listen", f"0.0.0.0:{NODE_PORT}",
                     "--log-format", "json")
        if bootstrap is not None:
            argv += ["--bootstrap", bootstrap]
        with node.log_file.open("ab") as log:
            node.proc = self.node_procs.spawn(argv, stdout=log, env=_child_env(),
                                              cwd=str(self.workdir))

    def _wait_answering(self, nodes: Sequence[_Node]) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        waiting = list(nodes)
        while waiting:
            for node in list(waiting):
                assert node.proc is not None
                if node.proc.poll() is not None:
                    raise NatLabError(f"the node in {node.site.name} exited with code "
                                      f"{node.proc.returncode} before it was ready; its log "
                                      f"{node.log_file} ends:\n{_tail(node.log_file)}")
                try:
                    status = node.call("status")
                except HmnodeError:
                    continue
                node.node_id = str(status["node_id"])
                waiting.remove(node)
                self.progress(f"  {node.site.name:14} {node.node_id[:16]}… answers (pid "
                              f"{node.proc.pid})")
            if waiting and time.monotonic() > deadline:
                raise NatLabError(
                    f"{', '.join(n.site.name for n in waiting)} did not answer status within "
                    f"{READY_TIMEOUT_S:g} s; the first one's log ends:\n"
                    f"{_tail(waiting[0].log_file)}")
            if waiting:
                time.sleep(0.1)

    def wait_ready(self) -> Readiness:
        """Wait, bounded, until every NATed node holds a relay reservation, then until every
        node knows every NATed node's current advert; records how far it got, never fails."""
        nodes = list(self.nodes.values())
        natted = [n for n in nodes if n.site.natted]
        self.progress(f"waiting up to {RELAY_TIMEOUT_S:g} s for relay reservations")
        started = time.monotonic()
        relays: dict[str, str] = {}
        while True:
            for node in natted:
                if relays.get(node.site.name) == "held":
                    continue
                try:
                    nat = node.call("status").get("nat")
                except (HmnodeError, AttributeError):
                    nat = {}
                relays[node.site.name] = _relay_state(nat)
            if (all(v != "missing" for v in relays.values())
                    or time.monotonic() - started > RELAY_TIMEOUT_S):
                break
            time.sleep(POLL_S)
        relay_s = time.monotonic() - started
        self.progress("  relays: " + ", ".join(f"{name} {v}" for name, v in relays.items())
                      + f" after {relay_s:.1f} s")

        self.progress(f"waiting up to {ADVERTS_TIMEOUT_S:g} s for every node to know every "
                      "NATed node's current advert")
        started = time.monotonic()
        while True:
            held = {node.site.name: _advert_seqs(node) for node in nodes}
            missing: dict[str, list[str]] = {}
            stale: dict[str, list[str]] = {}
            for node in nodes:
                for other in natted:
                    if other is node:
                        continue
                    have = held[node.site.name].get(str(other.node_id))
                    own = held[other.site.name].get(str(other.node_id))
                    if have is None:
                        missing.setdefault(node.site.name, []).append(other.site.name)
                    elif own is not None and have < own:
                        stale.setdefault(node.site.name, []).append(other.site.name)
            if (not missing and not stale) or time.monotonic() - started > ADVERTS_TIMEOUT_S:
                break
            time.sleep(POLL_S)
        adverts_s = time.monotonic() - started
        self.progress(f"  adverts after {adverts_s:.1f} s: "
                      + ("all known and current" if not missing and not stale else
                         f"MISSING {missing} STALE {stale}"))
        return Readiness(relays, round(relay_s, 3), not missing, not missing and not stale,
                         round(adverts_s, 3), missing, stale)

    def run_matrix(self) -> list[PairResult]:
        """Connect every unordered pair. A pair starts as soon as neither of its nodes is busy
        with another pair, so no node's figures are slowed by its own other pairs, while pairs
        of distinct nodes run side by side."""
        names = list(self.nodes)
        pending = [pair for rnd in round_robin(len(names)) for pair in rnd]
        total = len(pending)
        self.progress(f"matrix: {total} pairs, each node in one pair at a time")
        results: dict[tuple[int, int], PairResult] = {}
        busy: set[int] = set()
        running: dict[Future[PairResult], tuple[int, int]] = {}
        pool = ThreadPoolExecutor(max_workers=max(1, len(names) // 2))
        try:
            while pending or running:
                for pair in list(pending):
                    if busy.isdisjoint(pair):
                        pending.remove(pair)
                        busy.update(pair)
                        running[pool.submit(self.connect_pair, self.nodes[names[pair[0]]],
                                            self.nodes[names[pair[1]]])] = pair
                finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
                for future in finished:
                    pair = running.pop(future)
                    busy.difference_update(pair)
                    results[pair] = future.result()
                    self.progress(f"  [{len(results):2}/{total}] {_pair_line(results[pair])}")
        finally:
            # Interrupted: do not wait for calls in flight (up to a connect timeout); teardown
            # kills the nodes, which ends them.
            pool.shutdown(wait=False, cancel_futures=True)
        return [results[pair] for pair in sorted(results)]

    def connect_pair(self, a: _Node, b: _Node) -> PairResult:
        """Ask a to connect to b, then watch a's peers until the connection is direct."""
        assert b.node_id is not None
        started = time.monotonic()
        path: str | None = None
        rtt: float | None = None
        direct_ms: float | None = None
        try:
            answer = a.call("connect", {"node_id": b.node_id, "timeout": CONNECT_TIMEOUT_S},
                            timeout=CONNECT_TIMEOUT_S + CONTROL_SLACK_S)
        except HmnodeError as exc:
            return PairResult(a.site.name, b.site.name, a.site.kind, b.site.kind, False, None,
                              None, round((time.monotonic() - started) * 1000, 1), None,
                              _short_error(exc))
        connect_ms = round((time.monotonic() - started) * 1000, 1)
        if isinstance(answer, dict):
            path = answer.get("path") if isinstance(answer.get("path"), str) else None
            rtt = answer.get("rtt_ms") if isinstance(answer.get("rtt_ms"), (int, float)) else None
        if path == "direct":
            direct_ms = connect_ms
        error = None
        deadline = time.monotonic() + DIRECT_WAIT_S
        while direct_ms is None and time.monotonic() < deadline:
            try:
                conns = a.call("peers").get("connections", [])
                seen = next((c for c in conns if c.get("node_id") == b.node_id), None)
            except (HmnodeError, AttributeError) as exc:
                error, seen = _short_error(exc), None
            if seen is not None and seen.get("path") == "direct":
                direct_ms = round((time.monotonic() - started) * 1000, 1)
                path = "direct"
                break
            time.sleep(DIRECT_POLL_S)
        return PairResult(a.site.name, b.site.name, a.site.kind, b.site.kind, True, path,
                          direct_ms, connect_ms, rtt, error)

    def fallback(self, pairs: Sequence[PairResult]) -> Fallback:
        """Kill the NAT bindings of one direct NATed pair's router and check the pair connects
        again within FALLBACK_WINDOW_S."""
        candidates = [p for p in pairs if p.direct and p.kind_a != "public"
                      and p.kind_b != "public"]
        if not candidates:
            return Fallback(None, reason="no pair of two NATed sites went direct")
        # cone-cone first: the binding is the only thing killed, no mapping change muddles it.
        best = min(candidates, key=lambda p: (
            0 if p.kind_a == p.kind_b == "cone" else 1 if p.pair_class == "cone" else 2))
        a, b = self.nodes[best.a], self.nodes[best.b]
        router = a.site.routers[0]
        before = _bytes_in(a, b)
        self.progress(f"fallback: killing the NAT bindings of {a.site.name}'s router, then "
                      f"{a.site.name} -> {b.site.name} must connect within "
                      f"{FALLBACK_WINDOW_S:g} s")
        method = "conntrack -F"
        killed_at = time.monotonic()
        if not flush_conntrack(router):
            method = "udp timeout"
            _expire_udp_bindings(router)
            killed_at = time.monotonic()
        deadline = killed_at + FALLBACK_WINDOW_S
        attempts, last_error = 0, None
        while (left := deadline - time.monotonic()) > 0:
            attempts += 1
            try:
                answer = a.call("connect", {"node_id": b.node_id, "timeout": left},
                                timeout=left + 1.0)
            except HmnodeError as exc:
                last_error = _short_error(exc)
                time.sleep(0.2)
                continue
            elapsed = time.monotonic() - killed_at
            path = answer.get("path") if isinstance(answer, dict) else None
            ok = elapsed <= FALLBACK_WINDOW_S
            # Evidence that packets from b really arrive again (keepalives at the least), seen
            # within the rest of the window; informational, as a connect answered from a live
            # connection need not send anything.
            traffic = None
            while before is not None:
                after = _bytes_in(a, b)
                traffic = after is not None and after > before
                if traffic or time.monotonic() >= deadline:
                    break
                time.sleep(POLL_S)
            result = Fallback(ok, None if ok else "connected only after the window", a.site.name,
                              b.site.name, router, method, round(elapsed * 1000, 1), path,
                              attempts, traffic)
            self.progress(f"  fallback {'ok' if ok else 'FAILED'}: {path} after "
                          f"{elapsed * 1000:.0f} ms")
            return result
        self.progress(f"  fallback FAILED: {last_error}")
        return Fallback(False, f"no connect succeeded within {FALLBACK_WINDOW_S:g} s: "
                               f"{last_error}", a.site.name, b.site.name, router, method,
                        None, None, attempts, None)

    def collect(self) -> list[dict[str, Any]]:
        """Each site as the lab built it and as its node finally reported itself."""
        sites = []
        for node in self.nodes.values():
            try:
                node.final_status = node.call("status")
            except HmnodeError as exc:
                node.final_status = {"error": _short_error(exc)}
            nat = node.final_status.get("nat") if isinstance(node.final_status, dict) else None
            sites.append({**node.site.to_dict(), "node_id": node.node_id,
                          "pid": node.proc.pid if node.proc else None,
                          "alive": bool(node.proc and node.proc.poll() is None),
                          "nat": nat})
        return sites

    def logs(self) -> list[NodeLog]:
        """What each node's log holds of warnings, errors and tracebacks."""
        return [read_node_log(n.site.name, n.log_file, self.kept) for n in self.nodes.values()]


def _tail(path: Path, lines: int = 12) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _relay_state(nat: Any) -> str:
    """What a node's `status.nat` says of its relay reservation (see Readiness.relays)."""
    if not isinstance(nat, dict):
        return "not reported"
    if nat.get("relay") is not None:
        return "held"
    # A node that found itself reachable from anyone needs no relay: that is not a failure.
    return "not needed" if nat.get("reachability") == "public" else "missing"


def _advert_seqs(node: _Node) -> dict[str, int]:
    """node id -> the advert sequence number `node` holds (empty when it does not answer)."""
    try:
        adverts = node.call("adverts")
    except HmnodeError:
        return {}
    if not isinstance(adverts, list):
        return {}
    return {str(a.get("node_id")): int(a.get("seq", 0)) for a in adverts
            if isinstance(a, dict) and isinstance(a.get("seq", 0), int)}


def _bytes_in(a: _Node, b: _Node) -> int | None:
    try:
        conns = a.call("peers").get("connections", [])
    except (HmnodeError, AttributeError):
        return None
    seen = next((c for c in conns if c.get("node_id") == b.node_id), None)
    value = seen.get("bytes_in") if seen else None
    return value if isinstance(value, int) else None


def _expire_udp_bindings(router: str) -> None:
    """Without the conntrack tool: make the router's UDP bindings expire after 1 s, let them,
    and put the timeouts back."""
    keys = ("net.netfilter.nf_conntrack_udp_timeout",
            "net.netfilter.nf_conntrack_udp_timeout_stream")
    old = {k: run_cmd(in_ns(router, "sysctl", "-n", k)).strip() for k in keys}
    try:
        for k in keys:
            run_cmd(in_ns(router, "sysctl", "-qw", f"{k}=1"))
        time.sleep(3.0)
    finally:
        for k, v in old.items():
            run_cmd(in_ns(router, "sysctl", "-qw", f"{k}={v}"))


def round_robin(n: int) -> list[list[tuple[int, int]]]:
    """Every unordered pair of range(n) once, in rounds where each index appears at most once
    (the circle method); pairs as (lower, higher)."""
    players: list[int | None] = [*range(n), *([None] if n % 2 else [])]
    m = len(players)
    rounds = []
    for _ in range(m - 1):
        rnd = []
        for i in range(m // 2):
            x, y = players[i], players[m - 1 - i]
            if x is not None and y is not None:
                rnd.append((min(x, y), max(x, y)))
        rounds.append(sorted(rnd))
        players = [players[0], players[-1], *players[1:-1]]
    return rounds


def _pair_line(p: PairResult) -> str:
    if not p.connected:
        state = f"not connected: {p.error}"
    elif p.direct:
        state = f"direct after {p.time_to_direct_ms:.0f} ms"
    else:
        state = f"{p.path or 'connected'}, never direct in {DIRECT_WAIT_S:g} s"
    return f"{p.a:>12} -> {p.b:<12} {state}"


# --- a run -------------------------------------------------------------------------------------


def run_lab(kinds: Sequence[str] = REDUCED, keep_logs: Path | None = None,
            progress: Progress = lambda line: None) -> dict[str, Any]:
    """Run the whole lab and return its report (see the module docstring); everything it
    created is gone when it returns or raises."""
    check_requirements()
    started = time.monotonic()
    phases: dict[str, float] = {}

    def phase(name: str, since: float) -> float:
        """Record how long phase `name` took since `since`; now."""
        now = time.monotonic()
        phases[name] = round(now - since, 3)
        return now

    removed = clean_leftovers(progress)
    with NatLab(kinds, keep_logs, progress) as lab:
        t = time.monotonic()
        lab.build()
        t = phase("build_s", t)
        checks = lab.check_kinds()
        t = phase("self_check_s", t)
        lab.start_nodes()
        t = phase("start_s", t)
        readiness = lab.wait_ready()
        t = phase("ready_s", t)
        pairs = lab.run_matrix()
        t = phase("matrix_s", t)
        fallback = lab.fallback(pairs)
        t = phase("fallback_s", t)
        sites = lab.collect()
        prefix, workdir = lab.prefix, lab.workdir
        teardown_problems = lab.close()
        logs = lab.final_logs
        phase("teardown_s", t)
    summary = summarise(pairs, fallback)
    return {
        **summary,
        "floors": floors_met(summary),
        "kinds": list(kinds),
        "prefix": prefix,
        "logs_dir": str(workdir) if keep_logs is not None else None,
        "sites": sites,
        "self_check": [c.to_dict() for c in checks],
        "readiness": readiness.to_dict(),
        "pairs": [p.to_dict() for p in pairs],
        "fallback": fallback.to_dict(),
        "node_logs": [entry.to_dict() for entry in logs],
        "leftovers_removed": removed,
        "teardown_problems": teardown_problems,
        "phases": phases,
        "wall_s": round(time.monotonic() - started, 3),
    }
