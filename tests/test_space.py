"""Proof of space: honest proofs verify, forgeries and damaged plots are refused, plotting
resumes without redoing work, and `hmnode plot` prints the commitment."""

from __future__ import annotations

import dataclasses
import errno
import itertools
import json
import os
import random
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner
from hypothesis import given, settings, strategies as st

from hmnode.cli.main import main
from hmnode.cli.plot import parse_size
from hmnode.consensus import space
from hmnode.consensus.proof import ProofRejected, digest
from hmnode.consensus.space import (DEFAULT_SPACE, SPACE_PARAMS, Opening, Plot, PlotBusy,
                                    PlotCommitment, PlotDiskFull, PlotIncomplete, PlotMismatch,
                                    SpaceParams, SpaceProof, challenge_indices, compute_label,
                                    leaf_hash, merkle_levels, node_hash, path_length, plot_id_for,
                                    root_from_path, tree_height, verify_space)
from hmnode.errors import UsageError

# The same code with a test-sized scrypt (N=2, r=1: microseconds a label), under versions that
# are not registered, so nothing here can be mistaken for the real parameter set.
TEST = SpaceParams(version=9001, scrypt_n=2, scrypt_r=1, scrypt_p=1, label_bytes=32,
                   challenges=8, max_labels=1 << 12)
OTHER = dataclasses.replace(TEST, version=9002)
NODE_A = bytes(range(32))
NODE_B = bytes(range(1, 33))
BEACON = b"block hash 0000000000000000000001"


def flip(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


def ref_path(levels: list[list[bytes]], index: int) -> list[bytes]:
    """A Merkle path straight from the in-memory levels (independent of Plot's disk layout)."""
    path = []
    for level in levels[:-1]:
        if index ^ 1 < len(level):
            path.append(level[index ^ 1])
        index >>= 1
    return path


@pytest.fixture(scope="module")
def plots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Plot]:
    """Complete plots of several shapes: one leaf, below the cached level, odd levels on both
    sides of it, and a second node's plot of the same size."""
    root = tmp_path_factory.mktemp("plots")
    made = {f"a{n}": Plot.create(root / f"a{n}", NODE_A, n, TEST) for n in (1, 5, 32, 33, 100)}
    made["b100"] = Plot.create(root / "b100", NODE_B, 100, TEST)
    return made


# --- honest proofs ---------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(beacon=st.binary(min_size=16, max_size=80), name=st.sampled_from(["a1", "a5", "a32", "a33",
                                                                           "a100", "b100"]))
def test_every_honest_proof_verifies(plots: dict[str, Plot], beacon: bytes, name: str) -> None:
    plot = plots[name]
    proof = plot.prove(beacon)
    verify_space(proof, plot.node_id, beacon, TEST, commitment=plot.commitment())
    decoded = SpaceProof.decode(proof.encode())
    assert decoded == proof
    verify_space(decoded, plot.node_id, beacon, TEST)
    assert [o.index for o in proof.openings] == challenge_indices(beacon, plot.root,
                                                                  plot.n_labels, TEST)


def test_plot_root_is_the_merkle_root_of_the_recomputed_labels(plots: dict[str, Plot]) -> None:
    for plot in plots.values():
        labels = [compute_label(TEST, plot.node_id, plot.plot_id, i) for i in range(plot.n_labels)]
        levels = merkle_levels([leaf_hash(x) for x in labels])
        assert plot.root == levels[-1][0]
        indices = list(range(plot.n_labels))
        for opening in plot.openings(indices):
            assert opening.label == labels[opening.index]
            assert list(opening.path) == ref_path(levels, opening.index)


def _rfc6962_root(leaves: list[bytes]) -> bytes:
    if len(leaves) == 1:
        return leaves[0]
    k = 1 << ((len(leaves) - 1).bit_length() - 1)  # the largest power of two below n
    return node_hash(_rfc6962_root(leaves[:k]), _rfc6962_root(leaves[k:]))


def test_merkle_tree_shape_and_paths() -> None:
    assert leaf_hash(b"x" * 32) == digest(b"hmnode/space/leaf", b"x" * 32)
    assert node_hash(b"a" * 32, b"b" * 32) == digest(b"hmnode/space/node", b"a" * 32, b"b" * 32)
    # A leaf can never pass for an inner node: the two are domain-separated.
    assert leaf_hash(b"a" * 32 + b"b" * 32) != node_hash(b"a" * 32, b"b" * 32)
    rng = random.Random(7)
    for n in range(1, 70):
        leaves = [rng.randbytes(32) for _ in range(n)]
        levels = merkle_levels(leaves)
        assert levels[-1][0] == _rfc6962_root(leaves)  # odd nodes carried up, as RFC 6962
        assert len(levels) - 1 == tree_height(n)
        for i in range(n):
            path = ref_path(levels, i)
            assert len(path) == path_length(i, n) <= tree_height(n)
            # root_from_path hashes the label itself: use a label whose leaf we know.
        labels = [rng.randbytes(32) for _ in range(n)]
        levels = merkle_levels([leaf_hash(x) for x in labels])
        for i in range(n):
            assert root_from_path(labels[i], i, n, ref_path(levels, i)) == levels[-1][0]
    # A duplicated last leaf does not give the same root (no CVE-2012-2459 malleability).
    three = [rng.randbytes(32) for _ in range(3)]
    assert merkle_levels(three)[-1][0] != merkle_levels(three + three[-1:])[-1][0]


# --- forgeries -------------------------------------------------------------------------------


def test_any_single_bit_flip_of_an_encoded_proof_is_refused(plots: dict[str, Plot]) -> None:
    plot = plots["a33"]
    data = plot.prove(BEACON).encode()
    for bit in range(len(data) * 8):
        with pytest.raises(ProofRejected):
            verify_space(SpaceProof.decode(flip(data, bit)), NODE_A, BEACON, TEST)


def test_a_plot_of_another_node_is_refused(plots: dict[str, Plot]) -> None:
    proof = plots["b100"].prove(BEACON)
    with pytest.raises(ProofRejected, match="another node"):
        verify_space(proof, NODE_A, BEACON, TEST)
    # Claiming B's plot as A's: the plot id (and every label) is bound to B.
    claimed = dataclasses.replace(proof, node_id=NODE_A)
    with pytest.raises(ProofRejected, match="plot id"):
        verify_space(claimed, NODE_A, BEACON, TEST)
    # Even with A's plot id, B's labels are not A's labels.
    claimed = dataclasses.replace(proof, node_id=NODE_A, plot_id=plot_id_for(NODE_A, 100, TEST))
    with pytest.raises(ProofRejected, match="not the plot's label"):
        verify_space(claimed, NODE_A, BEACON, TEST)


def test_a_wrong_or_stale_beacon_is_refused(plots: dict[str, Plot]) -> None:
    stale = plots["a100"].prove(b"yesterday's block hash 000000000")
    with pytest.raises(ProofRejected, match="beacon"):
        verify_space(stale, NODE_A, BEACON, TEST)
    # Relabelling the old openings with today's beacon: they are not today's challenges.
    relabelled = dataclasses.replace(stale, beacon=BEACON)
    with pytest.raises(ProofRejected, match="challenged"):
        verify_space(relabelled, NODE_A, BEACON, TEST)


def test_a_wrong_parameter_version_is_refused(plots: dict[str, Plot]) -> None:
    proof = plots["a100"].prove(BEACON)
    for params in (OTHER, DEFAULT_SPACE):
        with pytest.raises(ProofRejected, match="parameter set"):
            verify_space(proof, NODE_A, BEACON, params)
    with pytest.raises(ProofRejected, match="parameter set"):
        SpaceProof.decode(proof.encode(), OTHER)
    # A proof that claims the registered version is still made of test-sized labels.
    with pytest.raises(ProofRejected):
        verify_space(dataclasses.replace(proof, version=DEFAULT_SPACE.version), NODE_A, BEACON,
                     DEFAULT_SPACE)


def _replace_opening(proof: SpaceProof, j: int, opening: Opening) -> SpaceProof:
    openings = list(proof.openings)
    openings[j] = opening
    return dataclasses.replace(proof, openings=tuple(openings))


def test_truncated_or_padded_merkle_paths_are_refused(plots: dict[str, Plot]) -> None:
    proof = plots["a100"].prove(BEACON)
    first = proof.openings[0]
    short = _replace_opening(proof, 0, first._replace(path=first.path[:-1]))
    with pytest.raises(ProofRejected, match="too short"):
        verify_space(short, NODE_A, BEACON, TEST)
    empty = _replace_opening(proof, 0, first._replace(path=()))
    with pytest.raises(ProofRejected):
        verify_space(empty, NODE_A, BEACON, TEST)
    longer = _replace_opening(proof, 0, first._replace(path=first.path + (bytes(32),)))
    with pytest.raises(ProofRejected):
        verify_space(longer, NODE_A, BEACON, TEST)
    too_long = _replace_opening(proof, 0, first._replace(path=(bytes(32),) * 20))
    with pytest.raises(ProofRejected, match="height"):
        SpaceProof.decode(too_long.encode(), TEST)


def test_a_label_and_path_from_another_plot_are_refused(plots: dict[str, Plot]) -> None:
    proof = plots["a100"].prove(BEACON)
    for j, opening in enumerate(proof.openings):
        [foreign] = plots["b100"].openings([opening.index])
        with pytest.raises(ProofRejected, match="committed root"):
            verify_space(_replace_opening(proof, j, foreign), NODE_A, BEACON, TEST)
        mixed = opening._replace(label=foreign.label)
        with pytest.raises(ProofRejected, match="committed root"):
            verify_space(_replace_opening(proof, j, mixed), NODE_A, BEACON, TEST)


def test_a_consistent_tree_over_another_nodes_labels_is_refused(plots: dict[str, Plot]) -> None:
    """B's labels under a root that commits to them, presented as A's plot: every Merkle path
    checks, so only the scrypt recomputation can catch it."""
    b = plots["b100"]
    labels = [compute_label(TEST, NODE_B, b.plot_id, i) for i in range(100)]
    levels = merkle_levels([leaf_hash(x) for x in labels])
    root = levels[-1][0]
    indices = challenge_indices(BEACON, root, 100, TEST)
    forged = SpaceProof(TEST.version, NODE_A, plot_id_for(NODE_A, 100, TEST), 100, root, BEACON,
                        tuple(Opening(i, labels[i], tuple(ref_path(levels, i))) for i in indices))
    with pytest.raises(ProofRejected, match="not the plot's label"):
        verify_space(forged, NODE_A, BEACON, TEST)


def test_openings_for_the_wrong_indices_are_refused(plots: dict[str, Plot]) -> None:
    plot = plots["a100"]
    proof = plot.prove(BEACON)
    first = proof.openings[0]
    # A genuine opening of another label is still not the challenged one.
    [other] = plot.openings([(first.index + 1) % 100])
    with pytest.raises(ProofRejected, match="challenged"):
        verify_space(_replace_opening(proof, 0, other), NODE_A, BEACON, TEST)
    # The right openings in the wrong order.
    j = next(j for j, o in enumerate(proof.openings) if o.index != first.index)
    swapped = _replace_opening(_replace_opening(proof, 0, proof.openings[j]), j, first)
    with pytest.raises(ProofRejected, match="challenged"):
        verify_space(swapped, NODE_A, BEACON, TEST)
    outside = _replace_opening(proof, 0, first._replace(index=100))
    with pytest.raises(ProofRejected, match="outside"):
        verify_space(outside, NODE_A, BEACON, TEST)


def test_extra_or_missing_openings_are_refused(plots: dict[str, Plot]) -> None:
    proof = plots["a100"].prove(BEACON)
    for openings in (proof.openings[:-1], (), proof.openings + proof.openings[-1:]):
        bad = dataclasses.replace(proof, openings=openings)
        with pytest.raises(ProofRejected, match="openings"):
            verify_space(bad, NODE_A, BEACON, TEST)
    with pytest.raises(ProofRejected, match="more than"):
        SpaceProof.decode(dataclasses.replace(proof, openings=proof.openings * 2).encode(), TEST)


def test_malformed_wire_forms_are_refused(plots: dict[str, Plot]) -> None:
    wire = plots["a5"].prove(BEACON).to_wire()
    bad_wires = [
        wire[:-1], wire + [0], ["work", *wire[1:]],
        [*wire[:4], True, *wire[5:]],                    # n_labels as a bool
        [*wire[:6], b"short", wire[7]],                   # beacon below the minimum
        [*wire[:7], [[0, b"x" * 32]]],                    # an opening without a path
        [*wire[:7], [[0, b"x" * 32, ["not a hash"]]]],
        [*wire[:7], [[0, "label", []]]],
        [*wire[:4], 0, *wire[5:]],                        # an empty plot
        [*wire[:4], TEST.max_labels + 1, *wire[5:]],
    ]
    for bad in bad_wires:
        with pytest.raises(ProofRejected):
            SpaceProof.from_wire(bad, TEST)
    for data in (b"", b"\xc1", b"\x93\x01\x02\x03", os.urandom(70_000)):
        with pytest.raises(ProofRejected):
            SpaceProof.decode(data)
    commitment = plots["a5"].commitment()
    assert PlotCommitment.decode(commitment.encode()) == commitment


# --- a plot that lost part of itself ---------------------------------------------------------


def test_a_prover_missing_a_fraction_f_passes_with_probability_1_minus_f_to_the_k(
        tmp_path: Path) -> None:
    params = dataclasses.replace(TEST, version=9003, challenges=3)
    plot = Plot.create(tmp_path / "p", NODE_A, 256, params)
    f = 0.5
    with open(tmp_path / "p" / space.LABELS_FILE, "r+b") as fh:
        fh.truncate(int(256 * (1 - f)) * params.label_bytes)  # the second half is deleted
    rng = random.Random(20240611)
    trials = 200
    passed = 0
    for _ in range(trials):
        beacon = rng.randbytes(32)
        proof = plot.prove(beacon)  # no special case: it opens what it has
        hit = any(i >= 128 for i in challenge_indices(beacon, plot.root, 256, params))
        try:
            verify_space(proof, NODE_A, beacon, params)
        except ProofRejected:
            assert hit
        else:
            assert not hit
            passed += 1
    expected = (1 - f) ** params.challenges  # 0.125: 25 of 200, standard deviation 4.7
    assert abs(passed / trials - expected) < 0.06, (passed, expected)


def test_a_corrupted_label_fails_the_challenges_that_reach_it(tmp_path: Path) -> None:
    plot = Plot.create(tmp_path / "p", NODE_A, 100, TEST)
    with open(tmp_path / "p" / space.LABELS_FILE, "r+b") as fh:
        fh.seek(70 * TEST.label_bytes)
        fh.write(b"\0" * TEST.label_bytes)
    outcomes = set()
    for n in range(100):
        beacon = n.to_bytes(16, "big")
        indices = challenge_indices(beacon, plot.root, 100, TEST)
        # Block 2 (labels 64..95) rebuilds its paths through label 70.
        hit = any(64 <= i < 96 for i in indices)
        try:
            verify_space(plot.prove(beacon), NODE_A, beacon, TEST)
            outcomes.add(("passed", hit))
        except ProofRejected:
            outcomes.add(("refused", hit))
    assert outcomes == {("passed", False), ("refused", True)}


# --- plotting --------------------------------------------------------------------------------


class _Counter:
    def __init__(self) -> None:
        self.calls = 0
        self._lock = threading.Lock()

    def wrap(self, fn):  # type: ignore[no-untyped-def]
        def counted(*args):  # type: ignore[no-untyped-def]
            with self._lock:
                self.calls += 1
            return fn(*args)
        return counted


def test_interrupted_plotting_resumes_without_redoing_finished_labels(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(space, "WRITE_BATCH", 64)
    whole = Plot.create(tmp_path / "whole", NODE_A, 1000, TEST)

    class Stop(Exception):
        pass

    def stop_halfway(done: int, total: int) -> None:
        if done >= total // 2:
            raise Stop

    counter = _Counter()
    monkeypatch.setattr(space, "compute_label", counter.wrap(space.compute_label))
    with pytest.raises(Stop):
        Plot.create(tmp_path / "p", NODE_A, 1000, TEST, progress=stop_halfway)
    first_run = counter.calls
    assert first_run == 512  # 8 batches of 64
    stopped = Plot.open(tmp_path / "p", TEST)
    assert not stopped.complete and stopped.labels_on_disk() == 512 and stopped.synced == 512
    with pytest.raises(PlotIncomplete, match="512 of 1000"):
        stopped.commitment()
    seen: list[int] = []
    resumed = Plot.create(tmp_path / "p", NODE_A, 1000, TEST,
                          progress=lambda done, total: seen.append(done))
    assert counter.calls - first_run == 1000 - 512 == resumed.labels_computed
    assert resumed.resumed_from == 512 and seen[0] == 512 and seen[-1] == 1000
    assert resumed.commitment() == whole.commitment()
    assert (tmp_path / "p" / space.LABELS_FILE).read_bytes() == \
        (tmp_path / "whole" / space.LABELS_FILE).read_bytes()
    # A finished plot is returned as it is.
    again = Plot.create(tmp_path / "p", NODE_A, 1000, TEST)
    assert counter.calls - first_run == 488 and again.labels_computed == 0
    assert Plot.open(tmp_path / "p", TEST).commitment() == whole.commitment()


def test_a_torn_record_and_unsynced_garbage_are_redone(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    whole = Plot.create(tmp_path / "whole", NODE_A, 300, TEST)
    labels = (tmp_path / "whole" / space.LABELS_FILE).read_bytes()
    lb = TEST.label_bytes
    # A crash after label 200 with the last 20 labels never reaching the disk (zeros) and a
    # half-written record after them; the checkpoint says 160 were durable.
    plot = Plot(tmp_path / "p", TEST, NODE_A, plot_id_for(NODE_A, 300, TEST), 300, None, 160)
    plot.directory.mkdir()
    plot._write_meta()
    (tmp_path / "p" / space.LABELS_FILE).write_bytes(
        labels[:180 * lb] + bytes(20 * lb) + labels[200 * lb:200 * lb + 7])
    counter = _Counter()
    monkeypatch.setattr(space, "compute_label", counter.wrap(space.compute_label))
    resumed = Plot.create(tmp_path / "p", NODE_A, 300, TEST)
    assert resumed.resumed_from == 180
    # 21 labels checked (160..180 good, 180 bad) then 120 plotted from 180.
    assert counter.calls == 21 + 120
    assert resumed.commitment() == whole.commitment()


def test_a_full_disk_leaves_a_plot_that_resumes(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(space, "WRITE_BATCH", 50)
    real_write = space._write_all
    batches = itertools.count()

    def fill_up(fd: int, data: bytes) -> None:
        # The fourth batch of labels finds the disk full after a partial record.
        if len(data) == 50 * TEST.label_bytes and next(batches) == 3:
            os.write(fd, bytes(data)[:45])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_write(fd, data)

    monkeypatch.setattr(space, "_write_all", fill_up)
    with pytest.raises(PlotDiskFull, match="is full.*run the same command again"):
        Plot.create(tmp_path / "p", NODE_A, 400, TEST)
    monkeypatch.setattr(space, "_write_all", real_write)
    assert Plot.open(tmp_path / "p", TEST).labels_on_disk() == 151  # 150 and the partial one
    resumed = Plot.create(tmp_path / "p", NODE_A, 400, TEST)
    assert resumed.resumed_from == 151
    assert resumed.commitment() == Plot.create(tmp_path / "q", NODE_A, 400, TEST).commitment()


def test_plotting_refuses_to_start_without_room(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(space.shutil, "disk_usage", lambda path: SimpleNamespace(free=1000))
    with pytest.raises(PlotDiskFull, match="MiB are free"):
        Plot.create(tmp_path / "p", NODE_A, 400, TEST)
    assert not (tmp_path / "p").exists()  # refused before anything was written


def test_a_directory_holding_another_plot_is_refused(tmp_path: Path) -> None:
    Plot.create(tmp_path / "p", NODE_A, 10, TEST)
    with pytest.raises(PlotMismatch):
        Plot.create(tmp_path / "p", NODE_B, 10, TEST)
    with pytest.raises(PlotMismatch):
        Plot.create(tmp_path / "p", NODE_A, 11, TEST)
    with pytest.raises(PlotMismatch):
        Plot.open(tmp_path / "p", OTHER)
    with pytest.raises(PlotMismatch, match="does not know"):
        Plot.open(tmp_path / "p")
    with pytest.raises(UsageError):
        Plot.create(tmp_path / "big", NODE_A, TEST.max_labels + 1, TEST)


def test_two_plotters_never_write_one_plot(tmp_path: Path) -> None:
    (tmp_path / "p").mkdir()
    held = space._PlotLock(tmp_path / "p")
    try:
        with pytest.raises(PlotBusy, match=f"pid {os.getpid()}"):
            Plot.create(tmp_path / "p", NODE_A, 10, TEST)
    finally:
        held.release()
    Plot.create(tmp_path / "p", NODE_A, 10, TEST)


def test_the_registered_parameters_make_verifiable_proofs(tmp_path: Path) -> None:
    assert SPACE_PARAMS[DEFAULT_SPACE.version] is DEFAULT_SPACE
    assert DEFAULT_SPACE.label_memory == 128 << 10
    plot = Plot.create(tmp_path / "p", NODE_A, 40, DEFAULT_SPACE)
    proof = SpaceProof.decode(plot.prove(BEACON).encode())  # the registry gives the bounds
    verify_space(proof, NODE_A, BEACON)
    assert Plot.open(tmp_path / "p").commitment() == plot.commitment()


# --- the command -----------------------------------------------------------------------------


def test_parse_size() -> None:
    assert parse_size("64MiB") == 64 * 2**20 // 32
    assert parse_size("1000") == parse_size("1000 labels") == 1000
    assert parse_size("1kB") == 31
    for bad in ("", "0", "12 parsecs", "-5", "3GiB", "1B"):
        with pytest.raises(UsageError):
            parse_size(bad)


def test_hmnode_plot_prints_the_commitment_and_does_not_replot(tmp_path: Path) -> None:
    runner = CliRunner()
    data_dir = tmp_path / "d"
    args = ["plot", "--size", "2KiB", "--json", "--data-dir", str(data_dir)]
    first = runner.invoke(main, args, env={"HMNODE_DATA_DIR": None})
    assert first.exit_code == 0, first.output
    info = json.loads(first.stdout)
    assert info["status"] == "created" and info["n_labels"] == 64
    assert info["labels_computed"] == 64 and info["params_version"] == DEFAULT_SPACE.version
    plot = Plot.open(Path(info["directory"]))
    commitment = plot.commitment()
    assert info["root"] == commitment.root.hex() and info["plot_id"] == commitment.plot_id.hex()
    assert Path(info["directory"]).parent == data_dir / "plots"
    verify_space(plot.prove(BEACON), commitment.node_id, BEACON)

    second = runner.invoke(main, args, env={"HMNODE_DATA_DIR": None})
    assert second.exit_code == 0, second.output
    again = json.loads(second.stdout)
    assert again["status"] == "complete" and again["labels_computed"] == 0
    assert again["root"] == info["root"]

    text = runner.invoke(main, ["plot", "--size", "64", "--data-dir", str(data_dir)])
    assert text.exit_code == 0 and "complete" in text.stdout and info["root"] in text.stdout

    too_big = runner.invoke(main, ["plot", "--size", "1TiB", "--data-dir", str(data_dir)])
    assert too_big.exit_code == 2 and "1 to" in too_big.output
