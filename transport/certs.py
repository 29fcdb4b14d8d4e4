"""Self-signed X.509 certificates over a node's Ed25519 key, and the node id inside a peer's.

As in libp2p's TLS spec, the certificate carries no trust of its own: the key is the identity,
and a peer is who its certificate's key says, once TLS has proven it holds that key.
"""

from __future__ import annotations

import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import NameOID

from hmnode.errors import HmnodeError
from hmnode.identity import NodeId, NodeKey

# Validity is not what a peer is trusted for, but TLS stacks expect a window; make it wide.
_VALIDITY = datetime.timedelta(days=3650)


class PeerAuthenticationError(HmnodeError):
    """A peer is not who it must be: wrong key, no certificate, or a bad signature."""


def private_key(key: NodeKey) -> ed25519.Ed25519PrivateKey:
    """The node key as a `cryptography` key, for TLS."""
    return ed25519.Ed25519PrivateKey.from_private_bytes(key.seed())


def make_certificate(key: NodeKey, now: datetime.datetime | None = None,
                     serial: int | None = None) -> x509.Certificate:
    """A self-signed certificate whose subject is the node id and whose key is the node key.

    `now` (default: the wall clock) anchors the validity window and `serial` (default: a random
    one) is the serial number; a caller that needs reproducible certificate bytes gives both.
    """
    now = now or datetime.datetime.now(datetime.timezone.utc)
    signing_key = private_key(key)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(key.node_id))])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(signing_key.public_key())
        .serial_number(x509.random_serial_number() if serial is None else serial)
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + _VALIDITY)
        .sign(signing_key, algorithm=None)
    )


def node_id_of(certificate: x509.Certificate | None) -> NodeId:
    """The node id a peer's certificate speaks for; raises PeerAuthenticationError if none."""
    if certificate is None:
        raise PeerAuthenticationError("the peer presented no certificate")
    public_key = certificate.public_key()
    if not isinstance(public_key, ed25519.Ed25519PublicKey):
        raise PeerAuthenticationError("the peer's certificate key is not Ed25519")
    try:
        public_key.verify(certificate.signature, certificate.tbs_certificate_bytes)
    except InvalidSignature:
        raise PeerAuthenticationError("the peer's certificate is not self-signed by its key") from None
    return NodeId(public_key.public_bytes(Encoding.Raw, PublicFormat.Raw))
