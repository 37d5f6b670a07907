"""A development certificate authority, made with the ``cryptography`` package.

``fed-certs init`` lays out a directory that turns TLS, mutual TLS and token authentication
on in one minute::

    DIR/ca.pem  ca.key                  the CA (keep ca.key off the coordinator in production)
    DIR/server.pem  server.key          the coordinator's certificate (SANs: --server-name/-ip)
    DIR/workers/NAME.pem  NAME.key      a worker's client certificate (common name = NAME)
    DIR/workers/NAME.token              its bearer token (the coordinator only keeps the hash)
    DIR/enrolled.json                   enrolled workers for ``fed-server --enrolled``
    DIR/workers/NAME.signing.pem        its Ed25519 signing key (signed secure aggregation)
    DIR/roster.json                     every silo's signing-key fingerprint, for the silos
                                        (``fed-worker --roster``; see fedcore.secagg.identity)

Keys are ECDSA P-256. This is a *development* CA: for production, have your PKI issue the
certificates; the coordinator only needs them as PEM files.
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedcore.atomic import write_atomically
from fedcore.errors import ConfigError

__all__ = ["CertificateAuthority", "Issued", "fingerprint_of_pem"]

_VALIDITY = datetime.timedelta(days=825)


class Issued:
    """A certificate and its private key, as PEM bytes."""

    def __init__(self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        self.cert = cert
        self.key = key

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the certificate's DER encoding, hex (what enrollment pins)."""
        return self.cert.fingerprint(hashes.SHA256()).hex()

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def write(self, cert_path: Path, key_path: Path) -> None:
        write_atomically(cert_path, self.cert_pem, mode=0o644)
        write_atomically(key_path, self.key_pem, mode=0o600)


def fingerprint_of_pem(pem: bytes) -> str:
    """SHA-256 (hex) of the DER encoding of a PEM certificate; :class:`ConfigError` if it is
    not one."""
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise ConfigError(f"not a PEM certificate: {exc}") from None
    return cert.fingerprint(hashes.SHA256()).hex()


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedcore development CA"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


class CertificateAuthority:
    """Issues server and worker certificates."""

    def __init__(self, issued: Issued) -> None:
        self.issued = issued

    @classmethod
    def create(cls, common_name: str = "fedcore dev CA") -> CertificateAuthority:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(_name(common_name))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + _VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        return cls(Issued(cert, key))

    @classmethod
    def load(cls, cert_path: Path, key_path: Path) -> CertificateAuthority:
        try:
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"cannot load the CA from {cert_path} and {key_path}: {exc}; "
                "create one with `fed-certs init`"
            ) from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigError(f"{key_path} is not an ECDSA key made by fed-certs")
        return cls(Issued(cert, key))

    def _issue(
        self,
        common_name: str,
        sans: list[x509.GeneralName],
        usage: x509.ObjectIdentifier,
    ) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        ca_cert = self.issued.cert
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + _VALIDITY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.issued.key.public_key()),
                critical=False,
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return Issued(builder.sign(self.issued.key, hashes.SHA256()), key)

    def issue_server(self, names: list[str], ips: list[str]) -> Issued:
        """A coordinator certificate valid for these DNS names and IP addresses."""
        if not names and not ips:
            raise ConfigError(
                "a server certificate needs at least one --server-name or --server-ip"
            )
        sans: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
        try:
            sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        except ValueError as exc:
            raise ConfigError(f"--server-ip: {exc}") from None
        return self._issue(names[0] if names else ips[0], sans, ExtendedKeyUsageOID.SERVER_AUTH)

    def issue_worker(self, name: str) -> Issued:
        """A worker's client certificate; its common name is the worker's identity."""
        return self._issue(name, [], ExtendedKeyUsageOID.CLIENT_AUTH)
