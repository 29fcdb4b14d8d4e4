"""The NAT lab's network: Linux network namespaces, veth links and iptables NAT routers.

A core "internet" router namespace has one veth link to each site, with public-looking addresses
(11.0.N.0/30: the core is 11.0.N.1, the site's outermost box 11.0.N.2), so that exactly one
routed hop separates any two sites. A site is a host namespace that will run one node:

- `public`: the host sits on its public link itself (no NAT);
- `cone`: the host is on 10.N.0.0/24 behind a router doing MASQUERADE (endpoint-independent
  mapping, address-and-port-dependent filtering: a port-restricted cone);
- `symmetric`: the same with MASQUERADE --random-fully (a new public port per destination);
- `fullcone`: cone plus a DNAT port forward of the node's UDP port to the host;
- `double`: the host on 192.168.N.0/24 behind an inner MASQUERADE router, itself on 10.N.0.0/24
  behind an outer MASQUERADE router on the public link.

A probe namespace (a second public address, no node) serves the self-check, which proves each
NAT kind behaves as its kind with tiny UDP programs before any node starts.

Every namespace is named with a per-run prefix `hmlab<pid>-<hex>-`, so that parallel runs never
clash and a dead run's leftovers can be found and removed (`clean_leftovers`).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import psutil

from hmnode.errors import HmnodeError, UsageError

PREFIX = "hmlab"
# A lab's namespaces are `hmlab<pid of the process that made them>-<4 hex>-<role>`.
_NAME_RE = re.compile(rf"^{PREFIX}(\d+)-[0-9a-f]+-")
NODE_PORT = 4819
ECHO_PORT = 3478
KINDS = ("public", "cone", "symmetric", "fullcone", "double")
NAT_KINDS = frozenset(KINDS) - {"public"}
MAX_SITES = 32
CMD_TIMEOUT_S = 15.0
# The self-check's helper programs: every wait is bounded, and a server exits by itself after
# its lifetime even if this process died without killing it.
ECHO_SERVER_LIFETIME_S = 120.0
ECHO_READY_TIMEOUT_S = 10.0
CHECK_TIMEOUT_S = 20.0
POKE_WAIT_S = 1.0

Progress = Callable[[str], None]


class NatLabError(HmnodeError):
    """The NAT lab could not be built or run as asked."""


class NatLabUnavailable(UsageError):
    """This machine lacks what the NAT lab needs (root, `ip`, `iptables`)."""


class NatKindMisbehaves(NatLabError):
    """A site's NAT does not behave as its kind, so the lab's numbers would mean nothing."""


class LabInterrupted(HmnodeError):
    """SIGINT, SIGTERM or SIGHUP arrived while the lab ran; everything was torn down."""

    exit_code = 130


def missing_requirements() -> list[str]:
    """What this machine lacks to run the lab (empty when it has everything)."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root (it creates network namespaces and iptables rules)")
    missing += [f"`{tool}`" for tool in ("ip", "iptables") if shutil.which(tool) is None]
    return missing


def check_requirements() -> None:
    """Raise NatLabUnavailable (exit code 2) naming what is missing to run the lab."""
    missing = missing_requirements()
    if missing:
        raise NatLabUnavailable(
            f"the NAT lab needs {', '.join(missing)}; run it as root on Linux with iproute2 and "
            "iptables installed (`.ci/run` installs them: apt-get install iproute2 iptables "
            "conntrack)")


def run_cmd(argv: Sequence[str], timeout: float = CMD_TIMEOUT_S, check: bool = True,
            env: dict[str, str] | None = None) -> str:
    """Run one command to completion; its stdout. A failure raises NatLabError naming it."""
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, env=env)
    except subprocess.TimeoutExpired:
        raise NatLabError(f"`{' '.join(argv)}` did not finish within {timeout:g} s") from None
    except OSError as exc:
        raise NatLabError(f"cannot run `{' '.join(argv)}`: {exc}") from None
    if check and done.returncode != 0:
        raise NatLabError(f"`{' '.join(argv)}` failed (exit {done.returncode}): "
                          f"{(done.stderr or done.stdout).strip()}")
    return done.stdout


def in_ns(ns: str, *argv: str) -> list[str]:
    """`argv` as run inside namespace `ns`."""
    return ["ip", "netns", "exec", ns, *argv]


def list_namespaces() -> list[str]:
    """The names of every named network namespace (`ip netns list`)."""
    out = run_cmd(["ip", "netns", "list"])
    # Lines read `name` or `name (id: 3)`.
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _kill_pids_in(ns: str) -> None:
    """SIGKILL whatever still runs inside namespace `ns` (only the lab starts processes there)."""
    try:
        pids = run_cmd(["ip", "netns", "pids", ns], check=False).split()
    except NatLabError:
        return
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def delete_namespace(ns: str) -> str | None:
    """Kill what runs in `ns` and delete it; None, or why it could not be deleted."""
    _kill_pids_in(ns)
    try:
        run_cmd(["ip", "netns", "del", ns])
    except NatLabError as exc:
        if ns in list_namespaces():
            return str(exc)
    return None


def clean_leftovers(progress: Progress = lambda line: None) -> list[str]:
    """Delete the namespaces (and temporary directories) of lab runs whose process is gone;
    what was deleted.

    A run's namespaces carry its pid, so the namespaces of a run still going (here or in a
    parallel process) are left alone.
    """
    removed = []
    for ns in list_namespaces():
        match = _NAME_RE.match(ns)
        if match is None or _alive(int(match.group(1))):
            continue
        if delete_namespace(ns) is None:
            removed.append(ns)
            progress(f"removed namespace {ns}, left by dead lab run {match.group(1)}")
    # A run killed outright also leaves its temporary directory of node data dirs and logs.
    tmp = Path(tempfile.gettempdir())
    for path in tmp.glob(f"{PREFIX}*"):
        match = _NAME_RE.match(path.name + "-")
        if match is None or not path.is_dir() or _alive(int(match.group(1))):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(str(path))
        progress(f"removed {path}, left by dead lab run {match.group(1)}")
    return removed


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def new_prefix() -> str:
    """A fresh per-run namespace prefix: `hmlab<pid>-<4 hex>-`."""
    return f"{PREFIX}{os.getpid()}-{secrets.token_hex(2)}-"


# --- the topology ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Site:
    """One site: the host namespace that runs a node, and the NAT routers in front of it."""

    name: str
    kind: str
    link: int  # N of its public link 11.0.N.0/30
    host_ns: str
    host_ip: str  # the host's own address
    public_ip: str  # the address the internet sees it from: its outer router's, or its own
    routers: tuple[str, ...]  # NAT router namespaces, outermost (on the public link) first

    @property
    def natted(self) -> bool:
        """Whether the host is behind a NAT."""
        return self.kind != "public"

    def to_dict(self) -> dict[str, Any]:
        """This record as JSON-ready data."""
        return asdict(self)


@dataclass(frozen=True)
class Topology:
    """The lab's network as built."""

    prefix: str
    core_ns: str
    probe_ns: str
    probe_ip: str
    sites: tuple[Site, ...]

    def site(self, name: str) -> Site:
        """The site called `name`."""
        return next(s for s in self.sites if s.name == name)

    @property
    def bootstrap(self) -> Site:
        """The public site whose node bootstraps and relays for the others."""
        return next(s for s in self.sites if s.kind == "public")


def site_names(kinds: Sequence[str]) -> list[str]:
    """A name for each site: `public`, `cone-1`, `cone-2`, `symmetric-1`, ..."""
    names, seen = [], dict.fromkeys(kinds, 0)
    for kind in kinds:
        seen[kind] += 1
        names.append(kind if kind == "public" and kinds.count("public") == 1
                     else f"{kind}-{seen[kind]}")
    return names


def validate_kinds(kinds: Sequence[str]) -> None:
    """Raise UsageError unless `kinds` is a list of known kinds with a public site first."""
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        raise UsageError(f"unknown site kind {', '.join(unknown)}; the kinds are "
                         f"{', '.join(KINDS)}")
    if not kinds or kinds[0] != "public":
        raise UsageError("the first site must be `public`: its node is the bootstrap and relay")
    if not 2 <= len(kinds) <= MAX_SITES:
        raise UsageError(f"a lab has 2 to {MAX_SITES} sites, not {len(kinds)}")


class Namespaces:
    """The namespaces one lab run creates, recorded before each is made so that teardown
    deletes every one, even after a half-finished build."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.created: list[str] = []

    def add(self, role: str) -> str:
        """Create namespace `<prefix><role>` with its loopback up; its name."""
        name = self.prefix + role
        self.created.append(name)
        run_cmd(["ip", "netns", "add", name])
        run_cmd(["ip", "-n", name, "link", "set", "lo", "up"])
        return name

    def destroy(self) -> list[str]:
        """Delete every namespace recorded, then any other left with the prefix; problems."""
        problems = [f"{ns}: {why}" for ns in reversed(self.created)
                    if (why := delete_namespace(ns)) is not None]
        self.created.clear()
        try:
            for ns in list_namespaces():
                if ns.startswith(self.prefix) and (why := delete_namespace(ns)) is not None:
                    problems.append(f"{ns}: {why}")
        except NatLabError as exc:
            problems.append(str(exc))
        return problems


def _link(a_ns: str, a_if: str, a_cidr: str, b_ns: str, b_if: str, b_cidr: str) -> None:
    """A veth pair between two namespaces, addressed and up (made inside the namespaces, so
    interface names only need to be unique per namespace, never in the root namespace)."""
    run_cmd(["ip", "link", "add", "name", a_if, "netns", a_ns, "type", "veth",
             "peer", "name", b_if, "netns", b_ns])
    for ns, iface, cidr in ((a_ns, a_if, a_cidr), (b_ns, b_if, b_cidr)):
        run_cmd(["ip", "-n", ns, "addr", "add", cidr, "dev", iface])
        run_cmd(["ip", "-n", ns, "link", "set", iface, "up"])


def _default_route(ns: str, via: str) -> None:
    run_cmd(["ip", "-n", ns, "route", "add", "default", "via", via])


def _router(ns: str) -> None:
    run_cmd(in_ns(ns, "sysctl", "-qw", "net.ipv4.ip_forward=1"))


def _masquerade(ns: str, random_fully: bool = False) -> None:
    run_cmd(in_ns(ns, "iptables", "-t", "nat", "-A", "POSTROUTING", "-o", "wan", "-j",
                  "MASQUERADE", *(["--random-fully"] if random_fully else [])))


def build_topology(kinds: Sequence[str], spaces: Namespaces,
                   progress: Progress = lambda line: None) -> Topology:
    """Build the core, the probe and one site per kind; namespaces are recorded in `spaces`."""
    validate_kinds(kinds)
    prefix = spaces.prefix
    core = spaces.add("core")
    _router(core)
    sites = []
    for link, (name, kind) in enumerate(zip(site_names(kinds), kinds), start=1):
        core_ip, outer_ip = f"11.0.{link}.1", f"11.0.{link}.2"
        host = spaces.add(name)
        if kind == "public":
            _link(host, "eth0", f"{outer_ip}/30", core, f"l{link}", f"{core_ip}/30")
            _default_route(host, core_ip)
            sites.append(Site(name, kind, link, host, outer_ip, outer_ip, ()))
            progress(f"  {name:14} {outer_ip} on the core")
            continue
        outer = spaces.add(f"{name}-nat")
        _router(outer)
        _link(outer, "wan", f"{outer_ip}/30", core, f"l{link}", f"{core_ip}/30")
        _default_route(outer, core_ip)
        _masquerade(outer, random_fully=kind == "symmetric")
        routers = (outer,)
        if kind == "double":
            inner = spaces.add(f"{name}-nat2")
            _router(inner)
            _link(inner, "wan", f"10.{link}.0.2/24", outer, "lan", f"10.{link}.0.1/24")
            _default_route(inner, f"10.{link}.0.1")
            _masquerade(inner)
            host_ip, gateway, lan_router = f"192.168.{link}.2", f"192.168.{link}.1", inner
            routers = (outer, inner)
        else:
            host_ip, gateway, lan_router = f"10.{link}.0.2", f"10.{link}.0.1", outer
        _link(host, "eth0", f"{host_ip}/24", lan_router, "lan", f"{gateway}/24")
        _default_route(host, gateway)
        if kind == "fullcone":
            # The port forward a user sets up on a home router: unsolicited packets to the
            # node's port reach the node, from anyone.
            run_cmd(in_ns(outer, "iptables", "-t", "nat", "-A", "PREROUTING", "-i", "wan", "-p",
                          "udp", "--dport", str(NODE_PORT), "-j", "DNAT", "--to-destination",
                          f"{host_ip}:{NODE_PORT}"))
        sites.append(Site(name, kind, link, host, host_ip, outer_ip, routers))
        progress(f"  {name:14} {host_ip} behind {outer_ip}"
                 + (" (two NATs)" if kind == "double" else ""))
    probe_link = len(kinds) + 1
    probe = spaces.add("probe")
    probe_ip = f"11.0.{probe_link}.2"
    _link(probe, "eth0", f"{probe_ip}/30", core, f"l{probe_link}", f"11.0.{probe_link}.1/30")
    _default_route(probe, f"11.0.{probe_link}.1")
    return Topology(prefix, core, probe, probe_ip, tuple(sites))


def flush_conntrack(ns: str) -> bool:
    """Forget every NAT binding of router `ns` (`conntrack -F`); False without `conntrack`."""
    if shutil.which("conntrack") is None:
        return False
    run_cmd(in_ns(ns, "conntrack", "-F"))
    return True


# --- processes ---------------------------------------------------------------------------------


class Processes:
    """The processes one lab run starts, so that teardown stops every one."""

    def __init__(self) -> None:
        self._procs: list[subprocess.Popen] = []

    def spawn(self, argv: Sequence[str], *, stdout: IO[Any] | int | None = subprocess.DEVNULL,
              env: dict[str, str] | None = None, cwd: str | None = None) -> subprocess.Popen:
        """Start `argv` in its own session (so a terminal's Ctrl-C reaches only the lab)."""
        proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=stdout,
                                stderr=subprocess.STDOUT if stdout is not subprocess.PIPE
                                else subprocess.DEVNULL,
                                env=env, cwd=cwd, close_fds=True, start_new_session=True)
        self._procs.append(proc)
        return proc

    def stop(self, grace_s: float) -> list[str]:
        """SIGTERM every live process, SIGKILL those alive after `grace_s`; problems."""
        problems = []
        live = [p for p in self._procs if p.poll() is None]
        for proc in live:
            try:
                proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        for proc in live:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                try:
                    proc.wait(timeout=5.0)
                except subprocess.TimeoutExpired:
                    problems.append(f"pid {proc.pid} survived SIGKILL")
        self._procs.clear()
        return problems


# --- the self-check ----------------------------------------------------------------------------

# Run with `python -c` inside a namespace. `server ARGS`: a STUN-like UDP echo server that tells
# each sender the address it sees it from, and on request sends a packet from a fresh port to an
# address (an unsolicited packet). `client ARGS`: from the node's port, ask each server what it
# sees, then ask each to send an unsolicited packet to the mapping the first one saw, and report.
_UDP_TOOL = r'''
import json, select, socket, sys, time
mode, arg = sys.argv[1], json.loads(sys.argv[2])
def addr(text):
    host, _, port = text.rpartition(":")
    return host, int(port)
def recv(sock, until):
    left = until - time.monotonic()
    if left <= 0 or not select.select([sock], [], [], left)[0]:
        return None, None
    data, src = sock.recvfrom(2048)
    try:
        return json.loads(data), src
    except ValueError:
        return {}, src
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind(("0.0.0.0", arg["port"]))
if mode == "server":
    print("ready", flush=True)
    end = time.monotonic() + arg["lifetime"]
    while time.monotonic() < end:
        msg, src = recv(sock, min(end, time.monotonic() + 0.5))
        if not msg:
            continue
        if msg.get("op") == "echo":
            reply = {"token": msg.get("token"), "observed": "%s:%d" % src}
            sock.sendto(json.dumps(reply).encode(), src)
        elif msg.get("op") == "poke":
            fresh = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            fresh.bind(("0.0.0.0", 0))
            for _ in range(3):
                fresh.sendto(json.dumps({"poke": msg.get("token")}).encode(), addr(msg["to"]))
            fresh.close()
    sys.exit(0)
out = {"observed": [], "pokes": []}
for i, server in enumerate(arg["servers"]):
    seen = None
    for attempt in range(5):
        token = "echo-%d-%d" % (i, attempt)
        sock.sendto(json.dumps({"op": "echo", "token": token}).encode(), addr(server))
        until = time.monotonic() + 0.4
        while seen is None:
            msg, src = recv(sock, until)
            if msg is None:
                break
            if src == addr(server) and str(msg.get("token", "")).startswith("echo-%d-" % i):
                seen = msg.get("observed")
        if seen:
            break
    out["observed"].append(seen)
if out["observed"][0]:
    for i, server in enumerate(arg["servers"]):
        poke = {"op": "poke", "token": "poke-%d" % i, "to": out["observed"][0]}
        sock.sendto(json.dumps(poke).encode(), addr(server))
    got = set()
    until = time.monotonic() + arg["wait"]
    while True:
        msg, src = recv(sock, until)
        if msg is None:
            break
        if msg.get("poke"):
            got.add(msg["poke"])
    out["pokes"] = ["poke-%d" % i in got for i in range(len(arg["servers"]))]
print(json.dumps(out))
'''


@dataclass(frozen=True)
class KindCheck:
    """What the self-check saw of one site, and whether that is its kind's behaviour."""

    site: str
    kind: str
    # The address each echo server (the public host's, then the probe's) saw the host's node
    # port from; None where no answer came.
    observed: tuple[str | None, ...]
    # Whether an unsolicited packet from a fresh port of each server reached the host.
    unsolicited_reached: tuple[bool, ...]
    problem: str | None

    @property
    def ok(self) -> bool:
        """Whether the site behaves as its kind."""
        return self.problem is None

    def to_dict(self) -> dict[str, Any]:
        """This record as JSON-ready data."""
        return {**asdict(self), "ok": self.ok}


def judge(site: Site, observed: Sequence[str | None], reached: Sequence[bool]) -> str | None:
    """Why what the self-check saw of `site` is not its kind's behaviour, or None if it is."""
    if not observed or any(o is None for o in observed):
        return (f"the echo servers did not all answer the host ({list(observed)}): routing or "
                "NAT through the core is broken")
    ips = {o.rpartition(":")[0] for o in observed if o}
    ports = {o.rpartition(":")[2] for o in observed if o}
    if ips != {site.public_ip}:
        return f"seen from {sorted(ips)}, not from its public address {site.public_ip}"
    if site.kind == "symmetric":
        if len(ports) == 1:
            return ("the same public port for two destinations: the NAT is not symmetric "
                    "(does this iptables support MASQUERADE --random-fully?)")
    elif len(ports) != 1:
        return (f"public ports {sorted(ports)} for two destinations: a {site.kind} site must "
                "map one port to every destination")
    if site.kind in ("public", "fullcone") and ports != {str(NODE_PORT)}:
        return f"the node port {NODE_PORT} is seen as {sorted(ports)}: not preserved"
    if len(reached) != len(observed):
        return "the unsolicited-packet test did not run"
    if site.kind in ("public", "fullcone") and not all(reached):
        return ("an unsolicited packet from a fresh port did not reach the host: a "
                f"{site.kind} host must be reachable from anyone")
    if site.kind in ("cone", "symmetric", "double") and any(reached):
        return ("an unsolicited packet from a fresh port reached the host: the NAT's filtering "
                "is not address-and-port-dependent")
    return None


def _wait_ready_line(proc: subprocess.Popen, what: str) -> None:
    assert proc.stdout is not None
    if not select.select([proc.stdout], [], [], ECHO_READY_TIMEOUT_S)[0]:
        raise NatLabError(f"{what} did not start within {ECHO_READY_TIMEOUT_S:g} s")
    if proc.stdout.readline().strip() != b"ready":
        raise NatLabError(f"{what} exited with code {proc.wait(timeout=5)} before it was ready")


def self_check(topology: Topology, processes: Processes,
               progress: Progress = lambda line: None) -> list[KindCheck]:
    """Check every site's NAT with UDP probes (before nodes start, on the node port)."""
    servers = [f"{topology.bootstrap.host_ip}:{ECHO_PORT}", f"{topology.probe_ip}:{ECHO_PORT}"]
    started = []
    for ns, server in ((topology.bootstrap.host_ns, servers[0]), (topology.probe_ns, servers[1])):
        args = json.dumps({"port": ECHO_PORT, "lifetime": ECHO_SERVER_LIFETIME_S})
        proc = processes.spawn(in_ns(ns, sys.executable, "-c", _UDP_TOOL, "server", args),
                               stdout=subprocess.PIPE)
        started.append(proc)
        _wait_ready_line(proc, f"the echo server at {server}")
    try:
        clients = {}
        for site in topology.sites:
            args = json.dumps({"port": NODE_PORT, "servers": servers, "wait": POKE_WAIT_S})
            clients[site.name] = subprocess.Popen(
                in_ns(site.host_ns, sys.executable, "-c", _UDP_TOOL, "client", args),
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                text=True)
        checks = []
        for site in topology.sites:
            proc = clients[site.name]
            try:
                out, err = proc.communicate(timeout=CHECK_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
                out, err = "", f"no answer within {CHECK_TIMEOUT_S:g} s"
            try:
                result = json.loads(out.strip().splitlines()[-1])
                observed = tuple(result["observed"])
                reached = tuple(bool(r) for r in result["pokes"])
                problem = judge(site, observed, reached)
            except (ValueError, IndexError, KeyError, TypeError):
                observed, reached = (), ()
                problem = f"the probe program failed: {err.strip()[-300:] or out[-300:]}"
            check = KindCheck(site.name, site.kind, observed, reached, problem)
            checks.append(check)
            progress(f"  {site.name:14} seen as {', '.join(o or '-' for o in observed)}; "
                     f"unsolicited reached: {list(reached)}; "
                     + ("ok" if check.ok else f"WRONG: {problem}"))
    finally:
        for proc in started:
            proc.kill()
            proc.wait(timeout=5)
    # The probes' bindings would outlive them by the UDP timeout; start the nodes from clean
    # routers where the tool is there (the bindings are harmless otherwise: other ports).
    for site in topology.sites:
        for router in site.routers:
            flush_conntrack(router)
    return checks


def require_kinds(checks: Sequence[KindCheck]) -> None:
    """Raise NatKindMisbehaves naming every site that does not behave as its kind."""
    bad = [c for c in checks if not c.ok]
    if bad:
        raise NatKindMisbehaves(
            "the NAT self-check failed, so the lab's numbers would mean nothing: "
            + "; ".join(f"{c.site} ({c.kind}): {c.problem}" for c in bad)
            + ". Check the kernel's netfilter NAT support and the iptables version")
