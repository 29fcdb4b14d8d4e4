"""The Wesolowski proof of time: honest proofs verify, every tampering is refused.

Tests run under the tiny test parameters (VDF_PARAMS[0], t = 1000) so the whole file takes
a few seconds; timing is measured by benchmarks, never asserted here.
"""

from __future__ import annotations

import dataclasses
import functools
import random

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hmnode.consensus.proof import ProofRejected, pack
from hmnode.consensus.vdf import (
    DEFAULT_VDF,
    ELEMENT_BYTES,
    HALF_N,
    MAX_CHALLENGE_BYTES,
    MAX_T,
    N,
    TEST_VDF,
    VDF_PARAMS,
    TimeProof,
    VdfParams,
    canonical,
    element_to_bytes,
    hash_to_group,
    hash_to_prime,
    is_probable_prime,
    output,
    prove_time,
    squarings_per_second,
    verify_time,
)

T = TEST_VDF.t
challenges = st.binary(min_size=0, max_size=64)
quick = settings(max_examples=20, deadline=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture])


@functools.lru_cache(maxsize=None)
def proof_for(challenge: bytes) -> TimeProof:
    """An honest test-parameter proof, made once per challenge for the whole file."""
    return prove_time(challenge, TEST_VDF)


def ints(proof: TimeProof) -> tuple[int, int]:
    return int.from_bytes(proof.y, "big"), int.from_bytes(proof.pi, "big")


def refused(proof: TimeProof, challenge: bytes, params: VdfParams = TEST_VDF) -> None:
    with pytest.raises(ProofRejected):
        verify_time(proof, challenge, params)


# An independent primality check: Miller-Rabin with the first 24 primes as fixed bases
# (deterministic far beyond 2^64, and a different code path from the module's hashed bases),
# after trial division.
SMALL = [p for p in range(2, 1000) if all(p % d for d in range(2, int(p**0.5) + 1))]


def independent_is_prime(n: int) -> bool:
    if n < 2:
        return False
    for p in SMALL:
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while not d & 1:
        d >>= 1
        s += 1
    for a in SMALL[:24]:
        v = pow(a, d, n)
        if v in (1, n - 1):
            continue
        for _ in range(s - 1):
            v = pow(v, 2, n)
            if v == n - 1:
                break
        else:
            return False
    return True


# --- parameters and the group -------------------------------------------------------------


def test_modulus_is_rsa_2048() -> None:
    assert N.bit_length() == 2048 and len(str(N)) == 617
    assert str(N).startswith("2519590847565789349402718324") and str(N).endswith("22120720357")


def test_parameter_registry() -> None:
    assert DEFAULT_VDF is VDF_PARAMS[1]
    assert TEST_VDF is VDF_PARAMS[0] and TEST_VDF.t == 1000
    assert DEFAULT_VDF.prime_bits == 128 and DEFAULT_VDF.t >= 10_000
    for version, params in VDF_PARAMS.items():
        assert params.version == version


@pytest.mark.parametrize("kwargs", [dict(version=-1, t=10), dict(version=1, t=0),
                                    dict(version=1, t=MAX_T + 1),
                                    dict(version=1, t=10, prime_bits=32)])
def test_bad_parameter_sets_are_refused(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        VdfParams(**kwargs)


@given(challenges)
def test_hash_to_group_is_deterministic_and_canonical(challenge: bytes) -> None:
    x = hash_to_group(challenge)
    assert x == hash_to_group(challenge)
    assert 1 < x <= HALF_N and canonical(x) == x


def test_hash_to_group_separates_challenges() -> None:
    xs = {hash_to_group(bytes([i])) for i in range(64)} | {hash_to_group(b"")}
    assert len(xs) == 65


def test_canonical_identifies_v_and_minus_v() -> None:
    rng = random.Random(1)
    for _ in range(50):
        v = rng.randrange(1, N)
        assert canonical(v) == canonical(N - v) <= HALF_N


# --- hash_to_prime ------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(st.integers(1, N - 1), st.integers(1, N - 1), st.sampled_from([64, 128, 200, 256]))
def test_hash_to_prime_gives_primes_of_exact_length(x: int, y: int, bits: int) -> None:
    l = hash_to_prime(x, y, bits)
    assert l.bit_length() == bits
    assert independent_is_prime(l)
    assert hash_to_prime(x, y, bits) == l  # deterministic


def test_hash_to_prime_depends_on_both_inputs() -> None:
    x, y = hash_to_group(b"a"), hash_to_group(b"b")
    assert len({hash_to_prime(x, y), hash_to_prime(y, x), hash_to_prime(x, x),
                hash_to_prime(x, y, 127)}) == 4


def test_hash_to_prime_refuses_non_elements() -> None:
    with pytest.raises(ValueError):
        hash_to_prime(0, 5)
    with pytest.raises(ValueError):
        hash_to_prime(5, N)


@pytest.mark.parametrize("n", [
    561, 41041, 825265,                   # Carmichael numbers
    3825123056546413051,                  # strong pseudoprime to bases 2..31
    318665857834031151167461,             # strong pseudoprime to bases 2..37
    3317044064679887385961981,            # strong pseudoprime to bases 2..41
    (2**61 - 1) * (2**89 - 1),            # a 150-bit semiprime
    (2**127 - 1) ** 2, 2**128 + 1,
])
def test_is_probable_prime_refuses_composites(n: int) -> None:
    assert not is_probable_prime(n)


@pytest.mark.parametrize("n", [2, 3, 1999, 2003, 2**61 - 1, 2**89 - 1, 2**127 - 1,
                               2**255 - 19])
def test_is_probable_prime_accepts_primes(n: int) -> None:
    assert is_probable_prime(n)


def test_is_probable_prime_agrees_with_independent_check() -> None:
    rng = random.Random(7)
    for n in [*range(-3, 5000), *(rng.getrandbits(rng.choice([40, 90, 128])) | 1
                                   for _ in range(2000))]:
        assert is_probable_prime(n) == independent_is_prime(n), n


# --- honest proofs ----------------------------------------------------------------------


@quick
@given(challenges)
def test_honest_proofs_verify(challenge: bytes) -> None:
    proof = prove_time(challenge, TEST_VDF)
    verify_time(proof, challenge, TEST_VDF)
    assert TimeProof.decode(proof.encode()) == proof
    verify_time(TimeProof.decode(proof.encode()), challenge, TEST_VDF)


def test_proof_matches_direct_computation() -> None:
    """y and pi agree with the naive formulas that build 2^T outright (fine for T = 1000)."""
    proof = proof_for(b"direct")
    x = hash_to_group(b"direct")
    y, pi = ints(proof)
    assert y == canonical(pow(x, 2**T, N))
    l = hash_to_prime(x, y, TEST_VDF.prime_bits)
    assert pi == canonical(pow(x, 2**T // l, N))
    assert (proof.version, proof.challenge, proof.t) == (0, b"direct", T)
    assert len(proof.y) == len(proof.pi) == ELEMENT_BYTES


def test_proving_is_deterministic() -> None:
    assert prove_time(b"same", TEST_VDF) == proof_for(b"same")


def test_progress_is_reported_about_every_percent() -> None:
    calls: list[tuple[int, int]] = []
    proof = prove_time(b"progress", TEST_VDF, progress=lambda done, total: calls.append(
        (done, total)))
    assert proof == proof_for(b"progress")
    assert {total for _, total in calls} == {2 * T}
    dones = [done for done, _ in calls]
    assert dones == sorted(set(dones)) and dones[-1] == 2 * T
    assert 90 <= len(calls) <= 110


def test_wire_layout_and_round_trip() -> None:
    proof = proof_for(b"wire")
    assert proof.to_wire() == [0, b"wire", T, proof.y, proof.pi]
    assert proof.encode() == pack(proof.to_wire())
    assert TimeProof.from_wire(proof.to_wire()) == proof
    assert TimeProof.decode(bytearray(proof.encode())) == proof


def test_output_is_a_32_byte_digest_of_y() -> None:
    a, b = proof_for(b"a"), proof_for(b"b")
    assert len(output(a)) == 32 and output(a) == output(proof_for(b"a"))
    assert output(a) != output(b)
    assert output(dataclasses.replace(a, pi=b.pi)) == output(a)  # only y matters


def test_squarings_per_second_measures_something() -> None:
    assert squarings_per_second(500) > 0


def test_prove_refuses_bad_inputs() -> None:
    with pytest.raises(ValueError):
        prove_time("text", TEST_VDF)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        prove_time(b"x" * (MAX_CHALLENGE_BYTES + 1), TEST_VDF)
    with pytest.raises(ValueError):
        prove_time(b"x", VdfParams(version=0, t=10))  # not the registered version 0


# --- refusals: statement, parameters ------------------------------------------------------


def test_proof_for_another_challenge_is_refused() -> None:
    proof = proof_for(b"mine")
    refused(proof, b"yours")
    # Relabelling the proof with the other challenge does not help: y is for the wrong x.
    refused(dataclasses.replace(proof, challenge=b"yours"), b"yours")


def test_wrong_t_is_refused() -> None:
    proof = proof_for(b"t")
    for t in (T - 1, T + 1, 2 * T, 1):
        refused(dataclasses.replace(proof, t=t), b"t")


def test_wrong_parameter_version_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    proof = proof_for(b"v")
    refused(proof, b"v", DEFAULT_VDF)  # a test proof is no proof under the default
    refused(dataclasses.replace(proof, version=1), b"v")  # names another version
    refused(dataclasses.replace(proof, version=1, t=DEFAULT_VDF.t), b"v", DEFAULT_VDF)
    refused(dataclasses.replace(proof, version=77), b"v")  # unknown version
    refused(dataclasses.replace(proof, version=True), b"v")  # type: ignore[arg-type]
    # Same T and prime size, other version: the maths would check, the version does not.
    other = VdfParams(version=7, t=T)
    monkeypatch.setitem(VDF_PARAMS, 7, other)
    refused(proof, b"v", other)
    refused(dataclasses.replace(proof, version=7), b"v")


def test_verifier_with_unregistered_parameters_is_a_programming_error() -> None:
    with pytest.raises(ValueError):
        verify_time(proof_for(b"p"), b"p", VdfParams(version=0, t=T + 1))


def test_not_a_time_proof_is_refused() -> None:
    with pytest.raises(ProofRejected):
        verify_time(proof_for(b"p").to_wire(), b"p", TEST_VDF)  # type: ignore[arg-type]


# --- refusals: forged y and pi ------------------------------------------------------------


def test_y_with_a_wrong_pi_is_refused() -> None:
    a, b = proof_for(b"a"), proof_for(b"b")
    refused(dataclasses.replace(a, pi=b.pi), b"a")
    refused(dataclasses.replace(a, y=b.y), b"a")
    refused(dataclasses.replace(a, pi=a.y), b"a")
    refused(dataclasses.replace(a, y=a.pi), b"a")
    x = hash_to_group(b"a")
    refused(dataclasses.replace(a, pi=element_to_bytes(x)), b"a")
    # a wrong y that is still a canonical element, with the pi that would fit the true y
    y, _ = ints(a)
    refused(dataclasses.replace(a, y=element_to_bytes(canonical(y * 4))), b"a")


@quick
@given(st.integers(2, HALF_N))
def test_random_pi_is_refused(pi: int) -> None:
    proof = proof_for(b"random-pi")
    if element_to_bytes(pi) != proof.pi:
        refused(dataclasses.replace(proof, pi=element_to_bytes(pi)), b"random-pi")


@pytest.mark.parametrize("challenge", [b"minus-one-%d" % i for i in range(4)])
def test_minus_one_forgery_is_refused(challenge: bytes) -> None:
    """The forgery that works in Z_N^* gives nothing in the quotient group."""
    proof = proof_for(challenge)
    x = hash_to_group(challenge)
    y, pi = ints(proof)
    # In Z_N^*: claim the wrong output -x^(2^T) and prove it with -x^floor(2^T / l'),
    # which satisfies the equation because l' is odd.
    fake_y = N - pow(x, 2**T, N)
    l2 = hash_to_prime(x, fake_y, TEST_VDF.prime_bits)
    fake_pi = N - pow(x, 2**T // l2, N)
    assert pow(fake_pi, l2, N) * pow(x, pow(2, T, l2), N) % N == fake_y
    # In the quotient group the "wrong" output is the right one (same class) ...
    assert canonical(fake_y) == y
    forged = dataclasses.replace(proof, y=element_to_bytes(fake_y), pi=element_to_bytes(fake_pi))
    if forged != proof:  # ... and any encoding other than the honest proof is refused.
        refused(forged, challenge)
        with pytest.raises(ProofRejected):
            TimeProof.decode(forged.encode())
    # Negating the honest y or pi (or both) gives the same classes, never a second proof.
    assert canonical(N - y) == y and canonical(N - pi) == pi
    for forged in (dataclasses.replace(proof, pi=element_to_bytes(N - pi)),
                   dataclasses.replace(proof, y=element_to_bytes(N - y)),
                   dataclasses.replace(proof, y=element_to_bytes(N - y),
                                       pi=element_to_bytes(N - pi))):
        refused(forged, challenge)
        with pytest.raises(ProofRejected):
            TimeProof.decode(forged.encode())


@pytest.mark.parametrize("bad", [0, 1, HALF_N + 1, N - 1, N, N + 2, 2**2048 - 1])
def test_out_of_range_elements_are_refused(bad: int) -> None:
    proof = proof_for(b"range")
    raw = bad.to_bytes(ELEMENT_BYTES, "big")
    for forged in (dataclasses.replace(proof, y=raw), dataclasses.replace(proof, pi=raw)):
        refused(forged, b"range")
        with pytest.raises(ProofRejected):
            TimeProof.decode(forged.encode())


@pytest.mark.parametrize("size", [0, 32, 255, 257, 512])
def test_wrong_width_elements_are_refused(size: int) -> None:
    proof = proof_for(b"width")
    y, pi = ints(proof)
    for name, value in (("y", y), ("pi", pi)):
        raw = (value % (1 << (8 * size))).to_bytes(size, "big") if size < ELEMENT_BYTES \
            else value.to_bytes(size, "big")
        forged = dataclasses.replace(proof, **{name: raw})
        refused(forged, b"width")
        with pytest.raises(ProofRejected):
            TimeProof.decode(forged.encode())


# --- refusals: bytes ------------------------------------------------------------------------


def accepted(data: bytes, challenge: bytes) -> bool:
    """Whether bytes off the wire decode to a proof that verifies (any other error fails)."""
    try:
        verify_time(TimeProof.decode(data), challenge, TEST_VDF)
    except ProofRejected:
        return False
    return True


def flip(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[bit // 8] ^= 0x80 >> (bit % 8)
    return bytes(out)


FLIP_CHALLENGE = b"bit-flips"
ELEMENTS_START = 1 + 1 + 2 + len(FLIP_CHALLENGE) + 3  # array, version, bin8 challenge, t


def test_every_bit_flip_outside_the_elements_is_refused() -> None:
    data = proof_for(FLIP_CHALLENGE).encode()
    assert accepted(data, FLIP_CHALLENGE)
    element_bits = set()
    for start in (ELEMENTS_START, ELEMENTS_START + 3 + ELEMENT_BYTES):
        assert data[start:start + 3] == b"\xc5\x01\x00"  # bin16 header of a 256-byte element
        element_bits |= set(range((start + 3) * 8, (start + 3 + ELEMENT_BYTES) * 8))
    for bit in range(len(data) * 8):
        if bit not in element_bits:
            assert not accepted(flip(data, bit), FLIP_CHALLENGE), bit


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_any_bit_flip_is_refused(data: st.DataObject) -> None:
    encoded = proof_for(FLIP_CHALLENGE).encode()
    bit = data.draw(st.integers(0, len(encoded) * 8 - 1), label="bit")
    assert not accepted(flip(encoded, bit), FLIP_CHALLENGE)


def test_truncated_and_extended_bytes_are_refused() -> None:
    data = proof_for(b"cut").encode()
    for n in range(len(data)):
        with pytest.raises(ProofRejected):
            TimeProof.decode(data[:n])
    for extra in (b"\x00", b"\xc0", data):
        with pytest.raises(ProofRejected):
            TimeProof.decode(data + extra)
    with pytest.raises(ProofRejected):
        TimeProof.decode(b"")


def test_non_canonical_encodings_are_refused() -> None:
    proof = proof_for(b"canon")
    version, challenge, t, y, pi = proof.to_wire()
    wide_int = b"\xcf" + version.to_bytes(8, "big")  # version 0 as uint64
    body = b"".join(msgpack.packb(v, use_bin_type=True) for v in (challenge, t, y, pi))
    assert msgpack.unpackb(b"\x95" + wide_int + body) == proof.to_wire()
    variants = [
        b"\x95" + wide_int + body,
        # the array as array16 instead of fixarray
        b"\xdc\x00\x05" + proof.encode()[1:],
        # t as uint32 instead of uint16
        b"\x95" + msgpack.packb(version) + msgpack.packb(challenge, use_bin_type=True)
        + b"\xce" + t.to_bytes(4, "big") + msgpack.packb(y) + msgpack.packb(pi),
        # the challenge as bin16 instead of bin8
        b"\x95" + msgpack.packb(version) + b"\xc5" + len(challenge).to_bytes(2, "big")
        + challenge + b"".join(msgpack.packb(v) for v in (t, y, pi)),
    ]
    for data in variants:
        assert msgpack.unpackb(data) == proof.to_wire()  # same values ...
        with pytest.raises(ProofRejected, match="canonical"):
            TimeProof.decode(data)  # ... but not the one canonical encoding


@pytest.mark.parametrize("mutate", [
    lambda w: w[:4],                                   # missing field
    lambda w: [*w, 0],                                 # extra field
    lambda w: [True, *w[1:]],                          # bool version
    lambda w: [-1, *w[1:]],                            # negative version
    lambda w: [0x10000, *w[1:]],                       # version out of range
    lambda w: [w[0], w[1].decode(), *w[2:]],           # challenge as text
    lambda w: [w[0], b"x" * (MAX_CHALLENGE_BYTES + 1), *w[2:]],
    lambda w: [*w[:2], 0, *w[3:]],                     # t = 0
    lambda w: [*w[:2], -T, *w[3:]],
    lambda w: [*w[:2], MAX_T + 1, *w[3:]],
    lambda w: [*w[:2], float(T), *w[3:]],
    lambda w: [*w[:3], w[3][1:], w[4]],                # 255-byte y
    lambda w: [*w[:3], w[3], w[4] + b"\x00"],          # 257-byte pi
    lambda w: [*w[:3], int.from_bytes(w[3], "big") % (1 << 63), w[4]],  # y as an int
    lambda w: [*w[:4], None],
])
def test_malformed_wire_arrays_are_refused(mutate) -> None:
    wire = mutate(proof_for(b"malformed").to_wire())
    with pytest.raises(ProofRejected):
        TimeProof.from_wire(wire)
    with pytest.raises(ProofRejected):
        TimeProof.decode(msgpack.packb(wire, use_bin_type=True))


@pytest.mark.parametrize("data", [
    msgpack.packb({"version": 0}), msgpack.packb(7), msgpack.packb(b"\x00" * 600),
    b"\xff", "text", None, b"\x00" * (65 << 10),
])
def test_non_proof_bytes_are_refused(data) -> None:
    with pytest.raises(ProofRejected):
        TimeProof.decode(data)
