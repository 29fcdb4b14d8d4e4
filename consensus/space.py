"""Proof of space: a node commits to a plot of labels that are expensive to recompute, and
answers random challenges drawn from a public beacon by opening the challenged labels.

Theory of operation
-------------------
This follows the shape of Dziembowski, Faust, Kolmogorov and Pietrzak, "Proofs of Space"
(CRYPTO 2015): an initialisation phase in which the prover computes N labels and commits to
them with a Merkle tree, and an execution phase in which the verifier challenges k random
leaves and the prover opens them (label plus Merkle path). A prover that does not store the
labels has to recompute them under the response deadline.

- Labels: ``label_i = scrypt(plot_id || i, salt = H("hmnode/space/salt", node_id))``, of
  ``label_bytes`` bytes; ``plot_id = H("hmnode/space/plot", node_id, version, n_labels)``. Both
  the salt and the plot id bind the node id, so a plot belongs to one node and another node's
  labels are useless to it. One plot per (node, size, parameter set).
- Commitment: a SHA-256 Merkle tree over the labels. Leaves are ``H("hmnode/space/leaf",
  label)`` and inner nodes ``H("hmnode/space/node", left, right)`` (H is ``proof.digest``:
  length-prefixed parts), so a leaf can never pass for an inner node. Odd levels: the last node
  of a level with an odd count is carried up unchanged, never duplicated (duplication lets two
  leaf lists share a root, CVE-2012-2459); the tree has the shape of RFC 6962's. A path
  therefore has no entry at a level where the node has no sibling, and its exact length follows
  from (index, n_labels): the verifier demands exactly that length.
- Challenges: ``index_j = int(H("hmnode/space/challenge", beacon, root, j)) mod n_labels`` for
  ``j < challenges`` (indices may repeat; the modulo bias is below 2^-200).
- Verification: the version, node id, plot id, beacon and challenged indices are compared
  first, then every Merkle path (cheap), and only then the k labels are recomputed with scrypt,
  so a forged proof costs the verifier hashes, not scrypt calls.

What scrypt labels weaken, against a graph labelling
----------------------------------------------------
DFKP label the nodes of a hard-to-pebble graph (later constructions use depth-robust graphs
or stacked expanders): each label hashes its parents' labels, so the labels depend on one
another. Here every label is independent of the others. That keeps the verifier simple (a
challenge opens one label, not also its parents; there is no graph to check) but has two
costs:

1. The time-memory trade-off is linear, not steep. A prover that keeps only the tree level L
   (N / 2^L hashes) answers a challenge by recomputing the 2^L labels below it: keeping 1/1024
   of the plot costs 1024 scrypt calls per challenge (about 8 * 1024 * 0.3 ms = 2.5 s on one
   core here), and those calls are embarrassingly parallel. With a graph labelling a prover
   missing a constant fraction of the labels must redo work on the order of N to answer, and
   with a depth-robust graph that work is also *sequential*, so parallel hardware cannot
   shorten it.
   Security here therefore rests on a response deadline and on bounding the cheater's
   parallelism (a GPU farm defeats it), not on the construction alone.
2. scrypt at these parameters is only weakly memory-hard (128 KiB per label fits a cache), so
   dedicated hardware recomputes labels far more cheaply than this node plots them.

Grinding: the root must be fixed before the beacon is known. A prover that computed only a
fraction g of the labels could otherwise rehash the tree (one garbage leaf changes the root for
log N hashes) until all k challenges land on computed labels: about g^-k tries, which is cheap.
Callers pin the registered commitment with ``verify_space(..., commitment=...)``.

Parameters and the trade-off
----------------------------
Measured with Python 3.11 and cryptography's scrypt on a 2-core x86_64 machine.
Version 1: scrypt N=2^7, r=8, p=1 (memory per label 128*N*r = 128 KiB, about 0.3 ms a label),
32-byte labels, k=8 challenges, plots of at most 2^26 labels (2 GiB, tree height 26). A
verification is 8 scrypt calls plus at most 8*26 hashes: 2.4 ms p50 measured on a 2^17-label
plot (3.4 ms with the machine busy; the 9 further levels of a 2^26 plot add 0.05 ms), inside
the 5 ms budget. Plotting runs about 3,000 labels/s per core (scrypt releases the GIL, so
threads use every core: 4,700-5,600/s on 2 cores, 64 MiB in about 7 minutes).

Doubling N (or r) doubles both the verifier's and an honest plotter's cost and the memory per
label, and buys no soundness per challenge: the ratio of a recomputing cheater's work
to the verifier's is 2^L whatever a label costs. Challenges are what buy soundness: a prover
missing a fraction f of its plot (and not recomputing) passes with probability (1-f)^k, i.e.
for k=8: f=0.5 -> 0.4%, f=0.25 -> 10%, f=0.1 -> 43%. So one proof catches gross cheating only;
small-fraction cheating is caught across epochs ((1-f)^(k*m) after m proofs: f=0.1 falls below
1% after 6 proofs), and, since the pass rate (1-f)^k falls faster than the space saved, claiming
more space than one stores does not pay in expectation. Hence cheaper labels and more
challenges (2^7 with 8) rather than dearer labels with fewer (2^8 with 4).

Storage
-------
The verifier above is sans-IO; the `Plot` class is the prover's disk side.
``<data dir>/plots/<plot id hex>/`` holds ``labels.bin`` (fixed-size records, written in
order and fsync'd every FSYNC_EVERY labels), ``tree.bin`` (the Merkle levels from CACHE_LEVEL
up) and ``plot.json`` (written atomically: node id, plot id, n_labels, parameter set, how many
labels are known durable, and the root once complete). The lowest CACHE_LEVEL levels are not
stored: a proof recomputes the 2^CACHE_LEVEL-leaf subtree around each challenge from one
1 KiB read of the labels file. That keeps the tree file at about 1/16 of the labels file
(the full tree would double the plot's size without adding any label the proof stands on),
while a proof still reads O(k * height) bytes instead of rehashing the whole plot. The price:
a damaged label also spoils the proofs of the other labels of its 32-label block (their paths
are rebuilt through it); disks lose whole sectors (4 KiB = 4 aligned blocks), so this rarely
widens a loss.

Plotting resumes from the whole labels on disk; a torn last record is dropped, and labels
written after the last checkpoint (after a crash, or a disk too full to record the checkpoint;
at most FSYNC_EVERY labels) are checked against a recomputation first, since a file can grow
before its data reach the disk.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from hmnode.consensus.proof import ProofRejected, digest, expect_length, field, pack, unpack
from hmnode.datadir import fsync_dir
from hmnode.errors import HmnodeError, UsageError

NODE_ID_BYTES = 32
HASH_BYTES = 32
MIN_BEACON_BYTES = 16  # a beacon is a VDF output or a block hash: never a few guessable bytes
MAX_BEACON_BYTES = 1024
# Bounds used to parse a proof under a parameter set this node does not know (verification
# then refuses its version); a known version is parsed under its own, tighter bounds.
MAX_CHALLENGES = 64
MAX_LABELS = 1 << 40

_TAG_PLOT = b"hmnode/space/plot"
_TAG_SALT = b"hmnode/space/salt"
_TAG_LEAF = b"hmnode/space/leaf"
_TAG_NODE = b"hmnode/space/node"
_TAG_CHALLENGE = b"hmnode/space/challenge"


@dataclass(frozen=True, kw_only=True)
class SpaceParams:
    """A versioned parameter set: the scrypt cost of a label, its size, the number of
    challenges and the largest plot."""

    version: int
    scrypt_n: int
    scrypt_r: int
    scrypt_p: int
    label_bytes: int = 32
    challenges: int
    max_labels: int

    def __post_init__(self) -> None:
        n = self.scrypt_n
        if n < 2 or n & (n - 1):
            raise ValueError("scrypt_n must be a power of two of at least 2")
        if self.scrypt_r < 1 or self.scrypt_p < 1:
            raise ValueError("scrypt_r and scrypt_p must be at least 1")
        if not 16 <= self.label_bytes <= 1024:
            raise ValueError("label_bytes must be 16 to 1024")
        if not 1 <= self.challenges <= MAX_CHALLENGES:
            raise ValueError(f"challenges must be 1 to {MAX_CHALLENGES}")
        if not 1 <= self.max_labels <= MAX_LABELS:
            raise ValueError(f"max_labels must be 1 to {MAX_LABELS}")

    @property
    def label_memory(self) -> int:
        """Bytes of memory scrypt needs per label (128 * N * r)."""
        return 128 * self.scrypt_n * self.scrypt_r


SPACE_PARAMS: dict[int, SpaceParams] = {
    1: SpaceParams(version=1, scrypt_n=1 << 7, scrypt_r=8, scrypt_p=1, label_bytes=32,
                   challenges=8, max_labels=1 << 26),
}
DEFAULT_SPACE = SPACE_PARAMS[1]


# --- labels, plot ids, challenges ------------------------------------------------------------

def _node_bytes(node_id: Any) -> bytes:
    """A node id as its 32 key bytes (accepts hmnode.identity.NodeId too)."""
    key = getattr(node_id, "key", node_id)
    if not isinstance(key, bytes) or len(key) != NODE_ID_BYTES:
        raise ValueError(f"a node id is {NODE_ID_BYTES} bytes")
    return key


def plot_id_for(node_id: bytes, n_labels: int, params: SpaceParams = DEFAULT_SPACE) -> bytes:
    """The id of this node's plot of `n_labels` labels under `params`."""
    return digest(_TAG_PLOT, _node_bytes(node_id), params.version.to_bytes(4, "big"),
                  n_labels.to_bytes(8, "big"))


def compute_label(params: SpaceParams, node_id: bytes, plot_id: bytes, index: int) -> bytes:
    """Label `index` of a plot: scrypt of (plot_id || index) salted with the node id."""
    salt = digest(_TAG_SALT, node_id)
    kdf = Scrypt(salt=salt, length=params.label_bytes, n=params.scrypt_n, r=params.scrypt_r,
                 p=params.scrypt_p)
    return kdf.derive(plot_id + index.to_bytes(8, "big"))


def challenge_indices(beacon: bytes, root: bytes, n_labels: int,
                      params: SpaceParams = DEFAULT_SPACE) -> list[int]:
    """The label indices a beacon challenges in the plot committed to by `root`."""
    return [int.from_bytes(digest(_TAG_CHALLENGE, beacon, root, j.to_bytes(4, "big")), "big")
            % n_labels for j in range(params.challenges)]


# --- the Merkle tree -------------------------------------------------------------------------

# Prefix hashers equal to digest(tag, ...) with the tag already absorbed: hashing a plot is
# millions of these, and re-hashing the tag each time would double the cost.
_LEAF_PREFIX = hashlib.sha256(len(_TAG_LEAF).to_bytes(4, "big") + _TAG_LEAF)
_NODE_PREFIX = hashlib.sha256(len(_TAG_NODE).to_bytes(4, "big") + _TAG_NODE)
_HASH_LEN = HASH_BYTES.to_bytes(4, "big")


def leaf_hash(label: bytes) -> bytes:
    """The Merkle leaf of a label: digest(b"hmnode/space/leaf", label)."""
    h = _LEAF_PREFIX.copy()
    h.update(len(label).to_bytes(4, "big") + label)
    return h.digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """An inner Merkle node: digest(b"hmnode/space/node", left, right) of two 32-byte hashes."""
    h = _NODE_PREFIX.copy()
    h.update(_HASH_LEN + left + _HASH_LEN + right)
    return h.digest()


def level_sizes(n_leaves: int) -> list[int]:
    """The number of nodes on each level, leaves first, root last."""
    sizes = [n_leaves]
    while sizes[-1] > 1:
        sizes.append((sizes[-1] + 1) // 2)
    return sizes


def tree_height(n_leaves: int) -> int:
    """Levels above the leaves (ceil(log2 n)); the longest a Merkle path can be."""
    return max(n_leaves - 1, 0).bit_length()


def _next_level(level: Sequence[bytes]) -> list[bytes]:
    up = [node_hash(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
    if len(level) % 2:
        up.append(level[-1])  # the odd one out is carried up unchanged
    return up


def merkle_levels(leaves: Sequence[bytes]) -> list[list[bytes]]:
    """Every level of the tree over `leaves` (leaf hashes), leaves first, the root last."""
    levels = [list(leaves)]
    while len(levels[-1]) > 1:
        levels.append(_next_level(levels[-1]))
    return levels


def path_length(index: int, n_leaves: int) -> int:
    """How many siblings the path of leaf `index` has (levels where it has no sibling skip)."""
    length = 0
    for size in level_sizes(n_leaves)[:-1]:
        if index ^ 1 < size:
            length += 1
        index >>= 1
    return length


def root_from_path(label: bytes, index: int, n_leaves: int, path: Sequence[bytes]) -> bytes:
    """The root that `path` leads to from `label` at `index`; ProofRejected if the path is not
    exactly as long as that leaf's path must be."""
    h = leaf_hash(label)
    used = 0
    position = index
    for size in level_sizes(n_leaves)[:-1]:
        if position ^ 1 < size:
            if used == len(path):
                raise ProofRejected(f"space proof: the Merkle path of label {index} is too short")
            sibling = path[used]
            used += 1
            h = node_hash(sibling, h) if position & 1 else node_hash(h, sibling)
        position >>= 1
    if used != len(path):
        raise ProofRejected(f"space proof: the Merkle path of label {index} is too long")
    return h


# --- the commitment and the proof ------------------------------------------------------------

@dataclass(frozen=True)
class PlotCommitment:
    """What a node registers for its plot: whose it is, its size and its Merkle root."""

    version: int
    node_id: bytes
    plot_id: bytes
    n_labels: int
    root: bytes

    def to_wire(self) -> list:
        """The canonical wire form (a msgpack array)."""
        return ["plot", self.version, self.node_id, self.plot_id, self.n_labels, self.root]

    @classmethod
    def from_wire(cls, wire: list) -> "PlotCommitment":
        """Parse and check every field; ProofRejected otherwise."""
        what = "plot commitment"
        expect_length(wire, 6, what)
        if wire[0] != "plot":
            raise ProofRejected(f"{what}: not a plot commitment")
        version = field(wire, 1, int, what, "version")
        node_id = field(wire, 2, bytes, what, "node id")
        plot_id = field(wire, 3, bytes, what, "plot id")
        n_labels = field(wire, 4, int, what, "n_labels")
        root = field(wire, 5, bytes, what, "root")
        limit = SPACE_PARAMS[version].max_labels if version in SPACE_PARAMS else MAX_LABELS
        if len(node_id) != NODE_ID_BYTES or len(plot_id) != HASH_BYTES or len(root) != HASH_BYTES:
            raise ProofRejected(f"{what}: a node id, plot id or root of the wrong length")
        if not 1 <= n_labels <= limit:
            raise ProofRejected(f"{what}: n_labels {n_labels} is not 1 to {limit}")
        return cls(version, node_id, plot_id, n_labels, root)

    def encode(self) -> bytes:
        """The canonical bytes."""
        return pack(self.to_wire())

    @classmethod
    def decode(cls, data: bytes) -> "PlotCommitment":
        """A commitment from its bytes; ProofRejected for anything malformed."""
        commitment = cls.from_wire(unpack(data, "plot commitment"))
        if commitment.encode() != bytes(data):
            raise ProofRejected("plot commitment: not in canonical encoding")
        return commitment


class Opening(NamedTuple):
    """One challenged label and the sibling hashes from its leaf up to the root."""

    index: int
    label: bytes
    path: tuple[bytes, ...]


@dataclass(frozen=True)
class SpaceProof:
    """The openings of the labels a beacon challenges in a committed plot."""

    version: int
    node_id: bytes
    plot_id: bytes
    n_labels: int
    root: bytes
    beacon: bytes
    openings: tuple[Opening, ...]

    @property
    def commitment(self) -> PlotCommitment:
        """The plot commitment this proof answers for."""
        return PlotCommitment(self.version, self.node_id, self.plot_id, self.n_labels, self.root)

    def to_wire(self) -> list:
        """The canonical wire form (a msgpack array)."""
        return ["space", self.version, self.node_id, self.plot_id, self.n_labels, self.root,
                self.beacon, [[o.index, o.label, list(o.path)] for o in self.openings]]

    @classmethod
    def from_wire(cls, wire: list, params: SpaceParams | None = None) -> "SpaceProof":
        """Parse and check every field against `params` (else the registered parameter set of
        the proof's version, else absolute bounds); ProofRejected otherwise."""
        what = "space proof"
        expect_length(wire, 8, what)
        if wire[0] != "space":
            raise ProofRejected(f"{what}: not a space proof")
        version = field(wire, 1, int, what, "version")
        node_id = field(wire, 2, bytes, what, "node id")
        plot_id = field(wire, 3, bytes, what, "plot id")
        n_labels = field(wire, 4, int, what, "n_labels")
        root = field(wire, 5, bytes, what, "root")
        beacon = field(wire, 6, bytes, what, "beacon")
        raw_openings = field(wire, 7, list, what, "openings")
        if params is None:
            params = SPACE_PARAMS.get(version)
        if params is not None and version != params.version:
            raise ProofRejected(f"{what}: made under parameter set {version}, "
                                f"not {params.version}")
        max_labels = params.max_labels if params else MAX_LABELS
        max_openings = params.challenges if params else MAX_CHALLENGES
        if len(node_id) != NODE_ID_BYTES:
            raise ProofRejected(f"{what}: the node id is not {NODE_ID_BYTES} bytes")
        if len(plot_id) != HASH_BYTES or len(root) != HASH_BYTES:
            raise ProofRejected(f"{what}: the plot id or root is not {HASH_BYTES} bytes")
        if not 1 <= n_labels <= max_labels:
            raise ProofRejected(f"{what}: n_labels {n_labels} is not 1 to {max_labels}")
        if not MIN_BEACON_BYTES <= len(beacon) <= MAX_BEACON_BYTES:
            raise ProofRejected(f"{what}: the beacon is not {MIN_BEACON_BYTES} to "
                                f"{MAX_BEACON_BYTES} bytes")
        if len(raw_openings) > max_openings:
            raise ProofRejected(f"{what}: {len(raw_openings)} openings, more than the "
                                f"{max_openings} challenges")
        height = tree_height(n_labels)
        openings = []
        for j, item in enumerate(raw_openings):
            name = f"opening {j}"
            if not isinstance(item, list):
                raise ProofRejected(f"{what}: {name} is not an array")
            expect_length(item, 3, f"{what}: {name}")
            index = field(item, 0, int, what, f"{name} index")
            label = field(item, 1, bytes, what, f"{name} label")
            path = field(item, 2, list, what, f"{name} path")
            if not 0 <= index < n_labels:
                raise ProofRejected(f"{what}: {name} index {index} is outside the plot")
            if params is not None and len(label) != params.label_bytes:
                raise ProofRejected(f"{what}: {name} label is not {params.label_bytes} bytes")
            if not 16 <= len(label) <= 1024:
                raise ProofRejected(f"{what}: {name} label has an impossible length")
            if len(path) > height:
                raise ProofRejected(f"{what}: {name} path is longer than the tree's height "
                                    f"{height}")
            for sibling in path:
                if not isinstance(sibling, bytes) or len(sibling) != HASH_BYTES:
                    raise ProofRejected(f"{what}: {name} path holds a non-hash")
            openings.append(Opening(index, label, tuple(path)))
        return cls(version, node_id, plot_id, n_labels, root, beacon, tuple(openings))

    def encode(self) -> bytes:
        """The canonical bytes."""
        return pack(self.to_wire())

    @classmethod
    def decode(cls, data: bytes, params: SpaceParams | None = None) -> "SpaceProof":
        """A proof from its bytes; ProofRejected for anything malformed or non-canonical."""
        proof = cls.from_wire(unpack(data, "space proof"), params)
        # Only one encoding per proof: a re-encoded integer or length is not the same bytes.
        if proof.encode() != bytes(data):
            raise ProofRejected("space proof: not in canonical encoding")
        return proof


def verify_space(proof: SpaceProof, node_id: bytes, beacon: bytes,
                 params: SpaceParams = DEFAULT_SPACE,
                 commitment: PlotCommitment | None = None) -> None:
    """Check that `proof` opens, for `node_id`'s plot, exactly the labels `beacon` challenges,
    each a correct scrypt label under the committed root; ProofRejected otherwise.

    `commitment`, where given, is the commitment the node registered before the beacon was
    known; the proof must be for that very plot (see "Grinding" in the module docstring).
    """
    if not isinstance(proof, SpaceProof):
        raise ProofRejected("space proof: not a SpaceProof")
    if proof.version != params.version:
        raise ProofRejected(f"space proof made under parameter set {proof.version}, "
                            f"not {params.version}")
    # Every field is checked again here: a proof built in memory never went through decode.
    try:
        wire = proof.to_wire()
    except (AttributeError, TypeError):
        raise ProofRejected("space proof: malformed fields") from None
    SpaceProof.from_wire(wire, params)
    if proof.node_id != _node_bytes(node_id):
        raise ProofRejected("space proof is for a plot of another node")
    if proof.beacon != beacon:
        raise ProofRejected("space proof answers another (stale or future) beacon")
    if proof.plot_id != plot_id_for(proof.node_id, proof.n_labels, params):
        raise ProofRejected("space proof names a plot id that is not this node's plot of "
                            f"{proof.n_labels} labels")
    if commitment is not None and proof.commitment != commitment:
        raise ProofRejected("space proof is not for the registered plot commitment")
    expected = challenge_indices(beacon, proof.root, proof.n_labels, params)
    if len(proof.openings) != len(expected):
        raise ProofRejected(f"space proof has {len(proof.openings)} openings, "
                            f"not the {len(expected)} challenged")
    got = [o.index for o in proof.openings]
    if got != expected:
        raise ProofRejected(f"space proof opens labels {got}, not the challenged {expected}")
    # Merkle paths first: a forgery is refused for hashes before any scrypt is spent on it.
    for o in proof.openings:
        if root_from_path(o.label, o.index, proof.n_labels, o.path) != proof.root:
            raise ProofRejected(f"space proof: label {o.index} is not under the committed root")
    for o in proof.openings:
        if compute_label(params, proof.node_id, proof.plot_id, o.index) != o.label:
            raise ProofRejected(f"space proof: label {o.index} is not the plot's label")


# --- plots on disk ---------------------------------------------------------------------------

CACHE_LEVEL = 5         # tree levels below this are recomputed from 2^5 labels per challenge
FSYNC_EVERY = 1 << 14   # labels between fsyncs (and checkpoints) while plotting
WRITE_BATCH = 256       # labels computed, written and reported together
LABELS_FILE = "labels.bin"
TREE_FILE = "tree.bin"
META_FILE = "plot.json"
LOCK_FILE = "plot.lock"
_META_FORMAT = "hmnode-plot-v1"

Progress = Callable[[int, int], None]


class PlotError(HmnodeError):
    """A plot cannot be created, resumed or read."""


class PlotMismatch(UsageError):
    """The directory holds another plot (another node, size or parameter set)."""


class PlotBusy(UsageError):
    """Another process is writing this plot."""


class PlotIncomplete(PlotError):
    """The plot has not been finished, so it has no commitment yet."""


class PlotDiskFull(PlotError):
    """The disk filled up while plotting; what was written stays and plotting resumes."""


class PlotDamaged(PlotError):
    """The plot's metadata is unreadable."""


def plot_directory(data_dir: Path, plot_id: bytes) -> Path:
    """Where a data dir keeps the plot `plot_id`: <data dir>/plots/<plot id hex>/."""
    return Path(data_dir) / "plots" / plot_id.hex()


def _write_all(fd: int, data: bytes | memoryview) -> None:
    """os.write until all of `data` is written (a short write is not an error)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _pread_full(fd: int, size: int, offset: int) -> bytes:
    """`size` bytes at `offset`; what is not on disk reads as zeros (so a damaged plot gives
    wrong labels, which fail verification, rather than an error that hides which)."""
    data = os.pread(fd, size, offset)
    return data + bytes(size - len(data)) if len(data) < size else data


def _is_disk_full(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)


def _check_room(directory: Path, n_labels: int, params: SpaceParams) -> None:
    """Refuse, before anything is written, a plot that cannot fit in the free space left."""
    try:
        on_disk = (directory / LABELS_FILE).stat().st_size // params.label_bytes
    except OSError:
        on_disk = 0
    labels_left = max(n_labels - on_disk, 0)
    if not labels_left:
        return
    needed = labels_left * params.label_bytes + sum(
        level_sizes(n_labels)[min(CACHE_LEVEL, tree_height(n_labels)):]) * HASH_BYTES
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if free < needed:
        raise PlotDiskFull(
            f"plotting {labels_left} more labels needs {needed / 2**20:.1f} MiB in "
            f"{existing}, but only {free / 2**20:.1f} MiB are free; free some space or choose "
            "a smaller size")


class _PlotLock:
    """An flock on the plot's lock file, so that two plotters never write one plot."""

    def __init__(self, directory: Path) -> None:
        path = directory / LOCK_FILE
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(self._fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(self._fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise PlotBusy(f"the plot in {directory} is being written by another process "
                               f"(pid {holder}); wait for it to finish or stop it") from None
            raise
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        os.ftruncate(self._fd, 0)
        os.close(self._fd)


class Plot:
    """A plot on disk: its labels, the upper Merkle levels and its metadata."""

    def __init__(self, directory: Path, params: SpaceParams, node_id: bytes, plot_id: bytes,
                 n_labels: int, root: bytes | None, synced: int) -> None:
        self.directory = Path(directory)
        self.params = params
        self.node_id = node_id
        self.plot_id = plot_id
        self.n_labels = n_labels
        self.root = root
        self.synced = synced
        #: labels computed with scrypt by the `create` call that returned this plot
        self.labels_computed = 0
        #: labels found on disk when that call started (resumed from)
        self.resumed_from = 0

    # -- metadata --

    @property
    def complete(self) -> bool:
        """Whether every label is written and the root is committed."""
        return self.root is not None

    def _meta(self) -> dict[str, Any]:
        return {"format": _META_FORMAT, "node_id": self.node_id.hex(),
                "plot_id": self.plot_id.hex(), "n_labels": self.n_labels,
                "params": asdict(self.params), "synced": self.synced,
                "root": None if self.root is None else self.root.hex()}

    def _write_meta(self) -> None:
        """Write plot.json atomically (temporary file, fsync, rename, fsync the directory)."""
        path = self.directory / META_FILE
        tmp = path.with_name(META_FILE + ".tmp")
        data = json.dumps(self._meta(), indent=1, sort_keys=True).encode() + b"\n"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_dir(self.directory)

    @classmethod
    def open(cls, directory: Path, params: SpaceParams | None = None) -> "Plot":
        """The plot in `directory` (complete or not); `params` for a parameter set that is
        not registered (tests), else the registered one of the plot's version."""
        directory = Path(directory)
        path = directory / META_FILE
        try:
            meta = json.loads(path.read_bytes())
        except FileNotFoundError:
            raise PlotError(f"no plot in {directory} (no {META_FILE})") from None
        except (OSError, ValueError) as exc:
            raise PlotDamaged(f"{path} is unreadable ({exc}); delete {directory} and plot "
                              "again") from None
        try:
            if meta["format"] != _META_FORMAT:
                raise ValueError(f"unknown format {meta['format']!r}")
            stored = SpaceParams(**meta["params"])
            node_id = bytes.fromhex(meta["node_id"])
            plot_id = bytes.fromhex(meta["plot_id"])
            n_labels = int(meta["n_labels"])
            synced = int(meta["synced"])
            root = None if meta["root"] is None else bytes.fromhex(meta["root"])
        except (KeyError, TypeError, ValueError) as exc:
            raise PlotDamaged(f"{path} is damaged ({exc}); delete {directory} and plot "
                              "again") from None
        if params is None:
            params = SPACE_PARAMS.get(stored.version)
            if params is None:
                raise PlotMismatch(f"the plot in {directory} uses parameter set "
                                   f"{stored.version}, which this hmnode does not know")
        if stored != params:
            raise PlotMismatch(f"the plot in {directory} was made under other parameters "
                               f"(version {stored.version}) than expected "
                               f"(version {params.version})")
        if plot_id != plot_id_for(node_id, n_labels, params):
            raise PlotDamaged(f"{path} is damaged (its plot id does not match); delete "
                              f"{directory} and plot again")
        return cls(directory, params, node_id, plot_id, n_labels, root, synced)

    # -- plotting --

    @classmethod
    def create(cls, directory: Path, node_id: bytes, n_labels: int,
               params: SpaceParams = DEFAULT_SPACE, progress: Progress | None = None,
               workers: int | None = None) -> "Plot":
        """Create the plot in `directory`, or resume it from the labels already on disk, or
        return it as it is if it is complete. `progress(done, total)` is called as labels are
        written (it may raise to stop plotting, which leaves a resumable plot)."""
        node = _node_bytes(node_id)
        if not 1 <= n_labels <= params.max_labels:
            raise UsageError(f"a plot has 1 to {params.max_labels} labels, not {n_labels}")
        directory = Path(directory)
        plot_id = plot_id_for(node, n_labels, params)
        _check_room(directory, n_labels, params)
        try:
            directory.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            directory.mkdir(mode=0o700, exist_ok=True)
        except OSError as exc:
            raise PlotError(f"cannot create plot directory {directory}: {exc.strerror}") from None
        try:
            lock = _PlotLock(directory)
        except OSError as exc:
            raise PlotError(f"cannot lock the plot in {directory}: {exc.strerror}") from None
        try:
            if (directory / META_FILE).exists():
                plot = cls.open(directory, params)
                if (plot.node_id, plot.n_labels) != (node, n_labels):
                    raise PlotMismatch(
                        f"{directory} holds the plot {plot.plot_id.hex()} of "
                        f"{plot.n_labels} labels of node {plot.node_id.hex()}, not this one; "
                        "give another directory")
                if plot.complete:
                    plot.resumed_from = n_labels
                    return plot
            else:
                plot = cls(directory, params, node, plot_id, n_labels, None, 0)
                plot._write_meta()
            plot._plot_labels(progress, workers)
            plot._build_tree()
            plot._write_meta()
            return plot
        except OSError as exc:
            if _is_disk_full(exc):
                raise PlotDiskFull(
                    f"the disk holding {directory} is full ({exc.strerror}); the plot is kept "
                    "and resumes where it stopped: free some space (or choose a smaller size) "
                    "and run the same command again") from None
            raise PlotError(f"cannot write the plot in {directory}: {exc}") from None
        finally:
            lock.release()

    def _plot_labels(self, progress: Progress | None, workers: int | None) -> None:
        lb = self.params.label_bytes
        path = self.directory / LABELS_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            done = min(os.fstat(fd).st_size // lb, self.n_labels)
            os.ftruncate(fd, done * lb)  # drops a torn last record (and anything beyond n)
            self.synced = min(self.synced, done)  # labels deleted since are no longer durable
            done = self._check_unsynced(fd, done)
            self.resumed_from = done
            if done == self.n_labels:
                if self.synced < done:
                    os.fsync(fd)
                    self.synced = done
                    self._write_meta()
                return
            if progress is not None:
                progress(done, self.n_labels)
            if workers is None:
                workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
                    else (os.cpu_count() or 1)
            params, node, plot_id = self.params, self.node_id, self.plot_id

            def label(i: int) -> bytes:
                # Looked up at call time so that tests can count the scrypt calls.
                return compute_label(params, node, plot_id, i)

            os.lseek(fd, done * lb, os.SEEK_SET)
            # scrypt releases the GIL, so threads use every core.
            with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
                try:
                    while done < self.n_labels:
                        end = min(done + WRITE_BATCH, self.n_labels)
                        batch = b"".join(pool.map(label, range(done, end)))
                        self.labels_computed += end - done
                        _write_all(fd, batch)
                        done = end
                        if done - self.synced >= FSYNC_EVERY or done == self.n_labels:
                            os.fsync(fd)
                            self.synced = done
                            self._write_meta()
                        if progress is not None:
                            progress(done, self.n_labels)
                finally:
                    self._checkpoint(fd)
        finally:
            os.close(fd)

    def _checkpoint(self, fd: int) -> None:
        """On the way out (also for Ctrl-C or a full disk), make the whole labels written so
        far durable and record them, so that a resume trusts them without recomputing."""
        try:
            lb = self.params.label_bytes
            whole = os.fstat(fd).st_size // lb
            if whole > self.synced:
                os.fsync(fd)
                self.synced = whole
                self._write_meta()
        except OSError:
            pass  # a full disk may refuse even this; the resume then checks those labels

    def _check_unsynced(self, fd: int, done: int) -> int:
        """Labels past the last checkpoint were written before a crash and may be garbage
        (a file can grow before its data reach the disk): keep them only as far as they match
        a recomputation, and truncate at the first that does not."""
        lb = self.params.label_bytes
        start = min(self.synced, done)
        for i in range(start, done):
            if _pread_full(fd, lb, i * lb) != compute_label(self.params, self.node_id,
                                                             self.plot_id, i):
                os.ftruncate(fd, i * lb)
                return i
            self.labels_computed += 1
        return done

    def _tree_levels(self) -> tuple[int, list[int], list[int]]:
        """The lowest stored level, every level's size, and each stored level's file offset."""
        sizes = level_sizes(self.n_labels)
        low = min(CACHE_LEVEL, len(sizes) - 1)
        offsets = [0] * len(sizes)
        pos = 0
        for level in range(low, len(sizes)):
            offsets[level] = pos
            pos += sizes[level] * HASH_BYTES
        return low, sizes, offsets

    def _subtree(self, fd: int, block: int, low: int) -> tuple[list[bytes], list[list[bytes]]]:
        """The labels of block `block` (2^low leaves) and the tree levels over them."""
        lb = self.params.label_bytes
        first = block << low
        count = min(1 << low, self.n_labels - first)
        data = _pread_full(fd, count * lb, first * lb)
        labels = [data[k * lb:(k + 1) * lb] for k in range(count)]
        return labels, merkle_levels([leaf_hash(x) for x in labels])

    def _build_tree(self) -> None:
        """Hash the labels file into the stored levels and the root (written atomically)."""
        low, sizes, _ = self._tree_levels()
        base = bytearray()
        fd = os.open(self.directory / LABELS_FILE, os.O_RDONLY)
        try:
            for block in range(sizes[low]):
                _, levels = self._subtree(fd, block, low)
                base += levels[-1][0]
        finally:
            os.close(fd)
        tmp = self.directory / (TREE_FILE + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            level = [bytes(base[k:k + HASH_BYTES]) for k in range(0, len(base), HASH_BYTES)]
            del base
            while True:
                _write_all(fd, b"".join(level))
                if len(level) == 1:
                    break
                level = _next_level(level)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        os.replace(tmp, self.directory / TREE_FILE)
        fsync_dir(self.directory)
        self.root = level[0]

    # -- using a plot --

    def labels_on_disk(self) -> int:
        """How many whole labels the labels file holds now."""
        try:
            return (self.directory / LABELS_FILE).stat().st_size // self.params.label_bytes
        except FileNotFoundError:
            return 0

    def commitment(self) -> PlotCommitment:
        """The plot's commitment; PlotIncomplete until plotting has finished."""
        if self.root is None:
            raise PlotIncomplete(f"the plot in {self.directory} is not finished "
                                 f"({self.labels_on_disk()} of {self.n_labels} labels); "
                                 "run plotting again to resume it")
        return PlotCommitment(self.params.version, self.node_id, self.plot_id, self.n_labels,
                              self.root)

    def prove(self, beacon: bytes) -> SpaceProof:
        """Open the labels `beacon` challenges, reading them and the stored tree levels from
        disk. Labels lost from disk are read as they are (or as zeros), so challenges that hit
        them give a proof that does not verify."""
        commitment = self.commitment()
        if not isinstance(beacon, bytes) or not MIN_BEACON_BYTES <= len(beacon) <= MAX_BEACON_BYTES:
            raise ValueError(f"a beacon is {MIN_BEACON_BYTES} to {MAX_BEACON_BYTES} bytes")
        indices = challenge_indices(beacon, commitment.root, self.n_labels, self.params)
        return SpaceProof(commitment.version, self.node_id, self.plot_id, self.n_labels,
                          commitment.root, beacon, self.openings(indices))

    def openings(self, indices: Sequence[int]) -> tuple[Opening, ...]:
        """The label and Merkle path of each of `indices`, as read from disk."""
        self.commitment()  # refuses an unfinished plot
        low, sizes, offsets = self._tree_levels()
        out = []
        labels_fd = os.open(self.directory / LABELS_FILE, os.O_RDONLY)
        try:
            tree_fd = os.open(self.directory / TREE_FILE, os.O_RDONLY)
        except BaseException:
            os.close(labels_fd)
            raise
        try:
            for index in indices:
                if not 0 <= index < self.n_labels:
                    raise ValueError(f"label {index} is outside the plot of {self.n_labels}")
                # The levels below `low` are not stored: rebuild this block's subtree.
                block = index >> low
                labels, local = self._subtree(labels_fd, block, low)
                path: list[bytes] = []
                for level in range(len(sizes) - 1):
                    sibling = (index >> level) ^ 1
                    if sibling >= sizes[level]:
                        continue  # the odd one out: no sibling on this level
                    if level < low:
                        path.append(local[level][sibling - (block << (low - level))])
                    else:
                        path.append(_pread_full(tree_fd, HASH_BYTES,
                                                offsets[level] + sibling * HASH_BYTES))
                out.append(Opening(index, labels[index - (block << low)], tuple(path)))
        finally:
            os.close(labels_fd)
            os.close(tree_fd)
        return tuple(out)
