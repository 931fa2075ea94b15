"""The etcd key layout. Every key and prefix is built here (docs/architecture.md §3)."""

NODES = "/hetfaas/nodes/"
SCHEDULERS = "/hetfaas/schedulers/"
FUNCTIONS = "/hetfaas/functions/"
PROGRAMS = "/hetfaas/programs/"
REVOKED = "/hetfaas/revoked/"
TENANTS = "/hetfaas/tenants/"
CORDONS = "/hetfaas/cordons/"  # nodes an operator drained: nothing is placed on them


def node(node_id: str) -> str:
    return NODES + node_id


def cordon(node_id: str) -> str:
    return CORDONS + node_id


def scheduler(scheduler_id: str) -> str:
    return SCHEDULERS + scheduler_id


def function(tenant: str, name: str) -> str:
    return f"{FUNCTIONS}{tenant}/{name}"


def tenant_functions(tenant: str) -> str:
    return f"{FUNCTIONS}{tenant}/"


def parse_function(key: str) -> tuple[str, str]:
    tenant, _, name = key.removeprefix(FUNCTIONS).partition("/")
    return tenant, name


def program(digest: str, tenant: str, function: str) -> str:
    """An approved eBPF program, content-addressed, with its approval for one tenant's function
    (two functions with the same bytecode are two approvals: an attestation names its function)."""
    return f"{PROGRAMS}{digest}/{tenant}/{function}"


def parse_program(key: str) -> tuple[str, str, str]:
    """(digest, tenant, function) of a `program` key."""
    digest, _, rest = key.removeprefix(PROGRAMS).partition("/")
    tenant, _, function = rest.partition("/")
    return digest, tenant, function


def revoked(digest: str) -> str:
    """A revoked program: DPU nodes watch these, unload it and refuse to load it again."""
    return REVOKED + digest


def tenant(name: str) -> str:
    """A tenant's limits."""
    return TENANTS + name
