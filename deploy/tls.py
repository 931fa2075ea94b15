"""The local cluster's TLS: a CA of its own and one server certificate for nats-server and etcd.

Created by `hetfaas up --tls` in `<state>/secrets/tls/` (keys 0600) and kept: a restarted cluster
keeps its CA, so the CA file given to clients stays valid. Clients trust exactly this CA
(`nats_ca`, `etcd_ca` in their settings and in `cluster.json`).
"""

import datetime
import ipaddress
from pathlib import Path

import msgspec
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fabric import credentials

CA_DAYS = 3650
SERVER_DAYS = 825  # the longest a server certificate may live for browsers and most TLS stacks


class TlsFiles(msgspec.Struct, frozen=True):
    ca: str  # the CA's certificate (PEM): what clients trust
    cert: str  # the servers' certificate (PEM)
    key: str  # its private key (PEM, 0600)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "hetfaas"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _nameless(unit: str) -> x509.Name:
    """A subject without a CommonName: etcd would take a client certificate's CN for a user
    name, and its JSON gateway refuses clients whose certificate has one (CVE-2018-16886), so
    a planned cluster's certificates (clients' and etcd members') carry none."""
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "hetfaas"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit),
        ]
    )


def key_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def _cert_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _validity(builder: x509.CertificateBuilder, days: int) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return builder.not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(
        now + datetime.timedelta(days=days)
    )


def _new_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name("hetfaas cluster CA")
    builder = x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
    cert = (
        _validity(builder.serial_number(x509.random_serial_number()), CA_DAYS)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(key, hashes.SHA256())
    )
    credentials.write_secret(directory / "ca.key", key_pem(key))
    (directory / "ca.pem").write_text(_cert_pem(cert))
    return cert, key


def _load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
    key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey), "the cluster CA's key is an EC key"
    return cert, key


def _sans(hosts: list[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = [x509.DNSName("localhost")]
    for host in dict.fromkeys([*hosts, "127.0.0.1"]):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def _covers(cert_path: Path, hosts: list[str]) -> bool:
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, x509.ExtensionNotFound):
        return False
    expires = cert.not_valid_after_utc
    return set(_sans(hosts)) <= set(names) and expires > datetime.datetime.now(datetime.UTC)


def ensure(directory: Path, hosts: list[str]) -> TlsFiles:
    """The cluster's CA (made once) and a server certificate for `hosts` (addresses or names the
    servers are reached by), made again when the one kept does not cover them or has expired."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    files = TlsFiles(
        ca=str(directory / "ca.pem"), cert=str(directory / "server.pem"), key=str(directory / "server.key")
    )
    ca = load_or_create_ca(directory)
    if not _covers(Path(files.cert), hosts):
        issue(ca, hosts, Path(files.cert), Path(files.key))
    return files


def load_or_create_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    return _load_ca(directory) if (directory / "ca.key").exists() else _new_ca(directory)


def issue(
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    hosts: list[str],
    cert_path: Path,
    key_path: Path,
    unit: str = "",
    client: bool = False,
) -> None:
    """A certificate for `hosts` signed by `ca`, written to `cert_path` and `key_path` (0600).
    `client`: it also authenticates as a client (a machine's certificate in a planned cluster
    serves NATS and etcd and is the machine's client identity towards etcd and NATS routes).
    `unit`: a subject naming that unit and no CommonName (`_nameless`); "": the servers' name."""
    ca_cert, ca_key = ca
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(_nameless(unit) if unit else _name("hetfaas servers"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
    )
    usages = [x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]
    if client:
        usages.append(x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH)
    cert = (
        _validity(builder, SERVER_DAYS)
        .add_extension(x509.SubjectAlternativeName(_sans(hosts)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    credentials.write_secret(key_path, key_pem(key))
    cert_path.write_text(_cert_pem(cert))


def covers(cert_path: Path, hosts: list[str]) -> bool:
    """Whether the certificate kept there names every one of `hosts` and has not expired."""
    return _covers(cert_path, hosts)
