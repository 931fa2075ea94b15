"""The cluster's NATS authority: the operator and account keys that issue every identity, kept by
the operator (`hetfaas up` writes it to the state directory, mode 0600; docs/architecture.md §8).

One account, HETFAAS, holds every user, so that requests and replies flow between tenants and
services; what separates them is each user's permissions (`schemas.permissions`), which the
server enforces. Users are signed by the account's signing key, never by its identity key, so
the signing key can be replaced without re-creating the account. A second account, SYS, is the
server's system account: the operator pushes account updates (revocations) through it, as
`nsc push` does.
"""

import ssl
import time
from pathlib import Path

import msgspec
import nats
import nats.errors

from fabric import credentials
from schemas.permissions import Role, permissions

AUTHORITY_FILE = "authority.json"
SYSTEM_CREDS = "sys.creds"
CLAIMS_UPDATE = "$SYS.REQ.CLAIMS.UPDATE"  # where nats-server takes a newer account JWT
ACCOUNT = "HETFAAS"
# Bus limits of one tenant connection: a client cannot hold more subscriptions than a busy
# CLI or SDK needs, nor send a message larger than an invocation may be (the scheduler's
# max_payload_bytes is smaller still and answers with a clear error).
TENANT_LIMITS = credentials.UserLimits(subs=1_000, payload=8 * 1024 * 1024, data=64 * 1024 * 1024)


class Issued(msgspec.Struct, kw_only=True):
    """A user the authority issued (public key only: the seed went into its creds file)."""

    user: str
    role: Role
    name: str
    issued_at: int
    revoked: bool = False


class Authority(msgspec.Struct, kw_only=True):
    operator_seed: str
    account_seed: str
    signing_seeds: list[str]  # the first signs new users; the others still verify old ones
    system_seed: str
    system_user_seed: str
    issued: list[Issued] = []
    revocations: dict[str, int] = {}

    @classmethod
    def create(cls) -> "Authority":
        return cls(
            operator_seed=credentials.new_seed("operator"),
            account_seed=credentials.new_seed("account"),
            signing_seeds=[credentials.new_seed("account")],
            system_seed=credentials.new_seed("account"),
            system_user_seed=credentials.new_seed("user"),
        )

    @property
    def account(self) -> str:
        return credentials.public_key(self.account_seed)

    @property
    def system_account(self) -> str:
        return credentials.public_key(self.system_seed)

    def operator_jwt(self) -> str:
        return credentials.operator_jwt(self.operator_seed, "hetfaas", self.system_account)

    def account_jwt(self) -> str:
        signing = [credentials.public_key(seed) for seed in self.signing_seeds]
        return credentials.account_jwt(
            self.operator_seed, self.account, ACCOUNT, signing, self.revocations, jetstream=True
        )

    def system_account_jwt(self) -> str:
        return credentials.account_jwt(self.operator_seed, self.system_account, "SYS", [])

    def system_creds(self) -> str:
        """The system account's user (pushes account updates to the servers)."""
        user = credentials.public_key(self.system_user_seed)
        jwt = credentials.user_jwt(
            self.system_seed, self.system_account, user, "sys", pub_allow=[">"], sub_allow=[">"]
        )
        return credentials.creds_text(jwt, self.system_user_seed)

    def issue(self, role: Role, name: str) -> str:
        """New credentials (the text of a `.creds` file) for `name` in `role`."""
        seed = credentials.new_seed("user")
        user = credentials.public_key(seed)
        allowed = permissions(role, name)
        tags = [f"hetfaas-role:{role}"] + ([f"hetfaas-tenant:{name}"] if role == "tenant" else [])
        limits = TENANT_LIMITS if role == "tenant" else credentials.UserLimits()
        jwt = credentials.user_jwt(
            self.signing_seeds[0],
            self.account,
            user,
            f"{role}:{name}" if role != "operator" else "operator",
            pub_allow=list(allowed.pub),
            sub_allow=list(allowed.sub),
            limits=limits,
            tags=tags,
        )
        self.issued.append(Issued(user=user, role=role, name=name, issued_at=int(time.time())))
        return credentials.creds_text(jwt, seed)

    def issue_unrestricted(self, name: str) -> str:
        """Credentials that may publish and subscribe to anything: for tests that play a node or
        a scheduler with malformed messages, never handed to a service or a tenant."""
        seed = credentials.new_seed("user")
        user = credentials.public_key(seed)
        jwt = credentials.user_jwt(
            self.signing_seeds[0], self.account, user, f"test:{name}", pub_allow=[">"], sub_allow=[">"]
        )
        issued = Issued(user=user, role="operator", name=f"test:{name}", issued_at=int(time.time()))
        self.issued.append(issued)
        return credentials.creds_text(jwt, seed)

    def revoke(self, role: Role, name: str) -> list[str]:
        """Revoke every user issued to `name` in `role`; the users revoked (none: unknown)."""
        now = int(time.time())
        revoked = []
        for issued in self.issued:
            if issued.role == role and issued.name == name and not issued.revoked:
                issued.revoked = True
                # "issued at or before" this second: a user issued later in the same second
                # under the same name would be revoked too; one issued after is not.
                self.revocations[issued.user] = now
                revoked.append(issued.user)
        return revoked

    def add_signing_key(self) -> str:
        """A new signing key, first in line: it signs every user issued from now on, while the
        older ones still vouch for the users they signed (until `retire_signing_keys`)."""
        seed = credentials.new_seed("account")
        self.signing_seeds.insert(0, seed)
        return credentials.public_key(seed)

    def retire_signing_keys(self) -> list[str]:
        """Drop every signing key but the newest: the users they signed stop being valid."""
        retired = [credentials.public_key(seed) for seed in self.signing_seeds[1:]]
        del self.signing_seeds[1:]
        return retired

    @property
    def signing_keys(self) -> list[str]:
        return [credentials.public_key(seed) for seed in self.signing_seeds]

    def tenants(self) -> dict[str, list[Issued]]:
        found: dict[str, list[Issued]] = {}
        for issued in self.issued:
            if issued.role == "tenant":
                found.setdefault(issued.name, []).append(issued)
        return found


def load(directory: Path) -> Authority | None:
    try:
        return msgspec.json.decode((directory / AUTHORITY_FILE).read_bytes(), type=Authority)
    except FileNotFoundError:
        return None


def load_or_create(directory: Path) -> Authority:
    return load(directory) or Authority.create()


def save(authority: Authority, directory: Path) -> None:
    credentials.write_secret(
        directory / AUTHORITY_FILE, msgspec.json.format(msgspec.json.encode(authority)).decode()
    )


def nats_config_lines(authority: Authority, resolver_dir: Path) -> str:
    """The operator-mode part of nats-server's config: trust the operator, resolve accounts from
    the server's own directory (updates arrive over the system account), start with both."""
    resolver_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    return (
        f'operator: "{authority.operator_jwt()}"\n'
        f'system_account: "{authority.system_account}"\n'
        f'resolver: {{ type: full, dir: "{resolver_dir}", allow_delete: false, interval: "2m" }}\n'
        "resolver_preload: {\n"
        f'  {authority.system_account}: "{authority.system_account_jwt()}"\n'
        f'  {authority.account}: "{authority.account_jwt()}"\n'
        "}\n"
    )


class PushError(Exception):
    pass


async def push_account(nats_url: str, system_creds: Path, keys: Authority, ca: str = "") -> None:
    """Send the account's current JWT (its revocations and signing keys) to the servers through
    the system account: the server closes the connections of users it now revokes. `ca`: the
    CA file of a cluster whose NATS speaks TLS."""
    tls = {"tls": ssl.create_default_context(cafile=ca)} if ca else {}
    try:
        nc = await nats.connect(
            nats_url, user_credentials=str(system_creds), connect_timeout=2, allow_reconnect=False, **tls
        )
    except (OSError, nats.errors.Error) as exc:
        raise PushError(f"cannot reach NATS at {nats_url} as the system account: {exc}") from None
    try:
        reply = await nc.request(CLAIMS_UPDATE, keys.account_jwt().encode(), timeout=5)
    except nats.errors.Error as exc:
        raise PushError(f"no server took the account update: {exc}") from None
    finally:
        await nc.close()
    answer = msgspec.json.decode(reply.data)
    if "error" in answer:
        raise PushError(f"the server refused the account update: {answer['error']}")
