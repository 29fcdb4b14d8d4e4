"""The simulator's NAT model behaves as RFC 4787 classifies NATs: mapping, filtering, binding
timeouts, port preservation, hairpinning and a bounded table."""

from __future__ import annotations

import dataclasses
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hmnode.simnet.sim.nat import (
    FULL_CONE, HARSH_HOME, OPEN, PORT_RESTRICTED_CONE, PRESETS, RESTRICTED_CONE, SYMMETRIC,
    Addr, FilteringType, MappingType, Nat, NatError, NatProfile,
)

PUBLIC = "198.51.100.7"
A: Addr = ("10.0.0.2", 5000)
B: Addr = ("10.0.0.3", 5000)
R1: Addr = ("203.0.113.1", 4433)
R1_OTHER_PORT: Addr = ("203.0.113.1", 9999)
R2: Addr = ("203.0.113.2", 4433)

EIM, ADM, APDM = (MappingType.ENDPOINT_INDEPENDENT, MappingType.ADDRESS_DEPENDENT,
                  MappingType.ADDRESS_AND_PORT_DEPENDENT)
EIF, ADF, APDF = (FilteringType.ENDPOINT_INDEPENDENT, FilteringType.ADDRESS_DEPENDENT,
                  FilteringType.ADDRESS_AND_PORT_DEPENDENT)


def nat(profile: NatProfile = PORT_RESTRICTED_CONE, seed: int = 1, **changes: object) -> Nat:
    return Nat(PUBLIC, dataclasses.replace(profile, **changes), random.Random(seed))


# --- profiles ---------------------------------------------------------------------------------

def test_presets_are_the_classic_nat_types() -> None:
    assert OPEN is None and PRESETS["open"] is None
    assert (FULL_CONE.mapping, FULL_CONE.filtering) == (EIM, EIF)
    assert (RESTRICTED_CONE.mapping, RESTRICTED_CONE.filtering) == (EIM, ADF)
    assert (PORT_RESTRICTED_CONE.mapping, PORT_RESTRICTED_CONE.filtering) == (EIM, APDF)
    assert (SYMMETRIC.mapping, SYMMETRIC.filtering) == (APDM, APDF)
    assert HARSH_HOME.binding_timeout_s == 30.0
    # RFC 4787 REQ-5: the default binding timeout is at least two minutes.
    assert NatProfile().binding_timeout_s >= 120.0
    assert all(p is None or p.binding_timeout_s >= 120 for n, p in PRESETS.items() if n != "harsh-home")


@pytest.mark.parametrize("changes", [
    {"binding_timeout_s": 0.0},
    {"binding_timeout_s": -5.0},
    {"max_bindings": 0},
    {"port_range": (2000, 1000)},
    {"port_range": (0, 100)},
    {"port_range": (5000, 5009), "max_bindings": 11},
    {"mapping": "endpoint-independent"},
])
def test_impossible_profiles_are_refused(changes: dict[str, object]) -> None:
    with pytest.raises(NatError):
        dataclasses.replace(PORT_RESTRICTED_CONE, **changes)


def test_a_nat_needs_a_profile_and_sane_addresses() -> None:
    with pytest.raises(NatError):
        Nat(PUBLIC, None, random.Random(1))  # type: ignore[arg-type]
    n = nat()
    with pytest.raises(NatError):
        n.outbound(("10.0.0.2", 0), R1, 0.0)
    with pytest.raises(NatError):
        n.inbound((PUBLIC, 70000), R1, 0.0)


# --- mapping ----------------------------------------------------------------------------------

def test_endpoint_independent_mapping_reuses_one_port_and_preserves_it() -> None:
    n = nat(FULL_CONE)
    assert n.outbound(A, R1, 0.0) == (PUBLIC, A[1])  # port preservation
    assert n.outbound(A, R2, 1.0) == (PUBLIC, A[1])
    assert n.outbound(A, R1_OTHER_PORT, 2.0) == (PUBLIC, A[1])
    # B has the same internal port: it cannot be preserved twice.
    other = n.outbound(B, R1, 3.0)
    assert other[0] == PUBLIC and other[1] != A[1]
    assert len(n) == 2


def test_address_dependent_mapping_is_per_remote_ip() -> None:
    n = nat(RESTRICTED_CONE, mapping=ADM)
    first = n.outbound(A, R1, 0.0)
    assert n.outbound(A, R1_OTHER_PORT, 1.0) == first
    assert n.outbound(A, R2, 2.0) != first


def test_address_and_port_dependent_mapping_is_per_remote_address() -> None:
    n = nat(SYMMETRIC)
    ports = {n.outbound(A, r, float(i))[1] for i, r in enumerate([R1, R1_OTHER_PORT, R2])}
    assert len(ports) == 3
    assert n.outbound(A, R1, 5.0)[1] in ports  # the same remote keeps its binding


def test_port_choice_comes_only_from_the_given_rng() -> None:
    def ports(seed: int) -> list[int]:
        n = nat(SYMMETRIC, seed=seed)
        return [n.outbound(A, ("203.0.113.9", 1000 + i), float(i))[1] for i in range(20)]

    assert ports(5) == ports(5)
    assert ports(5) != ports(6)
    assert all(1024 <= p <= 65535 for p in ports(5))


def test_without_port_preservation_ports_come_from_the_range() -> None:
    n = nat(PORT_RESTRICTED_CONE, port_preservation=False, port_range=(40000, 40009), max_bindings=10)
    ports = {n.outbound(("10.0.0.2", 6000 + i), R1, 0.0)[1] for i in range(10)}
    assert ports == set(range(40000, 40010))  # every port used once, the last ones by scanning


# --- filtering --------------------------------------------------------------------------------

@pytest.mark.parametrize("filtering, same_ip_other_port, stranger", [
    (EIF, True, True),
    (ADF, True, False),
    (APDF, False, False),
])
def test_filtering_admits_whom_its_type_says(filtering: FilteringType, same_ip_other_port: bool,
                                             stranger: bool) -> None:
    n = nat(PORT_RESTRICTED_CONE, filtering=filtering)
    ext = n.outbound(A, R1, 0.0)
    assert n.inbound(ext, R1, 1.0) == A  # the remote it sent to may always answer
    assert (n.inbound(ext, R1_OTHER_PORT, 1.0) == A) is same_ip_other_port
    assert (n.inbound(ext, R2, 1.0) == A) is stranger


def test_inbound_without_a_binding_or_to_another_ip_is_dropped() -> None:
    n = nat(FULL_CONE)
    assert n.inbound((PUBLIC, 5000), R1, 0.0) is None
    ext = n.outbound(A, R1, 0.0)
    assert n.inbound(("198.51.100.8", ext[1]), R1, 0.0) is None
    assert n.counters["refused-no-binding"] == 2


# --- timeouts ---------------------------------------------------------------------------------

def test_a_binding_expires_after_its_timeout_unless_refreshed() -> None:
    n = nat(HARSH_HOME)
    ext = n.outbound(A, R1, 0.0)
    assert n.inbound(ext, R1, 29.9) == A
    assert n.inbound(ext, R1, 30.0) is None  # expired at exactly refresh + timeout
    assert n.bindings(30.0) == [] and n.counters["expired"] == 1
    # Outbound traffic refreshes; a new binding preserves the port again.
    assert n.outbound(A, R1, 31.0) == ext
    assert n.outbound(A, R1, 50.0) == ext
    assert n.inbound(ext, R1, 79.0) == A


def test_inbound_refreshes_only_where_the_profile_says() -> None:
    for inbound_refresh, alive in ((False, False), (True, True)):
        n = nat(FULL_CONE, binding_timeout_s=10.0, inbound_refresh=inbound_refresh)
        ext = n.outbound(A, R1, 0.0)
        assert n.inbound(ext, R2, 8.0) == A
        assert (n.inbound(ext, R2, 15.0) == A) is alive


def test_a_filter_permission_expires_with_its_remote_silence() -> None:
    # A keeps the binding alive by talking to R2, but has not sent to R1 for longer than the
    # timeout: a port-restricted filter forgets R1.
    n = nat(PORT_RESTRICTED_CONE, binding_timeout_s=10.0)
    ext = n.outbound(A, R1, 0.0)
    for t in range(1, 15):
        n.outbound(A, R2, float(t))
    assert n.inbound(ext, R2, 14.5) == A
    assert n.inbound(ext, R1, 14.5) is None
    assert n.bindings(14.5)[0].permits == (R2,)


def test_a_binding_that_talks_to_many_remotes_sweeps_only_expired_permissions() -> None:
    # One remote a second for 150 s with a 100 s timeout: past 64 permissions the binding sweeps
    # the expired ones, and the filter still admits exactly the remotes heard from in time.
    n = nat(PORT_RESTRICTED_CONE, binding_timeout_s=100.0)
    remotes: list[Addr] = [(f"192.0.2.{i}", 4433) for i in range(150)]
    ext = n.outbound(A, remotes[0], 0.0)
    for t, remote in enumerate(remotes[1:], start=1):
        assert n.outbound(A, remote, float(t)) == ext
    assert n.inbound(ext, remotes[-1], 149.5) == A
    assert n.inbound(ext, remotes[60], 149.5) == A
    assert n.inbound(ext, remotes[10], 149.5) is None
    # The last sweep (at t=149) dropped every remote last sent to at t=49 or before.
    [binding] = n.bindings()
    assert sorted(binding.permits) == sorted(remotes[50:])


def test_expire_and_bindings_report_the_table() -> None:
    n = nat(SYMMETRIC, binding_timeout_s=10.0)
    n.outbound(A, R1, 0.0)
    n.outbound(A, R2, 5.0)
    snap = n.bindings()
    assert [b.remote for b in snap] == [R1, R2]
    assert snap[0].internal == A and snap[0].expires_at == 10.0 and snap[0].permits == (R1,)
    assert n.external_for(A, R2, 6.0) == snap[1].external
    assert n.external_for(A, ("203.0.113.3", 1), 6.0) is None
    assert n.expire(12.0) == 1 and len(n) == 1
    n.reset()
    assert len(n) == 0 and n.bindings() == []


def test_time_never_runs_backwards() -> None:
    n = nat(FULL_CONE, binding_timeout_s=10.0)
    n.outbound(A, R1, 20.0)
    ext = n.outbound(B, R1, 5.0)  # read as t=20
    assert n.bindings()[1].refreshed_at == 20.0
    assert n.inbound(ext, R2, 29.0) == B


# --- table bound and hairpinning --------------------------------------------------------------

def test_the_least_recently_refreshed_binding_is_evicted() -> None:
    n = nat(FULL_CONE, max_bindings=2)
    ext_a = n.outbound(A, R1, 0.0)
    n.outbound(B, R1, 1.0)
    n.outbound(A, R1, 2.0)  # A is now the most recently refreshed
    c: Addr = ("10.0.0.4", 7000)
    n.outbound(c, R1, 3.0)
    assert len(n) == 2 and n.counters["evicted"] == 1
    assert {b.internal for b in n.bindings()} == {A, c}
    assert n.inbound(ext_a, R1, 3.5) == A


def test_hairpinning_turns_traffic_round_with_the_senders_external_address() -> None:
    n = nat(FULL_CONE)
    ext_b = n.outbound(B, R1, 0.0)
    turned = n.hairpin(A, ext_b, 1.0)
    assert turned is not None
    seen, target = turned
    assert target == B and seen == n.external_for(A, ext_b, 1.0) and seen[0] == PUBLIC
    no = nat(FULL_CONE, hairpinning=False)
    ext_b = no.outbound(B, R1, 0.0)
    assert no.hairpin(A, ext_b, 1.0) is None and no.counters["refused-hairpin"] == 1


# --- properties -------------------------------------------------------------------------------

IPS = ["203.0.113.1", "203.0.113.2", "203.0.113.3"]
remotes = st.tuples(st.sampled_from(IPS), st.sampled_from([80, 443, 4433]))
internals = st.tuples(st.sampled_from(["10.0.0.2", "10.0.0.3"]), st.sampled_from([5000, 5001]))
mappings = st.sampled_from(list(MappingType))
filterings = st.sampled_from(list(FilteringType))


@given(mappings, filterings, st.lists(remotes, min_size=1, max_size=20), st.integers(0, 2**32))
@settings(max_examples=60, deadline=None)
def test_mapping_reuse_follows_the_mapping_type(mapping: MappingType, filtering: FilteringType,
                                                 dests: list[Addr], seed: int) -> None:
    n = Nat(PUBLIC, NatProfile(mapping, filtering), random.Random(seed))
    seen: dict[Addr, int] = {}
    for i, remote in enumerate(dests):
        seen[remote] = n.outbound(A, remote, i * 0.1)[1]
    for r1, p1 in seen.items():
        for r2, p2 in seen.items():
            if mapping is EIM:
                same = True  # every remote sees one external port
            elif mapping is ADM:
                same = r1[0] == r2[0]
            else:
                same = r1 == r2  # distinct remotes get distinct ports
            assert (p1 == p2) is same


class _Model:
    """A reference for the NAT's observable behaviour, written from RFC 4787's wording."""

    def __init__(self, profile: NatProfile) -> None:
        self.p = profile
        self.seq = 0
        # mapping key -> [external port, refreshed at, refresh order, {permit: last sent}]
        self.bindings: dict[tuple[Addr, object], list] = {}

    def _key(self, kind: object, remote: Addr) -> object:
        value = kind.value  # type: ignore[attr-defined]
        return None if value == "endpoint-independent" else (
            remote[0] if value == "address-dependent" else remote)

    def live(self, now: float) -> dict[tuple[Addr, object], list]:
        self.bindings = {k: b for k, b in self.bindings.items()
                         if now < b[1] + self.p.binding_timeout_s}
        return self.bindings

    def outbound(self, internal: Addr, remote: Addr, now: float, port: int) -> None:
        live = self.live(now)
        key = (internal, self._key(self.p.mapping, remote))
        self.seq += 1
        if key in live:
            assert port == live[key][0], "a live binding must keep its port"
            live[key][1], live[key][2] = now, self.seq
        else:
            if len(live) >= self.p.max_bindings:
                del live[min(live, key=lambda k: live[k][2])]
            assert port not in {b[0] for b in live.values()}, "ports are never shared"
            live[key] = [port, now, self.seq, {}]
        live[key][3][self._key(self.p.filtering, remote)] = now

    def inbound(self, port: int, remote: Addr, now: float) -> Addr | None:
        for (internal, _), b in self.live(now).items():
            if b[0] != port:
                continue
            sent = b[3].get(self._key(self.p.filtering, remote))
            if self.p.filtering is not EIF and (sent is None or now >= sent + self.p.binding_timeout_s):
                return None
            if self.p.inbound_refresh:
                self.seq += 1
                b[1], b[2] = now, self.seq
            return internal
        return None


ops = st.lists(st.tuples(st.booleans(), internals, remotes, st.floats(0.0, 12.0),
                         st.integers(0, 4)), min_size=1, max_size=40)


@given(mappings, filterings, st.booleans(), st.integers(1, 4), ops, st.integers(0, 2**32))
@settings(max_examples=150, deadline=None)
def test_the_nat_matches_a_reference_model(mapping: MappingType, filtering: FilteringType,
                                           inbound_refresh: bool, max_bindings: int,
                                           steps: list[tuple[bool, Addr, Addr, float, int]],
                                           seed: int) -> None:
    """Random traffic: every answer (ports reused or not, deliveries, refusals after timeouts,
    evictions) agrees with the model, and the table never exceeds its bound."""
    profile = NatProfile(mapping, filtering, binding_timeout_s=10.0, max_bindings=max_bindings,
                         inbound_refresh=inbound_refresh)
    n = Nat(PUBLIC, profile, random.Random(seed))
    model = _Model(profile)
    now = 0.0
    handed_out: list[int] = [5000]
    for is_out, internal, remote, dt, port_pick in steps:
        now += dt
        if is_out:
            ext = n.outbound(internal, remote, now)
            assert ext[0] == PUBLIC
            model.outbound(internal, remote, now, ext[1])
            handed_out.append(ext[1])
        else:
            port = handed_out[port_pick % len(handed_out)]
            assert n.inbound((PUBLIC, port), remote, now) == model.inbound(port, remote, now)
        assert len(n) <= max_bindings
        assert len(n.bindings(now)) == len(model.live(now))


@given(st.integers(1, 30), st.lists(st.tuples(internals, remotes), min_size=1, max_size=60),
       st.integers(0, 2**32))
@settings(max_examples=60, deadline=None)
def test_bindings_never_exceed_the_bound(bound: int, sends: list[tuple[Addr, Addr]], seed: int) -> None:
    n = Nat(PUBLIC, dataclasses.replace(SYMMETRIC, max_bindings=bound), random.Random(seed))
    for i, (internal, remote) in enumerate(sends):
        n.outbound(internal, remote, float(i))
        assert len(n) <= bound
        ports = [b.external[1] for b in n.bindings()]
        assert len(ports) == len(set(ports))


@given(st.floats(1.0, 300.0), st.floats(0.0, 600.0), filterings)
@settings(max_examples=60, deadline=None)
def test_an_unrefreshed_binding_refuses_inbound_after_its_timeout(timeout: float, idle: float,
                                                                  filtering: FilteringType) -> None:
    n = Nat(PUBLIC, NatProfile(EIM, filtering, binding_timeout_s=timeout), random.Random(0))
    ext = n.outbound(A, R1, 0.0)
    delivered = n.inbound(ext, R1, idle)
    assert (delivered == A) is (idle < timeout)
