"""A throw-away certificate for local https fakes.

Real clients (MSAL over requests, aiohttp, httplib2) refuse plain http or unknown CAs, so a fake
that should be talked to as the real service needs TLS with a certificate the test trusts.
The certificate is self-signed (it is its own CA) and valid for 127.0.0.1 and localhost.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

import certifi
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

CERT_VALID_DAYS = 2


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """PEM files of one self-signed certificate: ``cert_path`` doubles as the CA file."""

    cert_path: Path
    key_path: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert_path, self.key_path)
        return context


def make_self_signed(directory: Path, name: str = "fake") -> TlsFiles:
    """Writes ``<name>.crt`` / ``<name>.key`` for 127.0.0.1 and localhost into ``directory``.

    An EC key keeps generation instant, so every test module can afford its own certificate.
    """
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CERT_VALID_DAYS))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path = directory / f"{name}.crt"
    key_path = directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return TlsFiles(cert_path, key_path)


def combined_ca_bundle(extra: list[Path], target: Path) -> Path:
    """Writes the system CAs plus ``extra`` into ``target``: what ``SSL_CERT_FILE`` should name.

    The service reads one bundle from ``SSL_CERT_FILE`` / ``REQUESTS_CA_BUNDLE``; keeping the
    system CAs in it means pointing those variables at a fake breaks nothing else.
    """
    system = os.environ.get("SSL_CERT_FILE") or certifi.where()
    parts = [Path(system).read_text()] if Path(system).is_file() else []
    parts += [path.read_text() for path in extra]
    target.write_text("\n".join(parts))
    return target
