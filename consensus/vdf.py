"""Proof of time: a Wesolowski verifiable delay function over the RSA-2048 group.

Reference: Benjamin Wesolowski, "Efficient verifiable delay functions", EUROCRYPT 2019
(full version: Journal of Cryptology 33, 2020).

Theory of operation. The group is Z_N^* for the RSA-2048 challenge modulus N, whose
factorisation (and so the group's order) nobody knows. For a challenge we derive a group
element x = hash_to_group(challenge). The output is y = x^(2^T): without the group order
the exponent 2^T cannot be reduced, so the only known way is T squarings one after the
other, and they do not parallelise. The proof is short and cheap to check:

* the prover derives a 128-bit prime l = hash_to_prime(x, y) (Fiat-Shamir: l is fixed only
  once y is), and sends pi = x^floor(2^T / l), computed bit by bit with a long division of
  2^T by l that never builds the T-bit number 2^T;
* the verifier computes r = 2^T mod l and accepts iff pi^l * x^r == y, since
  floor(2^T / l) * l + r == 2^T. That is two exponentiations with ~128-bit exponents.

Soundness rests on the adaptive root assumption: nobody can take l-th roots of group
elements of their choosing for a random prime l picked after them. In Z_N^* that fails for
the element -1, whose order (2) anyone knows. That gives the "multiply by -1" forgery:
whoever computed y can claim the wrong output -y and prove it with -x^floor(2^T / l'),
l' = hash_to_prime(x, -y), because l' is odd. So we work in the quotient group
Z_N^* / {+1, -1}: every element is represented by min(v, N - v), and a proof's y and pi
must be canonical, 1 < v < N/2, so each class has exactly one encoding and -y is y.

Cost. Proving is T squarings for y plus T steps (a squaring and, half the time, a
multiplication) for pi: about 2.5-2.9 T squarings' worth in all. On this project's
reference machine, a 2-core x86_64 CI-class VM (AMD EPYC) running CPython 3.11 with its
built-in integers (no GMP), `squarings_per_second()` measured 60,000-95,000 squarings/s
(typically about 75,000; it varies with the VM's load and clock), so the default
T = 32,000 proves in about one second there (0.9-1.25 s measured, median about 1.0 s).
Verifying is a few milliseconds there (p50 about 4 ms over 50 runs):
hashing to the prime l, 32 Miller-Rabin rounds on it, and one double exponentiation with
~128-bit exponents. To recalibrate, register a new parameter version rather than edit one
in use: proofs name the version they were made under.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from math import gcd
from typing import Any

from hmnode.consensus.proof import ProofRejected, digest, expect_length, field, pack, unpack

# RSA-2048 from the RSA Factoring Challenge (RSA Laboratories, 1991): a 617-digit,
# 2048-bit semiprime published without its factors, which nobody has found since. Because
# nobody knows them, nobody knows the group order, which is what makes 2^T sequential.
RSA_2048 = int(
    "25195908475657893494027183240048398571429282126204032027777137836043662020707595556264"
    "01852588078440691829064124951508218929855914917618450280848912007284499268739280728777"
    "67359714183472702618963750149718246911650776133798590957000973304597488084284017974291"
    "00642458691817195118746121515172654632282216869987549182422433637259085141865462043576"
    "79842338718477444792073993423658482382428119816381501067481045166037730605620161967625"
    "61338441436038339044149526344321901146575444541784240209246165157233507787077498171257"
    "72467962926386356373289912154831438167899885040445364023527381951378636564391212010397"
    "122822120720357"
)
N = RSA_2048
ELEMENT_BYTES = 256  # a group element on the wire: fixed-width big-endian
HALF_N = N // 2  # N is odd, so v and N - v are never both <= HALF_N

WHAT = "time proof"
MAX_CHALLENGE_BYTES = 256
MAX_T = 1 << 40  # far beyond any sane delay; bounds the work a decoded proof can ask for
MAX_VERSION = 0xFFFF

X_TAG = b"hmnode/vdf/x"
PRIME_TAG = b"hmnode/vdf/prime"
MR_TAG = b"hmnode/vdf/miller-rabin"
OUTPUT_TAG = b"hmnode/vdf/output"

# Miller-Rabin rounds. Error bounds, with bases derived from SHA-256 of the candidate (so
# nobody can choose them; random-oracle model):
# * worst case, for any composite: a random base passes with probability at most 1/4
#   (Rabin 1980), so 32 rounds let a composite through with probability at most 2^-64;
# * our candidates are not chosen by anyone either: they are SHA-256 outputs, i.e. random
#   odd 128-bit numbers, for which Damgard, Landrock and Pomerance ("Average case error
#   estimates for the strong probable prime test", Math. Comp. 61, 1993) give
#   P(composite | passes t rounds) < k^(15/4) 2^(-k/2 - 2t) / 7 (k >= 88, t >= k/4), about
#   2^-104 for k = 128, t = 32. A prover grinding 2^64 fake y values (~44 candidates each)
#   still gets a composite l with probability below 2^-34.
# Each round is one 128-bit modular exponentiation (~35 us in CPython here); 32 of them
# keep verification within a few milliseconds.
MR_ROUNDS = 32


@dataclass(frozen=True)
class VdfParams:
    """A versioned VDF parameter set: `t` sequential squarings, a `prime_bits`-bit prime l."""

    version: int
    t: int
    prime_bits: int = 128

    def __post_init__(self) -> None:
        if not 0 <= self.version <= MAX_VERSION:
            raise ValueError(f"VDF version must be in 0..{MAX_VERSION}")
        if not 1 <= self.t <= MAX_T:
            raise ValueError(f"VDF t must be in 1..{MAX_T}")
        # Below 64 bits a prover could afford to search for a helpful l; above 256 bits
        # one SHA-256 block would not fill the candidate.
        if not 64 <= self.prime_bits <= 256:
            raise ValueError("VDF prime_bits must be in 64..256")


VDF_PARAMS: dict[int, VdfParams] = {
    # FOR TESTS ONLY: a 1,000-squaring delay (about 10 ms) is no delay at all. A node must
    # never accept version 0 from the network; it exists so tests run quickly.
    0: VdfParams(version=0, t=1_000),
    # The default: about one second of proving on the reference machine (module docstring).
    1: VdfParams(version=1, t=32_000),
}
TEST_VDF = VDF_PARAMS[0]
DEFAULT_VDF = VDF_PARAMS[1]


# --- the group -------------------------------------------------------------------------------


def canonical(v: int) -> int:
    """The representative of v's class in Z_N^* / {+1, -1}: min(v mod N, N - v mod N)."""
    v %= N
    return min(v, N - v)


def element_to_bytes(v: int) -> bytes:
    """A canonical group element as fixed-width 256-byte big-endian."""
    return v.to_bytes(ELEMENT_BYTES, "big")


def element_from_bytes(data: Any, name: str) -> int:
    """A proof's group element from its bytes; ProofRejected unless canonical and 1 < v < N/2."""
    if not isinstance(data, bytes) or len(data) != ELEMENT_BYTES:
        raise ProofRejected(f"{WHAT}: {name} must be {ELEMENT_BYTES} bytes")
    v = int.from_bytes(data, "big")
    # v <= HALF_N is "canonical" (v == min(v, N - v)); excluding 0 and 1 refuses the
    # identity and the non-unit 0, which would make the verification equation trivial.
    if not 1 < v <= HALF_N:
        raise ProofRejected(f"{WHAT}: {name} is not a canonical group element")
    return v


def hash_to_group(challenge: bytes) -> int:
    """The VDF input for a challenge: SHA-256 expanded to 2304 bits, reduced mod N, canonical."""
    if not isinstance(challenge, bytes):
        raise TypeError("challenge must be bytes")
    for attempt in range(1 << 16):
        # 2304 bits reduced mod a 2048-bit N: the bias from the reduction is below 2^-256.
        wide = b"".join(
            digest(X_TAG, attempt.to_bytes(4, "big"), block.to_bytes(4, "big"), challenge)
            for block in range(9)
        )
        x = canonical(int.from_bytes(wide, "big"))
        # x <= 1 or a shared factor with N happens with probability ~2^-1000 (the latter
        # would factor RSA-2048); retrying keeps x a valid, non-trivial element regardless.
        if x > 1 and gcd(x, N) == 1:
            return x
    raise AssertionError("unreachable: hash_to_group found no element")  # pragma: no cover


# --- the challenge prime ------------------------------------------------------------------


def _small_primes(limit: int) -> list[int]:
    sieve = bytearray([1]) * limit
    sieve[0:2] = b"\x00\x00"
    for p in range(2, int(limit**0.5) + 1):
        if sieve[p]:
            sieve[p * p :: p] = bytearray(len(sieve[p * p :: p]))
    return [p for p in range(limit) if sieve[p]]


_SMALL_PRIMES = _small_primes(2000)
_SMALL_PRIME_SET = frozenset(_SMALL_PRIMES)
# One gcd with the product of the small primes replaces hundreds of trial divisions.
_SMALL_PRODUCT = 1
for _p in _SMALL_PRIMES:
    _SMALL_PRODUCT *= _p
del _p


def is_probable_prime(n: int, rounds: int = MR_ROUNDS) -> bool:
    """Miller-Rabin with `rounds` bases derived from SHA-256 of n; error at most 4^-rounds."""
    if n < 2:
        return False
    if n <= _SMALL_PRIMES[-1]:
        return n in _SMALL_PRIME_SET
    if gcd(n, _SMALL_PRODUCT) != 1:
        return False
    d, s = n - 1, 0
    while d % 2 == 0:
        d //= 2
        s += 1
    n_bytes = n.to_bytes((n.bit_length() + 7) // 8, "big")
    for i in range(rounds):
        # Bases in [2, n - 2], fixed by n alone: deterministic for prover and verifier.
        wide = digest(MR_TAG, n_bytes, i.to_bytes(4, "big")) + digest(
            MR_TAG, n_bytes, (i + rounds).to_bytes(4, "big")
        )
        a = 2 + int.from_bytes(wide, "big") % (n - 3)
        v = pow(a, d, n)
        if v == 1 or v == n - 1:
            continue
        for _ in range(s - 1):
            v = v * v % n
            if v == n - 1:
                break
        else:
            return False
    return True


def hash_to_prime(x: int, y: int, bits: int = 128) -> int:
    """The Fiat-Shamir prime l for (x, y): the first probable prime of exactly `bits` bits
    among SHA-256(x, y, counter) for counter = 0, 1, ..."""
    if not 0 < x < N or not 0 < y < N:
        raise ValueError("x and y must be group elements")
    if not 2 <= bits <= 256:
        raise ValueError("bits must be in 2..256")
    xb, yb = element_to_bytes(x), element_to_bytes(y)
    counter = 0
    while True:
        h = digest(PRIME_TAG, bits.to_bytes(2, "big"), xb, yb, counter.to_bytes(8, "big"))
        # Top bit set: exactly `bits` bits; low bit set: odd. About bits*ln2/2 tries (~44).
        candidate = (int.from_bytes(h, "big") >> (256 - bits)) | (1 << (bits - 1)) | 1
        if is_probable_prime(candidate):
            return candidate
        counter += 1


# --- the proof ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TimeProof:
    """A proof that T sequential squarings were done on hash_to_group(challenge)."""

    version: int
    challenge: bytes
    t: int
    y: bytes  # canonical x^(2^t), 256-byte big-endian
    pi: bytes  # canonical x^floor(2^t / l), 256-byte big-endian

    def to_wire(self) -> list[Any]:
        """The canonical wire array: [version, challenge, t, y, pi]."""
        return [self.version, self.challenge, self.t, self.y, self.pi]

    @classmethod
    def from_wire(cls, wire: list[Any]) -> TimeProof:
        """A proof from its wire array, every field's type and bound checked."""
        if not isinstance(wire, list):
            raise ProofRejected(f"{WHAT}: expected an array")
        expect_length(wire, 5, WHAT)
        version = field(wire, 0, int, WHAT, "version")
        if not 0 <= version <= MAX_VERSION:
            raise ProofRejected(f"{WHAT}: version out of range")
        challenge = field(wire, 1, bytes, WHAT, "challenge")
        if len(challenge) > MAX_CHALLENGE_BYTES:
            raise ProofRejected(f"{WHAT}: challenge longer than {MAX_CHALLENGE_BYTES} bytes")
        t = field(wire, 2, int, WHAT, "t")
        if not 1 <= t <= MAX_T:
            raise ProofRejected(f"{WHAT}: t out of range")
        y = field(wire, 3, bytes, WHAT, "y")
        pi = field(wire, 4, bytes, WHAT, "pi")
        element_from_bytes(y, "y")
        element_from_bytes(pi, "pi")
        return cls(version=version, challenge=challenge, t=t, y=y, pi=pi)

    def encode(self) -> bytes:
        """The canonical bytes of this proof."""
        return pack(self.to_wire())

    @classmethod
    def decode(cls, data: bytes) -> TimeProof:
        """A proof from its bytes; ProofRejected if malformed or not canonically encoded."""
        proof = cls.from_wire(unpack(data, WHAT))
        # msgpack lets one value be written several ways (e.g. a small int as uint64);
        # accepting only the canonical bytes gives every proof exactly one encoding.
        if proof.encode() != bytes(data):
            raise ProofRejected(f"{WHAT}: not canonically encoded")
        return proof


def _registered(params: VdfParams) -> VdfParams:
    # Proofs name a version and verifiers look the version up, so a parameter set that is
    # not the registered one for its version would make proofs nobody else can check.
    if VDF_PARAMS.get(params.version) != params:
        raise ValueError(f"VDF parameters {params} are not the registered set for their version")
    return params


def _check_challenge(challenge: Any) -> bytes:
    if not isinstance(challenge, bytes) or len(challenge) > MAX_CHALLENGE_BYTES:
        raise ValueError(f"challenge must be bytes of at most {MAX_CHALLENGE_BYTES}")
    return challenge


def prove_time(challenge: bytes, params: VdfParams = DEFAULT_VDF,
               progress: Callable[[int, int], None] | None = None) -> TimeProof:
    """Do params.t sequential squarings on hash_to_group(challenge) and prove it.

    `progress(done, total)` is called about every 1% of the work; total is 2 * t (the t
    squarings for y, then the t steps for pi), and the last call has done == total.
    """
    _registered(params)
    _check_challenge(challenge)
    t = params.t
    total = 2 * t
    step = max(1, t // 50)  # 1% of the 2t steps

    # y = x^(2^t). pow(v, 2^k, N) is k squarings in C (square-and-multiply on an exponent
    # with a single set bit), still strictly sequential; chunks let us report progress.
    x = hash_to_group(challenge)
    y = x
    done = 0
    while done < t:
        k = min(step, t - done)
        y = pow(y, 1 << k, N)
        done += k
        if progress is not None:
            progress(done, total)
    # Squaring commutes with the quotient map ((-v)^2 = v^2), so canonicalise once, here.
    y = canonical(y)

    # pi = x^floor(2^t / l) by long division of 2^t by l, one quotient bit per step
    # (Wesolowski's simple on-the-fly algorithm). Invariant: 2^i = q_i * l + r, pi = x^q_i.
    # Doubling gives 2^(i+1) = 2 q_i l + 2r with 2r < 2l, so the next quotient bit is 1
    # exactly when 2r >= l; pi follows by squaring, times x when the bit is 1.
    l = hash_to_prime(x, y, params.prime_bits)
    pi, r = 1, 1
    i = 0
    while i < t:
        k = min(step, t - i)
        for _ in range(k):
            pi = pi * pi % N
            r <<= 1
            if r >= l:
                r -= l
                pi = pi * x % N
        i += k
        if progress is not None:
            progress(t + i, total)
    pi = canonical(pi)

    return TimeProof(version=params.version, challenge=challenge, t=t,
                     y=element_to_bytes(y), pi=element_to_bytes(pi))


def verify_time(proof: TimeProof, challenge: bytes, params: VdfParams = DEFAULT_VDF) -> None:
    """Check that `proof` is a valid proof of time for `challenge` under `params`.

    Raises ProofRejected saying why not; returns None if it verifies.
    """
    _registered(params)
    if not isinstance(proof, TimeProof):
        raise ProofRejected(f"{WHAT}: not a TimeProof")
    if type(proof.version) is not int or proof.version not in VDF_PARAMS:
        raise ProofRejected(f"{WHAT}: unknown parameter version {proof.version!r}")
    if proof.version != params.version:
        raise ProofRejected(f"{WHAT}: made under version {proof.version}, "
                            f"expected version {params.version}")
    if type(proof.t) is not int or proof.t != params.t:
        raise ProofRejected(f"{WHAT}: t is {proof.t!r}, expected {params.t}")
    if not isinstance(challenge, bytes) or proof.challenge != challenge:
        raise ProofRejected(f"{WHAT}: made for another challenge")
    y = element_from_bytes(proof.y, "y")
    pi = element_from_bytes(proof.pi, "pi")

    x = hash_to_group(challenge)
    l = hash_to_prime(x, y, params.prime_bits)
    r = pow(2, params.t, l)
    # floor(2^t / l) * l + r == 2^t, so an honest pi gives pi^l * x^r == x^(2^t) == y.
    if canonical(_double_pow(pi, l, x, r)) != y:
        raise ProofRejected(f"{WHAT}: does not verify (pi^l * x^r != y)")


def _double_pow(a: int, e: int, b: int, f: int) -> int:
    """a^e * b^f mod N with shared squarings (Straus/Shamir), 2 bits of each exponent a step.

    Versus two pow() calls this saves about 40% of the modular multiplications, which are
    what verification costs.
    """
    # table[i][j] = a^i * b^j for i, j in 0..3
    a2, b2 = a * a % N, b * b % N
    pa, pb = [1, a, a2, a2 * a % N], [1, b, b2, b2 * b % N]
    table = [[pa[i] * pb[j] % N for j in range(4)] for i in range(4)]
    table[0][0] = 1
    acc = 1
    top = max(e.bit_length(), f.bit_length())
    for shift in range(top + (top & 1) - 2, -1, -2):
        acc = acc * acc % N
        acc = acc * acc % N
        i, j = (e >> shift) & 3, (f >> shift) & 3
        if i or j:
            acc = acc * table[i][j] % N
    return acc


def output(proof: TimeProof) -> bytes:
    """A 32-byte digest of the proof's y, usable as a random beacon once the proof verifies."""
    return digest(OUTPUT_TAG, proof.y)


def squarings_per_second(sample: int = 20000) -> float:
    """Measure this machine's sequential squarings per second in the VDF group."""
    if sample < 1:
        raise ValueError("sample must be positive")
    x = hash_to_group(b"hmnode/vdf/calibration")
    start = time.perf_counter()
    pow(x, 1 << sample, N)  # the same primitive prove_time uses for y
    return sample / (time.perf_counter() - start)
