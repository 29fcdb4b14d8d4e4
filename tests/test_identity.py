"""Node identity: the node id's text form, the key file on disk, and signatures."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hmnode.errors import IdentityError
from hmnode.identity import (
    NODE_ID_PREFIX,
    NodeId,
    NodeKey,
    load_key,
    load_or_create_key,
    verify,
    write_key,
)

keys = st.binary(min_size=32, max_size=32)
B32_ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"
HEADER = b"hmnode-ed25519-seed-v1\n"


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# --- node id text form ----------------------------------------------------------------------


@given(keys)
def test_node_id_text_round_trips(key: bytes) -> None:
    node_id = NodeId(key)
    text = str(node_id)
    assert NodeId.parse(text) == node_id
    assert text.startswith("hm1")
    assert text == text.lower()
    assert len(text) == len(NODE_ID_PREFIX) + 52
    assert set(text[len(NODE_ID_PREFIX):]) <= set(B32_ALPHABET)


@given(keys, keys)
def test_distinct_keys_have_distinct_text(a: bytes, b: bytes) -> None:
    assert (str(NodeId(a)) == str(NodeId(b))) == (a == b)


def test_node_id_rejects_wrong_key_length() -> None:
    for bad in (b"", b"\x00" * 31, b"\x00" * 33):
        with pytest.raises(ValueError):
            NodeId(bad)


@given(keys)
def test_parse_rejects_wrong_prefix(key: bytes) -> None:
    body = str(NodeId(key))[len(NODE_ID_PREFIX):]
    for prefix in ("", "hm2", "HM1", "hm", "xhm1", " hm1"):
        with pytest.raises(ValueError):
            NodeId.parse(prefix + body)


@given(keys, st.integers(min_value=1, max_value=8))
def test_parse_rejects_wrong_length(key: bytes, n: int) -> None:
    text = str(NodeId(key))
    with pytest.raises(ValueError):
        NodeId.parse(text[:-n])
    with pytest.raises(ValueError):
        NodeId.parse(text + "a" * n)


@given(keys, st.data())
def test_parse_rejects_uppercase(key: bytes, data: st.DataObject) -> None:
    text = str(NodeId(key))
    letters = [i for i, c in enumerate(text) if i >= len(NODE_ID_PREFIX) and c.isalpha()]
    i = data.draw(st.sampled_from(letters))
    with pytest.raises(ValueError):
        NodeId.parse(text[:i] + text[i].upper() + text[i + 1:])
    with pytest.raises(ValueError):
        NodeId.parse(text.upper())


@given(keys, st.data())
def test_parse_rejects_non_base32_characters(key: bytes, data: st.DataObject) -> None:
    text = str(NodeId(key))
    i = data.draw(st.integers(min_value=len(NODE_ID_PREFIX), max_value=len(text) - 1))
    bad = data.draw(st.sampled_from("018=-_ .+/\né"))
    with pytest.raises(ValueError):
        NodeId.parse(text[:i] + bad + text[i + 1:])


@given(keys, st.integers(min_value=1, max_value=15))
def test_parse_rejects_non_canonical_trailing_bits(key: bytes, low: int) -> None:
    # 32 bytes are 256 bits; 52 base32 characters carry 260, so the last character's
    # low 4 bits are padding and must be zero in the one canonical spelling.
    text = str(NodeId(key))
    last = B32_ALPHABET.index(text[-1])
    assert last & 0b1111 == 0
    other = text[:-1] + B32_ALPHABET[last | low]
    with pytest.raises(ValueError, match="canonical"):
        NodeId.parse(other)


def test_parse_rejects_non_strings() -> None:
    key = NodeKey.generate().node_id
    with pytest.raises(ValueError):
        NodeId.parse(str(key).encode())  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        NodeId.parse(None)  # type: ignore[arg-type]


# --- key file -------------------------------------------------------------------------------


def test_key_file_is_created_0600_under_a_permissive_umask(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    old = os.umask(0o022)
    try:
        key, created = load_or_create_key(path)
    finally:
        os.umask(old)
    assert created
    assert mode_of(path) == 0o600
    assert path.read_bytes().startswith(HEADER)
    assert not path.with_name("node.key.tmp").exists()
    again, created_again = load_or_create_key(path)
    assert not created_again
    assert again.node_id == key.node_id
    assert again.seed() == key.seed()


def test_key_file_with_umask_000_is_still_0600(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    old = os.umask(0)
    try:
        load_or_create_key(path)
    finally:
        os.umask(old)
    assert mode_of(path) == 0o600


def test_written_key_loads_back(tmp_path: Path) -> None:
    key = NodeKey.generate()
    path = tmp_path / "k"
    write_key(path, key)
    assert load_key(path).node_id == key.node_id


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o660, 0o700 | 0o004])
def test_key_file_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "node.key"
    load_or_create_key(path)
    os.chmod(path, mode)
    before = path.read_bytes()
    for load in (load_key, load_or_create_key):
        with pytest.raises(IdentityError) as info:
            load(path)
        message = str(info.value)
        assert "chmod 600" in message
        assert str(path) in message
    assert path.read_bytes() == before
    assert mode_of(path) == mode
    os.chmod(path, 0o600)
    load_key(path)


def test_owner_only_modes_are_accepted(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    key, _ = load_or_create_key(path)
    os.chmod(path, 0o400)
    assert load_key(path).node_id == key.node_id


def test_missing_key_file_is_an_identity_error(tmp_path: Path) -> None:
    path = tmp_path / "absent.key"
    with pytest.raises(IdentityError, match="hmnode init"):
        load_key(path)


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"ssh-ed25519 AAAA\n",
        b"hmnode-ed25519-seed-v2\n" + base64.b64encode(b"\x01" * 32) + b"\n",
        HEADER + b"not base64 at all!\n",
        HEADER + base64.b64encode(b"\x01" * 32)[:-2] + b"\n",
        HEADER + base64.b64encode(b"\x01" * 31) + b"\n",
        HEADER + base64.b64encode(b"\x01" * 33) + b"\n",
        HEADER + base64.b64encode(b"\x01" * 64) + b"\n",
        HEADER,
    ],
    ids=["empty", "other-format", "future-header", "not-base64", "cut-base64",
         "31-bytes", "33-bytes", "64-bytes", "header-only"],
)
def test_damaged_key_file_is_refused_and_left_unchanged(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "node.key"
    path.write_bytes(content)
    os.chmod(path, 0o600)
    for load in (load_key, load_or_create_key):
        with pytest.raises(IdentityError) as info:
            load(path)
        assert str(path) in str(info.value)
    assert path.read_bytes() == content
    assert sorted(p.name for p in tmp_path.iterdir()) == ["node.key"]


def test_write_key_never_replaces_an_existing_key(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    first, _ = load_or_create_key(path)
    before = path.read_bytes()
    with pytest.raises(IdentityError, match="already exists"):
        write_key(path, NodeKey.generate())
    assert path.read_bytes() == before
    assert load_key(path).node_id == first.node_id
    assert sorted(p.name for p in tmp_path.iterdir()) == ["node.key"]


# --- signatures -----------------------------------------------------------------------------


@given(st.binary(max_size=256), st.integers(min_value=0, max_value=64 * 8 - 1))
def test_verify_accepts_real_and_rejects_forged_signatures(message: bytes, bit: int) -> None:
    key, other = NodeKey.generate(), NodeKey.generate()
    signature = key.sign(message)
    assert len(signature) == 64
    assert verify(key.node_id, message, signature)
    flipped = bytearray(signature)
    flipped[bit // 8] ^= 1 << (bit % 8)
    assert not verify(key.node_id, message, bytes(flipped))
    assert not verify(key.node_id, message, other.sign(message))
    assert not verify(other.node_id, message, signature)
    assert not verify(key.node_id, message + b"x", signature)


def test_verify_rejects_malformed_signatures() -> None:
    key = NodeKey.generate()
    signature = key.sign(b"m")
    assert not verify(key.node_id, b"m", signature[:-1])
    assert not verify(key.node_id, b"m", b"")
    assert not verify(key.node_id, b"m", signature + b"\x00")
