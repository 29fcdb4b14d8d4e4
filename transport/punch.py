"""Which way two nodes open a direct path, and the numbers of birthday probing. Sans-IO.

Both ends know their own reachability and learn the other's in the DCUtR exchange; each then
computes its side of one plan (`choose_strategy` is a mirror: what one side calls PUNCH the other
does too, BIRTHDAY_HARD on one side is BIRTHDAY_EASY on the other, DIRECT meets THEY_DIAL).

Birthday probing (as Tailscale does it) connects an endpoint-dependent ("hard", symmetric) NAT
to an endpoint-independent ("easy") one: the hard side opens `hard_ports` sockets, each primed
towards the easy side, so its NAT holds that many random public ports open for the easy side's
address; the easy side sends probes to random ports of the hard side's IP. With 256 open ports
among 64,512 and 1,024 distinct probes, a probe hits one with probability
1 - C(64512-256, 1024) / C(64512, 1024), about 98%.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Iterator
from dataclasses import dataclass

from hmnode.transport.reachability import Reachability

# Candidate addresses exchanged, and dialled at once, per punch.
MAX_PUNCH_ADDRESSES = 8
# Linux NATs pick mapped ports from here (the kernel's default range for MASQUERADE).
FIRST_NAT_PORT = 1024
LAST_NAT_PORT = 65535


class PunchStrategy(str, enum.Enum):
    """This side's part in opening a direct path."""

    DIRECT = "direct"  # the peer is public: dial it
    THEY_DIAL = "they_dial"  # this node is public: the peer dials it
    PUNCH = "punch"  # both endpoint-independent: prime, then one side dials
    BIRTHDAY_HARD = "birthday_hard"  # this side is symmetric: many primed sockets
    BIRTHDAY_EASY = "birthday_easy"  # the peer is symmetric: probe its random ports
    RELAY_ONLY = "relay_only"  # both symmetric: no direct path within bounds


def choose_strategy(mine: Reachability, theirs: Reachability) -> PunchStrategy:
    """This side's part, given both ends' reachability (unknown is tried as a cone)."""
    if theirs == Reachability.PUBLIC:
        return PunchStrategy.DIRECT
    if mine == Reachability.PUBLIC:
        return PunchStrategy.THEY_DIAL
    hard_me, hard_them = mine == Reachability.SYMMETRIC, theirs == Reachability.SYMMETRIC
    if hard_me and hard_them:
        return PunchStrategy.RELAY_ONLY
    if hard_me:
        return PunchStrategy.BIRTHDAY_HARD
    if hard_them:
        return PunchStrategy.BIRTHDAY_EASY
    return PunchStrategy.PUNCH


@dataclass(frozen=True)
class BirthdayPlan:
    """Bounds of one birthday probe: sockets on the hard side, probes and pace on the easy one."""

    hard_ports: int = 256
    probes: int = 1024
    batch: int = 64
    batch_interval_s: float = 0.05
    wait_s: float = 6.0

    def batches(self, rng: random.Random) -> Iterator[list[int]]:
        """`probes` distinct random ports, `batch` at a time."""
        ports = rng.sample(range(FIRST_NAT_PORT, LAST_NAT_PORT + 1), self.probes)
        for start in range(0, len(ports), self.batch):
            yield ports[start:start + self.batch]

    def hit_probability(self, port_range: int = LAST_NAT_PORT - FIRST_NAT_PORT + 1) -> float:
        """The chance that some probe lands on an open port (hypergeometric, no repeats)."""
        miss = 1.0
        for i in range(self.probes):
            miss *= (port_range - self.hard_ports - i) / (port_range - i)
        return 1.0 - miss
