"""NATS identities: the JWTs we sign are what nats-server checks, and a credentials file that
cannot be one is refused with the problem named (never its secret)."""

import time
from pathlib import Path

import pytest

from deploy.authority import Authority
from fabric import credentials
from schemas import subjects
from schemas.permissions import ROLES, permissions


def test_a_tenants_credentials_say_who_it_is(tmp_path: Path) -> None:
    keys = Authority.create()
    path = tmp_path / "alice.creds"
    credentials.write_secret(path, keys.issue("tenant", "alice"))
    identity = credentials.read_creds(path)
    assert (identity.role, identity.tenant, identity.name) == ("tenant", "alice", "tenant:alice")
    assert path.stat().st_mode & 0o777 == 0o600
    claims = credentials.decode_jwt(path.read_text().split("\n")[1])
    own = keys.tenant_accounts["alice"]  # the tenant's own account, signed by its signing key
    assert claims["iss"] == credentials.public_key(own.signing_seeds[0]) != own.public
    assert claims["nats"]["issuer_account"] == own.public != keys.account


def test_a_tampered_jwt_is_refused(tmp_path: Path) -> None:
    keys = Authority.create()
    text = keys.issue("tenant", "alice")
    token = text.split("\n")[1]
    header, body, signature = token.split(".")
    forged_body = body[:-4] + ("AAAA" if body[-4:] != "AAAA" else "BBBB")
    with pytest.raises(credentials.CredentialsError, match="not a valid NATS JWT"):
        credentials.decode_jwt(f"{header}.{forged_body}.{signature}")


def test_bad_credentials_files_name_the_problem(tmp_path: Path) -> None:
    keys = Authority.create()
    alice, bob = keys.issue("tenant", "alice"), keys.issue("tenant", "bob")
    cases = {
        "missing": (None, "cannot read credentials file"),
        "garbage": ("hello", "not a NATS credentials file"),
        # alice's JWT with bob's seed: someone else's key
        "swapped": (
            alice.split("-----BEGIN USER NKEY SEED")[0]
            + "-----BEGIN USER NKEY SEED"
            + bob.split("-----BEGIN USER NKEY SEED")[1],
            "does not belong",
        ),
        "bad-seed": (alice.replace(alice.split("\n")[9], "SUAXXXX"), "malformed"),
    }
    for name, (text, expected) in cases.items():
        path = tmp_path / f"{name}.creds"
        if text is not None:
            path.write_text(text)
        with pytest.raises(credentials.CredentialsError, match=expected) as refused:
            credentials.read_creds(path)
        assert "SU" not in str(refused.value)  # no seed in any message


def test_expired_credentials_are_refused(tmp_path: Path) -> None:
    keys = Authority.create()
    seed = credentials.new_seed("user")
    jwt = credentials.user_jwt(
        keys.signing_seeds[0],
        keys.account,
        credentials.public_key(seed),
        "old",
        [],
        [],
        expires_at=int(time.time()) - 5,
    )
    path = tmp_path / "old.creds"
    path.write_text(credentials.creds_text(jwt, seed))
    with pytest.raises(credentials.CredentialsError, match="expired"):
        credentials.read_creds(path)


def test_revocation_names_only_that_tenants_users() -> None:
    keys = Authority.create()
    keys.issue("tenant", "alice")
    keys.issue("tenant", "alice")
    keys.issue("tenant", "bob")
    revoked = keys.revoke("tenant", "alice")
    assert len(revoked) == 2 and set(keys.tenant_accounts["alice"].revocations) == set(revoked)
    assert keys.revoke("tenant", "alice") == []  # already revoked
    claims = credentials.decode_jwt(keys.tenant_account_jwt("alice"))  # in alice's own account
    assert set(claims["nats"]["revocations"]) == set(revoked)
    assert "revocations" not in credentials.decode_jwt(keys.tenant_account_jwt("bob"))["nats"]
    assert [i.revoked for i in keys.tenants()["bob"]] == [False]


def test_a_tenant_may_publish_only_under_its_own_name() -> None:
    allowed = permissions("tenant", "alice")
    assert set(allowed.pub) == {"hetfaas.invoke.alice.*", "hetfaas.control.alice.*", "hetfaas.verify.alice"}
    assert allowed.sub == ("_INBOX.alice.>",)


def test_no_role_may_use_everything_and_only_nodes_state_their_own_beat() -> None:
    for role in ROLES:
        allowed = permissions(role, "x")
        assert ">" not in allowed.pub and ">" not in allowed.sub
        beats = [s for s in allowed.pub if s.startswith("hetfaas.heartbeat.")]
        assert beats == (["hetfaas.heartbeat.x"] if role in ("host", "dpu") else [])
        reaches_nodes = any(s.startswith("hetfaas.node.") for s in allowed.pub)
        assert reaches_nodes == (role == "scheduler")


def test_only_the_tenants_own_inbox_is_its_reply_subject() -> None:
    """Or a reply the server made for a request from the tenant's own account (`_R_.`)."""
    assert subjects.reply_is_the_tenants("hetfaas.invoke.alice.f", "_R_.un560P.IbOo7y")
    assert not subjects.reply_is_the_tenants("hetfaas.invoke.alice.f", "_R_.")
    assert not subjects.reply_is_the_tenants("hetfaas.invoke.alice.f", "_R_x.y")
    assert subjects.reply_is_the_tenants("hetfaas.invoke.alice.f", "_INBOX.alice.abc.1")
    assert not subjects.reply_is_the_tenants("hetfaas.invoke.alice.f", "_INBOX.bob.abc.1")
    assert not subjects.reply_is_the_tenants("hetfaas.invoke.alice.f", "_INBOX.alice-2.abc.1")
    assert not subjects.reply_is_the_tenants("hetfaas.invoke.alice.f", "_INBOX.alice.")
    assert not subjects.reply_is_the_tenants("hetfaas.invoke.alice.f", "")
    assert not subjects.reply_is_the_tenants("hetfaas.control.alice.deploy", "_HF.operator.operator.x.1")


def test_a_tenants_account_imports_only_its_own_subjects_from_hetfaas() -> None:
    keys = Authority.create()
    keys.issue("tenant", "alice")
    keys.issue("tenant", "bob")
    alice = credentials.decode_jwt(keys.tenant_account_jwt("alice"))["nats"]
    imported = {i["subject"] for i in alice["imports"]}
    assert imported == {"hetfaas.invoke.alice.*", "hetfaas.control.alice.*", "hetfaas.verify.alice"}
    for entry in alice["imports"]:
        token = credentials.decode_jwt(entry["token"])  # signature checked
        assert token["sub"] == keys.tenant_accounts["alice"].public, "valid for alice's account only"
        assert token["nats"]["subject"] == entry["subject"] and entry["account"] == keys.account
    assert alice["limits"]["conn"] == 64 and alice["limits"]["subs"] == 10_000
    exports = credentials.decode_jwt(keys.account_jwt())["nats"]["exports"]
    assert all(e["token_req"] and e["type"] == "service" for e in exports), "private: token required"
    assert set(keys.account_jwts()) == {
        keys.system_account,
        keys.account,
        keys.tenant_accounts["alice"].public,
        keys.tenant_accounts["bob"].public,
    }
