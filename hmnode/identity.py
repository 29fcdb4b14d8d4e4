"""Node identity: an Ed25519 key kept 0600 in the data dir, and the node id's one text form."""

from __future__ import annotations

import base64
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import nacl.exceptions
import nacl.signing

from hmnode.datadir import fsync_dir
from hmnode.errors import IdentityError

# Text form: this prefix ("1" is outside the base32 alphabet, so it marks where the key starts), then the 32-byte public key in lowercase RFC 4648 base32 without padding
# (52 characters). Lowercase base32 survives case-insensitive places such as DNS labels and URLs.
NODE_ID_PREFIX = "hm1"
_KEY_BYTES = 32
_B32_LEN = 52
# A key file holds a versioned header line so that a future key type is recognised, not misread.
_KEY_FILE_HEADER = b"hmnode-ed25519-seed-v1\n"


@dataclass(frozen=True, eq=False)
class NodeId:
    """A node's identity: its Ed25519 public key (32 bytes)."""

    key: bytes

    # Written out rather than generated: ids are hashed and compared on every message, and the
    # generated methods build a tuple each time.
    def __eq__(self, other: object) -> bool:
        return isinstance(other, NodeId) and self.key == other.key

    def __hash__(self) -> int:
        return hash(self.key)

    def __lt__(self, other: "NodeId") -> bool:
        return self.key < other.key

    def __le__(self, other: "NodeId") -> bool:
        return self.key <= other.key

    def __gt__(self, other: "NodeId") -> bool:
        return self.key > other.key

    def __ge__(self, other: "NodeId") -> bool:
        return self.key >= other.key

    def __post_init__(self) -> None:
        if not isinstance(self.key, bytes) or len(self.key) != _KEY_BYTES:
            raise ValueError(f"a node id is a {_KEY_BYTES}-byte Ed25519 public key")

    def __str__(self) -> str:
        return NODE_ID_PREFIX + base64.b32encode(self.key).decode("ascii").rstrip("=").lower()

    def __repr__(self) -> str:
        return f"NodeId({self})"

    def short(self) -> str:
        """An abbreviation for logs and tables; always print `str()` where it must be exact."""
        return str(self)[: len(NODE_ID_PREFIX) + 10]

    @classmethod
    def parse(cls, text: str) -> "NodeId":
        """Read the text form back; raises ValueError saying what is wrong with it."""
        if not isinstance(text, str) or not text.startswith(NODE_ID_PREFIX):
            raise ValueError(f"a node id starts with {NODE_ID_PREFIX!r}: {text!r}")
        body = text[len(NODE_ID_PREFIX) :]
        if len(body) != _B32_LEN or body != body.lower():
            raise ValueError(
                f"a node id is {NODE_ID_PREFIX!r} and {_B32_LEN} lowercase base32 characters: {text!r}"
            )
        try:
            key = base64.b32decode(body.upper() + "====", casefold=False)
        except ValueError as exc:
            raise ValueError(f"a node id is base32 (a-z, 2-7): {text!r}") from exc
        # Reject non-canonical spellings (non-zero pad bits) so each key has exactly one text.
        node_id = cls(key)
        if str(node_id) != text:
            raise ValueError(f"not the canonical spelling of a node id: {text!r}")
        return node_id


@dataclass(frozen=True)
class NodeKey:
    """A node's Ed25519 signing key and the id it gives the node."""

    signing_key: nacl.signing.SigningKey

    @property
    def node_id(self) -> NodeId:
        return NodeId(bytes(self.signing_key.verify_key))

    @classmethod
    def generate(cls) -> "NodeKey":
        """A fresh random key (from the OS's CSPRNG, via libsodium)."""
        return cls(nacl.signing.SigningKey.generate())

    def sign(self, message: bytes) -> bytes:
        """A detached 64-byte signature over `message`."""
        return self.signing_key.sign(message).signature

    def seed(self) -> bytes:
        """The 32-byte private seed; only for writing the key file."""
        return bytes(self.signing_key)


def verify(node_id: NodeId, message: bytes, signature: bytes) -> bool:
    """Whether `signature` is `node_id`'s signature over `message`."""
    try:
        nacl.signing.VerifyKey(node_id.key).verify(message, signature)
    except (nacl.exceptions.BadSignatureError, ValueError, TypeError):
        return False
    return True


def check_key_permissions(path: Path) -> None:
    """Refuse a key file that others can read or write, as ssh does, and name the fix."""
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise IdentityError(
            f"node key {path} is accessible by others (mode {mode:04o}); "
            f"fix it with `chmod 600 {path}` and start again"
        )


def load_key(path: Path) -> NodeKey:
    """Read a node key file, checking its permissions first."""
    try:
        check_key_permissions(path)
        raw = path.read_bytes()
    except FileNotFoundError as exc:
        raise IdentityError(f"no node key at {path}; create one with `hmnode init`") from exc
    except PermissionError as exc:
        raise IdentityError(f"cannot read node key {path}: {exc.strerror}") from exc
    if not raw.startswith(_KEY_FILE_HEADER):
        raise IdentityError(f"{path} is not an hmnode key file (unknown header)")
    body = raw[len(_KEY_FILE_HEADER) :].strip()
    try:
        seed = base64.b64decode(body, validate=True)
    except ValueError as exc:
        raise IdentityError(f"{path} is damaged: the key is not valid base64") from exc
    if len(seed) != _KEY_BYTES:
        raise IdentityError(f"{path} is damaged: the key is {len(seed)} bytes, not {_KEY_BYTES}")
    return NodeKey(nacl.signing.SigningKey(seed))


def write_key(path: Path, key: NodeKey) -> None:
    """Write a key file atomically with mode 0600; never replaces an existing key."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # O_CREAT's mode is filtered by the umask; this is not
        os.write(fd, _KEY_FILE_HEADER + base64.b64encode(key.seed()) + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        # link() fails if the key appeared meanwhile, so a key is never silently replaced.
        os.link(tmp, path)
    except FileExistsError as exc:
        raise IdentityError(f"a node key already exists at {path}; not replacing it") from exc
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def load_or_create_key(path: Path) -> tuple[NodeKey, bool]:
    """The key at `path`, created on first use; the flag says whether it was just created."""
    if path.exists():
        return load_key(path), False
    key = NodeKey.generate()
    write_key(path, key)
    return key, True
