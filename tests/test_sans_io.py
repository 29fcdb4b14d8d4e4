"""The protocol cores stay sans-IO: no clock, global randomness, sockets, threads or disk of their
own (DESIGN.md). A deterministic simulator must be able to drive them and replay a seed exactly."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORES = ["hmnode/membership.py", "hmnode/broadcast.py", "hmnode/adverts.py", "hmnode/gossip_node.py",
         "hmnode/chain_node.py", "consensus/tendermint.py", "consensus/mempool.py",
         "consensus/chain.py", "consensus/validators.py", "consensus/messages.py",
         "consensus/kvapp.py", "hmnode/state_machine.py", "hmnode/ledger.py", "hmnode/jobs.py",
         "hmnode/allocation.py", "hmnode/registry.py"]

BANNED_MODULES = {"socket", "asyncio", "threading", "secrets", "uuid", "subprocess", "lmdb"}
BANNED_CALLS = {
    ("time", "time"), ("time", "monotonic"), ("time", "perf_counter"), ("time", "sleep"),
    ("os", "urandom"), ("os", "getrandom"), ("uuid", "uuid4"), ("uuid", "uuid1"),
}
# Module-level functions of `random` draw from a hidden global generator; cores get a
# random.Random instead (constructing one, or naming the type, is allowed).
RANDOM_ALLOWED = {"Random"}


def violations(source: str) -> list[str]:
    """Every banned import or call in `source`, as 'line: what'."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in BANNED_MODULES:
                    found.append(f"{node.lineno}: import {alias.name}")
        elif isinstance(node, ast.ImportFrom) and node.module:
            root = node.module.split(".")[0]
            if root in BANNED_MODULES:
                found.append(f"{node.lineno}: from {node.module} import ...")
            if root in ("time", "os") or (root == "random" and any(
                    a.name not in RANDOM_ALLOWED for a in node.names)):
                found.append(f"{node.lineno}: from {node.module} import "
                             + ", ".join(a.name for a in node.names))
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            pair = (node.value.id, node.attr)
            if pair in BANNED_CALLS or (node.value.id == "random" and node.attr not in RANDOM_ALLOWED):
                found.append(f"{node.lineno}: {node.value.id}.{node.attr}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "open":
            found.append(f"{node.lineno}: open(...)")
    return found


@pytest.mark.parametrize("path", CORES)
def test_protocol_cores_have_no_io_of_their_own(path: str) -> None:
    assert violations((ROOT / path).read_text()) == []


@pytest.mark.parametrize("snippet", [
    "import time\nt = time.time()",
    "import time\nt = time.monotonic()",
    "import random\nx = random.random()",
    "import random\nrandom.shuffle([])",
    "from random import choice",
    "import os\nk = os.urandom(8)",
    "import socket",
    "from asyncio import sleep",
    "import uuid\nu = uuid.uuid4()",
    "f = open('x')",
])
def test_the_checker_catches_each_banned_use(snippet: str) -> None:
    assert violations(snippet), snippet


def test_the_checker_allows_an_injected_generator() -> None:
    assert violations("import random\nrng: random.Random = random.Random(7)\nrng.random()") == []
