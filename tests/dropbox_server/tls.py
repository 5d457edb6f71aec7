"""Self-signed TLS certificate for the Dropbox test server (test infrastructure only).

One job: make (or reuse) a certificate valid for 127.0.0.1 / localhost, write it as PEM under
the server's root folder and build the server-side `ssl.SSLContext`. The certificate file doubles
as the CA bundle that clients are told to trust.
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

COMMON_NAME = "dropbox-test-server (TEST INFRASTRUCTURE, not Dropbox)"


def _still_valid(cert_path: Path, key_path: Path) -> bool:
    if not (cert_path.is_file() and key_path.is_file()):
        return False
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except ValueError:
        return False
    # Keep a margin so a long test session never sees the certificate expire under it.
    margin = _dt.datetime.now(_dt.timezone.utc) + _dt.timedelta(days=2)
    return cert.not_valid_after_utc > margin


def ensure_certificate(directory: Path) -> tuple[Path, Path]:
    """Return (cert_pem, key_pem) in `directory`, generating them when missing or stale.

    Reusing the pair across restarts lets a client that already trusts `cert.pem` (for example
    a subprocess started before the server restarted) keep working.
    """
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    if _still_valid(cert_path, key_path):
        return cert_path, key_path

    # EC P-256 keys generate in milliseconds, unlike RSA, which keeps server start fast.
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, COMMON_NAME),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "archive_dropbox test suite"),
    ])
    now = _dt.datetime.now(_dt.timezone.utc)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(days=1))
        .not_valid_after(now + _dt.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName([
            x509.IPAddress(ipaddress.IPv4Address("127.0.0.1")),
            x509.DNSName("localhost"),
        ]), critical=False)
        # The same certificate is both the trust anchor (CA bundle) and the server's leaf, so it
        # carries CA + serverAuth; the key identifiers keep strict X.509 verifiers happy.
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    key_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    key_path.chmod(0o600)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def server_context(cert_path: Path, key_path: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(cert_path), str(key_path))
    return context
