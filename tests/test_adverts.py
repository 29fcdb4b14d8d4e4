"""Signed adverts and the advert store: newest wins, expiry, forgery, and anti-entropy digests."""

from __future__ import annotations

import dataclasses
import functools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hmnode.adverts import (
    PRICE_KEYS, Advert, AdvertRejected, AdvertStore, make_advert,
)
from hmnode.identity import NodeKey

KEYS = [NodeKey.generate() for _ in range(6)]
NOW = 1_000_000.0


@functools.lru_cache(maxsize=None)
def advert(key: NodeKey = KEYS[0], seq: int = 1, now: float = NOW, ttl: float = 600.0) -> Advert:
    """Adverts are immutable, so tests share them instead of signing each again."""
    return make_advert(key, seq, ["127.0.0.1:4819"], {"cpu": {"logical_cores": 4}}, None, now, ttl)


def test_the_newest_sequence_wins_and_older_ones_are_refused() -> None:
    store = AdvertStore()
    store.offer(advert(seq=2), NOW)
    with pytest.raises(AdvertRejected, match="not newer"):
        store.offer(advert(seq=1), NOW)
    with pytest.raises(AdvertRejected, match="not newer"):
        store.offer(advert(seq=2), NOW)  # the same advert again is no news either
    store.offer(advert(seq=3), NOW)
    assert store.get(KEYS[0].node_id).seq == 3 and len(store) == 1


def test_forged_adverts_are_refused_and_change_nothing() -> None:
    store = AdvertStore()
    genuine = advert(KEYS[1])
    # Signed by another key while claiming KEYS[1]'s id.
    forged = dataclasses.replace(genuine, signature=KEYS[2].sign(genuine.signed_bytes))
    # Genuine signature, content changed afterwards.
    tampered = dataclasses.replace(genuine, addresses=("10.0.0.1:1",))
    for bad in (forged, tampered):
        with pytest.raises(AdvertRejected, match="bad signature"):
            store.offer(bad, NOW)
    assert len(store) == 0
    store.offer(genuine, NOW)
    assert store.get(KEYS[1].node_id) == genuine


def test_expired_adverts_are_refused_and_dropped() -> None:
    store = AdvertStore()
    with pytest.raises(AdvertRejected, match="expired"):
        store.offer(advert(now=NOW - 700), NOW)
    store.offer(advert(seq=1, ttl=10), NOW)
    store.offer(advert(KEYS[1], ttl=100), NOW)
    assert [a.node_id for a in store.expire(NOW + 50)] == [KEYS[0].node_id]
    assert [a.node_id for a in store.all()] == [KEYS[1].node_id]


def test_implausible_times_are_refused() -> None:
    with pytest.raises(AdvertRejected, match="implausible"):
        AdvertStore().offer(advert(now=NOW + 3600), NOW)
    with pytest.raises(AdvertRejected, match="implausible"):
        AdvertStore().offer(advert(ttl=7 * 86400), NOW)


def test_content_that_cannot_be_encoded_is_refused_clearly() -> None:
    with pytest.raises(AdvertRejected, match="cannot be encoded"):
        make_advert(KEYS[0], 1, [], {"big": 1 << 70}, None, NOW, 60)
    with pytest.raises(AdvertRejected, match="cannot be encoded"):
        make_advert(KEYS[0], 1, [], {"set": {1, 2}}, None, NOW, 60)


@given(st.dictionaries(st.text(max_size=8), st.integers(-(2**63), 2**64 - 1) | st.text(max_size=8),
                       max_size=4),
       st.integers(min_value=0, max_value=2**63 - 1), st.floats(min_value=0, max_value=4e9))
def test_adverts_round_trip_through_their_wire_form(inventory: dict, seq: int, now: float) -> None:
    original = make_advert(KEYS[3], seq, ["[::1]:1", "127.0.0.1:2"], inventory,
                           {name: 1.5 for name in PRICE_KEYS}, now, 60)
    back = Advert.from_wire(original.to_wire())
    assert back == original and back.signature == original.signature and back.verify()
    assert back.msg_id == original.msg_id


@pytest.mark.parametrize("field, value", [
    ("node", b"short"), ("seq", -1), ("seq", True), ("addrs", "127.0.0.1:1"), ("addrs", ["x"] * 17),
    ("inv", []), ("prices", {"core_hour": 1}), ("issued", "now"), ("expires", 0.0), ("sig", b"x"),
    ("v", 2),
])
def test_malformed_wire_adverts_are_refused(field: str, value) -> None:
    wire = advert().to_wire()
    wire[field] = value
    with pytest.raises(AdvertRejected):
        Advert.from_wire(wire)
    with pytest.raises(AdvertRejected):
        Advert.from_wire({**advert().to_wire(), "extra": 1})


@settings(max_examples=50)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(1, 4)), max_size=20),
       st.lists(st.tuples(st.integers(0, 5), st.integers(1, 4)), max_size=20))
def test_anti_entropy_brings_two_stores_to_the_same_newest_adverts(ours, theirs) -> None:
    """Whatever each side holds, one exchange each way leaves both with the newest of each node."""
    a, b = AdvertStore(), AdvertStore()
    for store, entries in ((a, ours), (b, theirs)):
        for key_index, seq in entries:
            candidate = advert(KEYS[key_index], seq)
            if store.is_news(candidate):
                store.offer(candidate, NOW)
    for source, target in ((b, a), (a, b)):
        for candidate in source.differing(target.digest()):
            if target.is_news(candidate):
                target.offer(candidate, NOW)
    assert a.digest() == b.digest()
    assert [(x.node_id, x.seq) for x in a.all()] == [(x.node_id, x.seq) for x in b.all()]
    newest: dict = {}
    for key_index, seq in [*ours, *theirs]:
        newest[KEYS[key_index].node_id] = max(seq, newest.get(KEYS[key_index].node_id, 0))
    assert {x.node_id: x.seq for x in a.all()} == newest
