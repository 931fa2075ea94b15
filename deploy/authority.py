"""The cluster's NATS authority: the operator and account keys that issue every identity, kept by
the operator (`hetfaas up` writes it to the state directory, mode 0600; docs/architecture.md §8).

The account HETFAAS holds the services and the operator. Each tenant has an account of its own
(so the server can bound all of a tenant's connections together: NATS counts connections per
account), which imports exactly that tenant's invoke, control and verify subjects from HETFAAS
as services: a request crosses over, its answer comes back to the tenant's own reply subject,
and nothing else of HETFAAS is visible to the tenant at all. Within every account each user's
permissions (`schemas.permissions`) still apply. Users are signed by their account's signing
key, never by its identity key, so signing keys can be replaced without re-creating accounts.
The account SYS is the server's system account: the operator pushes account updates (new
tenants, revocations, signing keys) through it, as `nsc push` does.
"""

import time
from pathlib import Path

import msgspec
import nats
import nats.errors

from fabric import bus, credentials
from schemas import subjects
from schemas.permissions import Role, permissions

AUTHORITY_FILE = "authority.json"
SYSTEM_CREDS = "sys.creds"
CLAIMS_UPDATE = "$SYS.REQ.CLAIMS.UPDATE"  # where nats-server takes a newer account JWT
ACCOUNT = "HETFAAS"
# Bus limits of one tenant connection: a client cannot hold more subscriptions than a busy
# CLI or SDK needs, nor send a message larger than an invocation may be (the scheduler's
# max_payload_bytes is smaller still and answers with a clear error).
TENANT_LIMITS = credentials.UserLimits(subs=1_000, payload=8 * 1024 * 1024, data=64 * 1024 * 1024)
# All of one tenant's connections and subscriptions together (its account's limits): a tenant
# cannot exhaust the servers by opening connections or subscriptions by the thousand.
TENANT_MAX_CONNECTIONS = 64
TENANT_ACCOUNT_LIMITS = credentials.UserLimits(subs=10_000, payload=8 * 1024 * 1024)
# The longest an invocation may take (the scheduler's max_timeout_ms, 15 min) and some: past it
# the server forgets how to route a tenant's answer back across the accounts.
RESPONSE_THRESHOLD_S = 16 * 60.0


def tenant_subjects(tenant: str) -> tuple[str, ...]:
    """What a tenant's account imports from HETFAAS: its own requests, nothing else."""
    return (subjects.invoke(tenant, "*"), subjects.control(tenant, "*"), subjects.verify(tenant))


EXPORTS = (subjects.invoke("*", "*"), subjects.control("*", "*"), subjects.VERIFY_ALL)


class TenantAccount(msgspec.Struct, kw_only=True):
    """A tenant's own NATS account: its key, its signing keys, its users' revocations."""

    seed: str
    signing_seeds: list[str]
    revocations: dict[str, int] = {}

    @property
    def public(self) -> str:
        return credentials.public_key(self.seed)


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
    tenant_accounts: dict[str, TenantAccount] = {}

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
        exports = [credentials.service_export(subject, RESPONSE_THRESHOLD_S) for subject in EXPORTS]
        return credentials.account_jwt(
            self.operator_seed,
            self.account,
            ACCOUNT,
            signing,
            self.revocations,
            jetstream=True,
            exports=exports,
        )

    def tenant_account(self, tenant: str) -> TenantAccount:
        """Tenant `tenant`'s account, made on first use."""
        if tenant not in self.tenant_accounts:
            self.tenant_accounts[tenant] = TenantAccount(
                seed=credentials.new_seed("account"), signing_seeds=[credentials.new_seed("account")]
            )
        return self.tenant_accounts[tenant]

    def tenant_account_jwt(self, tenant: str) -> str:
        """The tenant's account JWT: its limits, and its own subjects imported from HETFAAS with
        activation tokens HETFAAS's signing key signed for this account alone."""
        account = self.tenant_accounts[tenant]
        imports = [
            credentials.service_import(
                self.account,
                subject,
                credentials.activation_jwt(self.signing_seeds[0], self.account, account.public, subject),
            )
            for subject in tenant_subjects(tenant)
        ]
        return credentials.account_jwt(
            self.operator_seed,
            account.public,
            f"tenant:{tenant}",
            [credentials.public_key(seed) for seed in account.signing_seeds],
            account.revocations,
            max_connections=TENANT_MAX_CONNECTIONS,
            imports=imports,
            user_limits=TENANT_ACCOUNT_LIMITS,
        )

    def account_jwts(self) -> dict[str, str]:
        """Every account's JWT by public key (what a server is started with)."""
        jwts = {self.system_account: self.system_account_jwt(), self.account: self.account_jwt()}
        return jwts | {
            account.public: self.tenant_account_jwt(t) for t, account in self.tenant_accounts.items()
        }

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
        """New credentials (the text of a `.creds` file) for `name` in `role`: a tenant's in its
        own account (made now if new: push it, `tenant_account_jwt`), the others' in HETFAAS."""
        seed = credentials.new_seed("user")
        user = credentials.public_key(seed)
        allowed = permissions(role, name)
        tags = [f"hetfaas-role:{role}"] + ([f"hetfaas-tenant:{name}"] if role == "tenant" else [])
        limits = TENANT_LIMITS if role == "tenant" else credentials.UserLimits()
        if role == "tenant":
            account = self.tenant_account(name)
            signing_seed, account_key = account.signing_seeds[0], account.public
        else:
            signing_seed, account_key = self.signing_seeds[0], self.account
        jwt = credentials.user_jwt(
            signing_seed,
            account_key,
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
        if role == "tenant" and name not in self.tenant_accounts:
            return []
        revocations = self.tenant_accounts[name].revocations if role == "tenant" else self.revocations
        for issued in self.issued:
            if issued.role == role and issued.name == name and not issued.revoked:
                issued.revoked = True
                # "issued at or before" this second: a user issued later in the same second
                # under the same name would be revoked too; one issued after is not.
                revocations[issued.user] = now
                revoked.append(issued.user)
        return revoked

    def add_signing_key(self) -> str:
        """A new signing key, first in line, in HETFAAS and in every tenant's account: it signs
        every user (and activation) issued from now on, while the older ones still vouch for
        what they signed (until `retire_signing_keys`). HETFAAS's new key is returned."""
        for account in self.tenant_accounts.values():
            account.signing_seeds.insert(0, credentials.new_seed("account"))
        seed = credentials.new_seed("account")
        self.signing_seeds.insert(0, seed)
        return credentials.public_key(seed)

    def retire_signing_keys(self) -> list[str]:
        """Drop every signing key but the newest, everywhere: what they signed stops being valid.
        HETFAAS's retired keys are returned."""
        for account in self.tenant_accounts.values():
            del account.signing_seeds[1:]
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
    preload = "".join(f'  {key}: "{jwt}"\n' for key, jwt in authority.account_jwts().items())
    return (
        f'operator: "{authority.operator_jwt()}"\n'
        f'system_account: "{authority.system_account}"\n'
        f'resolver: {{ type: full, dir: "{resolver_dir}", allow_delete: false, interval: "2m" }}\n'
        f"resolver_preload: {{\n{preload}}}\n"
    )


class PushError(Exception):
    pass


async def push_accounts(nats_url: str, system_creds: Path, jwts: list[str], ca: str = "") -> None:
    """Send account JWTs (new tenants, revocations, signing keys) to the servers through the
    system account: the server closes the connections of users it no longer accepts. `ca`: the
    CA file of a cluster whose NATS speaks TLS."""
    tls = {"tls": bus.tls_context(ca)} if ca else {}
    try:
        nc = await nats.connect(
            nats_url, user_credentials=str(system_creds), connect_timeout=2, allow_reconnect=False, **tls
        )
    except (OSError, nats.errors.Error) as exc:
        raise PushError(f"cannot reach NATS at {nats_url} as the system account: {exc}") from None
    try:
        for jwt in jwts:
            try:
                reply = await nc.request(CLAIMS_UPDATE, jwt.encode(), timeout=5)
            except nats.errors.Error as exc:
                raise PushError(f"no server took the account update: {exc}") from None
            answer = msgspec.json.decode(reply.data)
            if "error" in answer:
                raise PushError(f"the server refused the account update: {answer['error']}")
    finally:
        await nc.close()
