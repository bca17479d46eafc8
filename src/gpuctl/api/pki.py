"""gpuctld's own certificate authority: a server certificate for a lab or a site without one,
and node certificates for agents that joined with a one-time token (as kubelets bootstrap
TLS). All x509 work is the `cryptography` package's; nothing here does crypto by hand."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

NODE_CN_PREFIX = "system:node:"  # as Kubernetes names its kubelets
CA_DAYS = 10 * 365
SERVER_DAYS = 365
NODE_DAYS = 365
_SKEW = timedelta(minutes=5)  # a node whose clock runs a little behind still accepts its cert


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def write_private(path: Path, data: bytes) -> None:
    """Write a key (or anything secret), created 0600 whatever the umask."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


@dataclass(frozen=True, slots=True)
class ServerCredentials:
    cert_pem: bytes
    key_pem: bytes


class Authority:
    """The CA in `directory` (created on first use: ca.key 0600, ca.crt)."""

    def __init__(self, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
        self._key = key
        self.cert = cert
        self.cert_pem = cert.public_bytes(serialization.Encoding.PEM)

    @classmethod
    def load_or_create(cls, directory: Path, *, now: datetime | None = None) -> Authority:
        now = now or datetime.now(UTC)
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        key_path, cert_path = directory / "ca.key", directory / "ca.crt"
        if key_path.exists() and cert_path.exists():
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            assert isinstance(key, ec.EllipticCurvePrivateKey)
            return cls(key, x509.load_pem_x509_certificate(cert_path.read_bytes()))
        key = _key()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gpuctld CA")])
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _SKEW)
            .not_valid_after(now + timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(key, hashes.SHA256())
        )
        write_private(key_path, _key_pem(key))
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return cls(key, cert)

    def _issue(
        self,
        subject: str,
        public_key,
        *,
        usage: x509.ObjectIdentifier,
        sans: Sequence[str],
        days: int,
        now: datetime,
    ) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _SKEW)
            .not_valid_after(now + timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if sans:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([_san(n) for n in sans]), critical=False
            )
        return builder.sign(self._key, hashes.SHA256())

    def server_credentials(
        self, directory: Path, names: Sequence[str], *, now: datetime | None = None
    ) -> ServerCredentials:
        """gpuctld's own server certificate for `names`, issued again when the names change
        or it has less than a month to live."""
        now = now or datetime.now(UTC)
        key_path, cert_path = directory / "server.key", directory / "server.crt"
        if key_path.exists() and cert_path.exists():
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            try:
                have = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
                current = {str(v.value) for v in have.value}
            except x509.ExtensionNotFound:
                current = set()
            fresh = cert.not_valid_after_utc - now > timedelta(days=30)
            if fresh and current == {str(_san(n).value) for n in names}:
                return ServerCredentials(cert_path.read_bytes(), key_path.read_bytes())
        key = _key()
        cert = self._issue(
            names[0] if names else "gpuctld",
            key.public_key(),
            usage=ExtendedKeyUsageOID.SERVER_AUTH,
            sans=names,
            days=SERVER_DAYS,
            now=now,
        )
        write_private(key_path, _key_pem(key))
        cert_pem = cert.public_bytes(serialization.Encoding.PEM)
        cert_path.write_bytes(cert_pem)
        return ServerCredentials(cert_pem, _key_pem(key))

    def issue_node(
        self, node: str, csr_pem: bytes, *, now: datetime | None = None
    ) -> tuple[bytes, str]:
        """A client certificate naming `node` for the key in `csr_pem` (whatever subject the
        request asks for: the join token, not the request, says which node it is), and its
        serial in hex. Raises ValueError for a request that is not a valid signed CSR."""
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError as e:
            raise ValueError(f"not a PEM certificate signing request: {e}") from None
        if not csr.is_signature_valid:
            raise ValueError("the request's signature does not match its key")
        if not isinstance(csr.public_key(), ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
            raise ValueError("the request's key must be EC or RSA")
        cert = self._issue(
            NODE_CN_PREFIX + node,
            csr.public_key(),
            usage=ExtendedKeyUsageOID.CLIENT_AUTH,
            sans=(),
            days=NODE_DAYS,
            now=now or datetime.now(UTC),
        )
        return cert.public_bytes(serialization.Encoding.PEM), format(cert.serial_number, "x")


def node_key_and_csr(node: str) -> tuple[bytes, bytes]:
    """An agent's new private key (PEM) and a signing request for it."""
    key = _key()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, NODE_CN_PREFIX + node)]))
        .sign(key, hashes.SHA256())
    )
    return _key_pem(key), csr.public_bytes(serialization.Encoding.PEM)


def node_of_certificate(cert_pem: bytes) -> tuple[str, str] | None:
    """(node name, serial in hex) of a node certificate; None for any other certificate."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names:
        return None
    cn = str(names[0].value)
    if not cn.startswith(NODE_CN_PREFIX):
        return None
    return cn.removeprefix(NODE_CN_PREFIX), format(cert.serial_number, "x")
