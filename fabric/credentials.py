"""NATS identities the NATS way: nkeys, and the operator, account and user JWTs that nats-server's
decentralized auth checks (docs/architecture.md §8).

The chain is operator → account → user. nats-server trusts the operator's JWT (its config names
it); an account JWT is signed by the operator; a user JWT is signed by one of its account's
signing keys and carries that user's permissions and limits. A user proves its identity with the
`.creds` file's nkey seed (the server sends a nonce, the client signs it). The JWTs are standard
(`nsc describe` reads them); only their encoding lives here, built on the `nkeys` library.
"""

import base64
import dataclasses
import hashlib
import os
import re
import secrets
import time
from pathlib import Path
from typing import Any, Literal

import msgspec
import nkeys
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

KeyKind = Literal["operator", "account", "user"]
_PREFIX = {
    "operator": nkeys.PREFIX_BYTE_OPERATOR,
    "account": nkeys.PREFIX_BYTE_ACCOUNT,
    "user": nkeys.PREFIX_BYTE_USER,
}
_HEADER = base64.urlsafe_b64encode(b'{"typ":"JWT","alg":"ed25519-nkey"}').rstrip(b"=").decode()
_CREDS_JWT = re.compile(r"-{3,}BEGIN NATS USER JWT-{3,}\s*\n\s*(\S+)\s*\n\s*-{3,}END NATS USER JWT-{3,}")
_CREDS_SEED = re.compile(r"-{3,}BEGIN USER NKEY SEED-{3,}\s*\n\s*(\S+)\s*\n\s*-{3,}END USER NKEY SEED-{3,}")
UNLIMITED = -1


class CredentialsError(ValueError):
    """A credentials file that cannot be used; the message names the problem, never the secret."""


def new_seed(kind: KeyKind) -> str:
    """A fresh nkey seed (`SO...`, `SA...` or `SU...`)."""
    return nkeys.encode_seed(secrets.token_bytes(32), _PREFIX[kind]).decode()


def public_key(seed: str) -> str:
    """The public key (`O...`, `A...`, `U...`) of a seed."""
    return nkeys.from_seed(seed.encode()).public_key.decode()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def encode_jwt(claims: dict[str, Any], issuer_seed: str) -> str:
    """Sign `claims` (iss and iat filled in, jti the claims' hash as nsc makes it)."""
    claims = {**claims, "iss": public_key(issuer_seed), "iat": claims.get("iat") or int(time.time())}
    claims["jti"] = ""
    digest = hashlib.sha512(msgspec.json.encode(claims)).digest()[:32]
    claims["jti"] = base64.b32encode(digest).decode().rstrip("=")
    signing_input = f"{_HEADER}.{_b64(msgspec.json.encode(claims))}"
    signature = nkeys.from_seed(issuer_seed.encode()).sign(signing_input.encode())
    return f"{signing_input}.{_b64(signature)}"


def _raw_public_key(public: str) -> bytes:
    """The 32 key bytes of a public nkey (base32 of a prefix byte, the key, a CRC-16)."""
    raw = base64.b32decode(public + "=" * (-len(public) % 8))
    if len(raw) != 35 or nkeys.crc16_checksum(raw[:-2]) != raw[-2:]:
        raise ValueError("not a public nkey")
    return raw[1:-2]


def decode_jwt(token: str) -> dict[str, Any]:
    """The claims of a JWT, after checking its signature against its issuer (the `iss` claim);
    whether that issuer is trusted is the caller's question."""
    try:
        header, body, signature = token.split(".")
        claims = msgspec.json.decode(_unb64(body))
        issuer = Ed25519PublicKey.from_public_bytes(_raw_public_key(claims["iss"]))
        issuer.verify(_unb64(signature), f"{header}.{body}".encode())
    except (ValueError, KeyError, TypeError, msgspec.DecodeError, InvalidSignature) as exc:
        raise CredentialsError(f"not a valid NATS JWT ({type(exc).__name__})") from None
    if not isinstance(claims, dict):
        raise CredentialsError("not a valid NATS JWT (claims are not an object)")
    return claims


def operator_jwt(operator_seed: str, name: str, system_account: str) -> str:
    claims = {
        "sub": public_key(operator_seed),
        "name": name,
        "nats": {"type": "operator", "version": 2, "system_account": system_account},
    }
    return encode_jwt(claims, operator_seed)


def account_jwt(
    operator_seed: str,
    account: str,
    name: str,
    signing_keys: list[str],
    revocations: dict[str, int] | None = None,
    jetstream: bool = False,
    max_connections: int = UNLIMITED,
    exports: list[dict[str, Any]] | None = None,
    imports: list[dict[str, Any]] | None = None,
    user_limits: "UserLimits | None" = None,
) -> str:
    """An account's JWT. Users issued by `signing_keys` belong to it; `revocations` maps a user's
    public key to a time: its JWTs issued at or before then no longer connect, and its open
    connections are closed when the server hears of it. `exports`/`imports`: the subjects it
    offers other accounts and takes from them (`service_export`, `service_import`);
    `max_connections` and `user_limits` bound the whole account (all its users together)."""
    bounds = user_limits or UserLimits()
    limits: dict[str, Any] = {
        "subs": bounds.subs,
        "data": bounds.data,
        "payload": bounds.payload,
        "imports": UNLIMITED,
        "exports": UNLIMITED,
        "wildcards": True,
        "conn": max_connections,
        "leaf": 0,
    }
    if jetstream:
        limits |= {
            "mem_storage": UNLIMITED,
            "disk_storage": UNLIMITED,
            "streams": UNLIMITED,
            "consumer": UNLIMITED,
        }
    nats_claims: dict[str, Any] = {
        "type": "account",
        "version": 2,
        "limits": limits,
        "signing_keys": signing_keys,
        "default_permissions": {"pub": {}, "sub": {}},
    }
    if revocations:
        nats_claims["revocations"] = revocations
    if exports:
        nats_claims["exports"] = exports
    if imports:
        nats_claims["imports"] = imports
    return encode_jwt({"sub": account, "name": name, "nats": nats_claims}, operator_seed)


def service_export(subject: str, response_threshold_s: float) -> dict[str, Any]:
    """A private service export: only accounts holding an activation token for (a part of)
    `subject` may import it. A request crossing it is answered once (`Singleton`), within
    `response_threshold_s` (the server forgets the way back after that)."""
    return {
        "name": subject,
        "subject": subject,
        "type": "service",
        "token_req": True,
        "response_type": "Singleton",
        "response_threshold": int(response_threshold_s * 1e9),
    }


def activation_jwt(signing_seed: str, exporter: str, importer: str, subject: str) -> str:
    """The exporting account's permission for account `importer` to import `subject`, signed by
    one of the exporter's signing keys."""
    claims = {
        "sub": importer,
        "name": subject,
        "nats": {
            "type": "activation",
            "version": 2,
            "subject": subject,
            "kind": "service",
            "issuer_account": exporter,
        },
    }
    return encode_jwt(claims, signing_seed)


def service_import(exporter: str, subject: str, token: str) -> dict[str, Any]:
    """Take `subject` from account `exporter` as a service (requests go there, replies come back
    to the importer's own reply subject), with the exporter's activation `token`."""
    return {"name": subject, "subject": subject, "account": exporter, "token": token, "type": "service"}


class UserLimits(msgspec.Struct, frozen=True, kw_only=True):
    """What one connection of a user may hold on the server (-1: no limit)."""

    subs: int = UNLIMITED
    payload: int = UNLIMITED  # bytes per message
    data: int = UNLIMITED  # bytes in flight


def user_jwt(
    signing_seed: str,
    account: str,
    user: str,
    name: str,
    pub_allow: list[str],
    sub_allow: list[str],
    limits: UserLimits | None = None,
    tags: list[str] | None = None,
    expires_at: int = 0,
) -> str:
    """A user's JWT, signed by one of `account`'s signing keys: it may publish and subscribe only
    to what the allow lists name (everything else is denied by the server)."""
    nats_claims: dict[str, Any] = {
        "type": "user",
        "version": 2,
        "pub": {"allow": pub_allow},
        "sub": {"allow": sub_allow},
        "subs": (limits := limits or UserLimits()).subs,
        "data": limits.data,
        "payload": limits.payload,
        "tags": tags or [],
    }
    if public_key(signing_seed) != account:  # signed by a signing key: name whose it is
        nats_claims["issuer_account"] = account
    claims: dict[str, Any] = {"sub": user, "name": name, "nats": nats_claims}
    if expires_at:
        claims["exp"] = expires_at
    return encode_jwt(claims, signing_seed)


def creds_text(jwt: str, seed: str) -> str:
    """The `.creds` file format that nats-py (`user_credentials=`) and the `nats` CLI read."""
    return (
        "-----BEGIN NATS USER JWT-----\n"
        f"{jwt}\n"
        "------END NATS USER JWT------\n\n"
        "************************* IMPORTANT *************************\n"
        "NKEY Seed printed below can be used to sign and prove identity.\n"
        "NKEYs are sensitive and should be treated as secrets.\n\n"
        "-----BEGIN USER NKEY SEED-----\n"
        f"{seed}\n"
        "------END USER NKEY SEED------\n\n"
        "*************************************************************\n"
    )


def write_secret(path: Path, text: str) -> None:
    """Write a file only its owner can read (0600), atomically: never a moment world-readable."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    tmp.replace(path)


class Identity(msgspec.Struct, frozen=True, kw_only=True):
    """Who a credentials file says its holder is (from its user JWT's tags)."""

    name: str
    role: str
    tenant: str = ""  # for a tenant's credentials
    user: str = ""  # the user's public key
    expires_at: int = 0


def read_creds(path: str | Path) -> Identity:
    """The identity in a `.creds` file, with a clear error for a file that cannot be one: missing,
    unreadable, without a JWT or seed, a JWT not signed as it claims, a seed of another user, or
    expired. (Whether the server trusts it, only the server says.)"""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise CredentialsError(f"cannot read credentials file {path}: {exc.strerror}") from None
    jwt_match, seed_match = _CREDS_JWT.search(text), _CREDS_SEED.search(text)
    if not jwt_match or not seed_match:
        raise CredentialsError(f"{path} is not a NATS credentials file (no user JWT and nkey seed in it)")
    claims = decode_jwt(jwt_match.group(1))
    try:
        seed_user = public_key(seed_match.group(1))
    except (nkeys.NkeysError, ValueError, TypeError):
        raise CredentialsError(f"{path}: its nkey seed is malformed") from None
    if claims.get("sub") != seed_user:
        raise CredentialsError(f"{path}: its nkey seed does not belong to its JWT's user")
    expires_at = int(claims.get("exp") or 0)
    if expires_at and expires_at <= time.time():
        raise CredentialsError(f"{path}: the credentials expired at {time.ctime(expires_at)}")
    tags = dict(tag.partition(":")[::2] for tag in claims.get("nats", {}).get("tags", []))
    return Identity(
        name=str(claims.get("name", "")),
        role=tags.get("hetfaas-role", ""),
        tenant=tags.get("hetfaas-tenant", ""),
        user=seed_user,
        expires_at=expires_at,
    )


@dataclasses.dataclass(frozen=True)
class EtcdLogin:
    """An etcd user and its password (never in a repr, so never in a log line)."""

    user: str
    password: str = dataclasses.field(repr=False)


def etcd_login_text(login: EtcdLogin) -> str:
    """The file form: `user:password`, as etcdctl's `--user` takes it."""
    return f"{login.user}:{login.password}\n"


def read_etcd_login(path: str | Path) -> EtcdLogin:
    """The etcd login in a file written by `etcd_login_text`, with a clear error naming the
    problem (and never the password)."""
    try:
        text = Path(path).read_text().strip()
    except OSError as exc:
        raise CredentialsError(f"cannot read etcd credentials file {path}: {exc.strerror}") from None
    user, colon, password = text.partition(":")
    if not colon or not user or not password or "\n" in text:
        raise CredentialsError(f"{path} is not an etcd credentials file (one line, user:password)")
    return EtcdLogin(user, password)
