"""etcd identities and the cluster's TLS files, as pure logic: each role's grants, the login file
and its errors (never the password), the CA kept across restarts, and signing-key rotation."""

import datetime
from pathlib import Path

import pytest
from cryptography import x509

from deploy import etcd_auth, tls
from deploy.authority import Authority
from fabric import credentials
from schemas import keys
from schemas.permissions import ROLES, KeyGrant, etcd_grants


def writable(grants: tuple[KeyGrant, ...], key: str) -> bool:
    return any(g.write and (key == g.key or (g.prefix and key.startswith(g.key))) for g in grants)


def test_a_node_writes_only_its_own_registration() -> None:
    grants = etcd_grants("host", "host-1")
    assert writable(grants, keys.node("host-1"))
    for key in (
        keys.node("host-10"),  # a prefix of its name is not its key
        keys.node("host-2"),
        keys.function("alice", "f"),
        keys.tenant("alice"),
        keys.revoked("d"),
        keys.scheduler("s"),
    ):
        assert not writable(grants, key), key
    assert all(not g.prefix for g in grants if g.write)


def test_only_schedulers_write_what_tenants_change_and_nobody_else_reaches_etcd() -> None:
    scheduler = etcd_grants("scheduler", "scheduler-0")
    for key in (keys.function("a", "f"), keys.program("d", "a", "f"), keys.tenant("a"), keys.revoked("d")):
        assert writable(scheduler, key)
    assert not writable(scheduler, keys.node("host-1")) and not writable(scheduler, keys.scheduler("s-1"))
    assert {role for role in ROLES if not etcd_grants(role, "x")} == {"tenant", "verifier", "operator"}


def test_range_end_covers_exactly_the_prefix() -> None:
    end = etcd_auth.range_end(keys.PROGRAMS)
    assert keys.PROGRAMS + "\xff" < end and keys.PROGRAMS < end and "/hetfaas/programs0" >= end


def test_an_etcd_login_file_names_its_problem_never_its_password(tmp_path: Path) -> None:
    login = etcd_auth.new_login("host.host-1")
    assert len(login.password) >= 43 and login.password not in repr(login)
    path = tmp_path / "host.etcd"
    credentials.write_secret(path, credentials.etcd_login_text(login))
    assert credentials.read_etcd_login(path) == login
    for text, problem in (("no-colon", "not an etcd credentials file"), ("a:b\nc:d", "one line")):
        path.write_text(text)
        with pytest.raises(credentials.CredentialsError, match=problem):
            credentials.read_etcd_login(path)
    with pytest.raises(credentials.CredentialsError, match="cannot read etcd credentials file") as missing:
        credentials.read_etcd_login(tmp_path / "gone.etcd")
    assert login.password not in str(missing.value)


def test_the_ca_is_kept_and_the_certificate_follows_the_addresses(tmp_path: Path) -> None:
    first = tls.ensure(tmp_path, ["127.0.0.1"])
    ca_pem, cert_pem = Path(first.ca).read_bytes(), Path(first.cert).read_bytes()
    assert Path(first.key).stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "ca.key").stat().st_mode & 0o777 == 0o600
    again = tls.ensure(tmp_path, ["127.0.0.1"])
    assert Path(again.cert).read_bytes() == cert_pem, "a certificate that covers the addresses is kept"

    moved = tls.ensure(tmp_path, ["10.9.0.1"])
    assert Path(moved.ca).read_bytes() == ca_pem, "clients keep trusting the same CA"
    cert = x509.load_pem_x509_certificate(Path(moved.cert).read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "10.9.0.1" in {str(ip) for ip in names.get_values_for_type(x509.IPAddress)}
    ca = x509.load_pem_x509_certificate(ca_pem)
    cert.verify_directly_issued_by(ca)
    assert cert.not_valid_after_utc > datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=365)


def test_rotation_signs_with_the_new_key_and_retiring_keeps_only_it(tmp_path: Path) -> None:
    authority = Authority.create()
    old = authority.signing_keys[0]
    new = authority.add_signing_key()
    assert authority.signing_keys == [new, old]
    path = tmp_path / "alice.creds"
    credentials.write_secret(path, authority.issue("tenant", "alice"))
    claims = credentials.decode_jwt(path.read_text().split("\n")[1])
    tenant_keys = [credentials.public_key(seed) for seed in authority.tenant_accounts["alice"].signing_seeds]
    assert claims["iss"] == tenant_keys[0] and len(tenant_keys) == 1
    operator = authority.issue("operator", "op").split("\n")[1]
    assert credentials.decode_jwt(operator)["iss"] == new
    assert old in credentials.decode_jwt(authority.account_jwt())["nats"]["signing_keys"]
    authority.add_signing_key()
    assert len(authority.tenant_accounts["alice"].signing_seeds) == 2, "every account's key rotates"
    newest = authority.signing_keys[0]
    assert authority.retire_signing_keys() == [new, old]
    assert credentials.decode_jwt(authority.account_jwt())["nats"]["signing_keys"] == [newest]
    assert len(authority.tenant_accounts["alice"].signing_seeds) == 1
    assert authority.retire_signing_keys() == []
