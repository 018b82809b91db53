"""A throwaway CA, a server certificate for the swarm lab's manager, and client certificates (tests only)."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


def _cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: tuple[str, ec.EllipticCurvePrivateKey] | None,
          *, ca: bool = False, server_ip: str | None = None) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    issuer_name, issuer_key = issuer if issuer is not None else (subject, key)
    b = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer_name))
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if server_ip is not None:
        b = (b.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(server_ip))]),
                             critical=False)
             .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False))
    elif not ca:
        b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def make_tls_files(directory: Path, server_ip: str) -> None:
    """Write PEM files into ``directory``: ``ca``, the manager's ``server-cert``/``server-key`` (for
    ``server_ip``), a good ``client-cert``/``client-key``, and ``other-ca`` with the client pair it signed
    (``other-client-cert``/``other-client-key``, which the manager must refuse)."""
    directory.mkdir(parents=True, exist_ok=True)
    for ca_name, prefix in (("hotbox lab CA", ""), ("another CA", "other-")):
        ca_key = ec.generate_private_key(ec.SECP256R1())
        (directory / f"{prefix}ca.pem").write_bytes(
            _cert(ca_name, ca_key, None, ca=True).public_bytes(serialization.Encoding.PEM))
        pairs = [("client", None)] + ([("server", server_ip)] if not prefix else [])
        for role, ip in pairs:
            key = ec.generate_private_key(ec.SECP256R1())
            cert = _cert(f"hotbox lab {role}", key, (ca_name, ca_key), server_ip=ip)
            (directory / f"{prefix}{role}-cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
            _write_key(directory / f"{prefix}{role}-key.pem", key)
