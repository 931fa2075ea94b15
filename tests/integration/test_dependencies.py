"""Python functions' dependencies: requirements built into a layer (wheels only) on the deploying
side, shared by functions with the same set, fetched by nodes and mounted read-only at /deps.

pip reads its index from the environment (PIP_NO_INDEX, PIP_FIND_LINKS): here a wheelhouse the
test writes, so nothing leaves the machine."""

import base64
import hashlib
import json
import os
import zipfile
from pathlib import Path

import pytest

from deploy import launcher
from tests.integration.conftest import EXAMPLES, make_function
from tests.integration.test_cli import hetfaas as run_cli

pytestmark = pytest.mark.integration

GREETING = "def greet(name):\n    return 'hello from hfbase, ' + name\n"
DEMO = "from hfbase import greet\n\ndef shout(name):\n    return greet(name).upper()\n"
HANDLER = """
import os, hfdemo, helper

def handle(payload):
    name = payload.decode()
    try:
        open(os.path.join(os.path.dirname(hfdemo.__file__), "planted.py"), "w")
        layer_write = "written"
    except OSError as exc:
        layer_write = type(exc).__name__ + ":" + str(exc.errno)
    return {"shout": hfdemo.shout(name), "helper": helper.HELPER, "where": hfdemo.__file__,
            "layer_write": layer_write}
"""


def wheel(
    house: Path, name: str, version: str, files: dict[str, bytes], requires: tuple[str, ...] = ()
) -> None:
    """A pure-python wheel, as a build backend would write it (METADATA, WHEEL, RECORD)."""
    info = f"{name}-{version}.dist-info"
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    metadata += "".join(f"Requires-Dist: {r}\n" for r in requires)
    members = {**files, f"{info}/METADATA": metadata.encode()}
    members[f"{info}/WHEEL"] = (
        b"Wheel-Version: 1.0\nGenerator: hetfaas-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    )
    record = ""
    for path, data in members.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record += f"{path},sha256={digest},{len(data)}\n"
    members[f"{info}/RECORD"] = (record + f"{info}/RECORD,,\n").encode()
    with zipfile.ZipFile(house / f"{name}-{version}-py3-none-any.whl", "w") as archive:
        for path, data in members.items():
            archive.writestr(path, data)


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    house = tmp_path_factory.mktemp("wheelhouse")
    wheel(house, "hfbase", "1.0", {"hfbase/__init__.py": GREETING.encode()})
    wheel(house, "hfdemo", "1.0", {"hfdemo/__init__.py": DEMO.encode()}, requires=("hfbase>=1",))
    # over the test cluster's layer limit (4 MiB), and incompressible
    wheel(house, "hfbig", "1.0", {"hfbig/__init__.py": b"", "hfbig/blob.bin": os.urandom(5 << 20)})
    (house / "hfsource-1.0.tar.gz").write_bytes(b"not built: source distributions are never taken")
    return house


@pytest.fixture(scope="module")
def pip_env(wheelhouse: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The CLI's environment: pip on the wheelhouse only, the layer cache in a directory of the test's."""
    cache = tmp_path_factory.mktemp("layer-cache")
    return {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(wheelhouse), "XDG_CACHE_HOME": str(cache)}


def hetfaas(cluster: launcher.ClusterInfo, env: dict[str, str], *args: str):
    return run_cli(cluster.state_dir, *args, timeout_s=180, env=env)


def python_function(
    root: Path, name: str, requirements: list[str] | None, requirements_txt: str = ""
) -> Path:
    manifest = 'runtime = "python"\nhandler = "handler:handle"\n'
    if requirements is not None:
        manifest += f"[python]\nrequirements = {json.dumps(requirements)}\n"
    files = {"handler.py": HANDLER, "helper.py": "HELPER = 'vendored beside the handler'\n"}
    if requirements_txt:
        files["requirements.txt"] = requirements_txt
    return make_function(root, name, manifest, files)


def test_requirements_are_built_into_a_layer_the_function_imports(
    cluster: launcher.ClusterInfo, pip_env: dict[str, str], tenant: str, tmp_path: Path
) -> None:
    function = python_function(tmp_path, "deps", None, requirements_txt="# what it needs\nhfdemo==1.0\n")
    deployed = hetfaas(cluster, pip_env, "deploy", str(function), "--tenant", tenant, "--json")
    assert deployed.returncode == 0, deployed.stderr
    record = json.loads(deployed.stdout)["function"]
    assert record["layer_digest"].startswith("sha256-") and record["spec"]["python"]["requirements"] == [
        "hfdemo==1.0"
    ]
    progress = deployed.stderr.decode()
    assert "resolving 1 requirements" in progress and "layer built" in progress and "part 1 of 1" in progress

    invoked = hetfaas(cluster, pip_env, "invoke", "deps", "--tenant", tenant, "--data", "ada", "--json")
    assert invoked.returncode == 0, invoked.stderr
    output = json.loads(json.loads(invoked.stdout)["output"])
    assert output["shout"] == "HELLO FROM HFBASE, ADA", "the layer's package and its own dependency import"
    assert output["helper"] == "vendored beside the handler", "the function's own modules still import"
    if os.geteuid() == 0:  # the secure sandbox: the layer is its own read-only mount
        assert output["where"] == "/deps/hfdemo/__init__.py"
        assert output["layer_write"] in ("OSError:30", "PermissionError:13"), output


def test_functions_with_the_same_requirements_share_one_layer(
    cluster: launcher.ClusterInfo, pip_env: dict[str, str], tenant: str, tmp_path: Path
) -> None:
    first = hetfaas(
        cluster,
        pip_env,
        "deploy",
        str(python_function(tmp_path, "one", ["hfdemo==1.0"])),
        "--tenant",
        tenant,
        "--json",
    )
    second = hetfaas(
        cluster,
        pip_env,
        "deploy",
        str(python_function(tmp_path / "b", "two", ["hfdemo==1.0"])),
        "--tenant",
        tenant,
        "--json",
    )
    assert first.returncode == 0 and second.returncode == 0, (first.stderr, second.stderr)

    digests = {json.loads(done.stdout)["function"]["layer_digest"] for done in (first, second)}
    assert len(digests) == 1, "one layer for one requirement set"
    reused = second.stderr.decode()
    assert "in the cache" in reused and "in the cluster already: reused" in reused, reused
    assert "resolving" not in reused, "a layer it has is not built again"
    for name in ("one", "two"):
        invoked = hetfaas(cluster, pip_env, "invoke", name, "--tenant", tenant, "--data", "x", "--json")
        assert json.loads(json.loads(invoked.stdout)["output"])["shout"] == "HELLO FROM HFBASE, X"


@pytest.mark.parametrize(
    ("requirement", "named", "why"),
    [
        ("nothere==1.0", "nothere", "cannot be resolved, or has no wheel"),
        ("hfsource", "hfsource", "no wheel"),
    ],
)
def test_a_requirement_with_no_wheel_is_refused_at_deploy_by_name(
    cluster: launcher.ClusterInfo,
    pip_env: dict[str, str],
    tenant: str,
    tmp_path: Path,
    requirement: str,
    named: str,
    why: str,
) -> None:
    refused = hetfaas(
        cluster,
        pip_env,
        "deploy",
        str(python_function(tmp_path, "missing", [requirement])),
        "--tenant",
        tenant,
    )
    assert refused.returncode != 0
    message = refused.stderr.decode()
    assert f"requirement '{named}" in message and why in message, message
    listed = hetfaas(cluster, pip_env, "ls", "--tenant", tenant, "--json")
    assert json.loads(listed.stdout) == [], "nothing was deployed"


def test_a_layer_over_the_limit_is_refused_with_the_limit(
    cluster: launcher.ClusterInfo, pip_env: dict[str, str], tenant: str, tmp_path: Path
) -> None:
    refused = hetfaas(
        cluster, pip_env, "deploy", str(python_function(tmp_path, "big", ["hfbig"])), "--tenant", tenant
    )
    assert refused.returncode != 0
    assert "over the limit of 4 MiB" in refused.stderr.decode(), refused.stderr


def test_requirements_given_twice_or_as_urls_are_refused(
    cluster: launcher.ClusterInfo, pip_env: dict[str, str], tenant: str, tmp_path: Path
) -> None:
    twice = python_function(tmp_path, "twice", ["hfdemo"], requirements_txt="hfdemo\n")
    url = python_function(tmp_path / "u", "url", ["hfdemo @ https://example.invalid/hfdemo.whl"])
    for function, said in ((twice, "requirements are given twice"), (url, "names a URL")):
        refused = hetfaas(cluster, pip_env, "deploy", str(function), "--tenant", tenant)
        assert refused.returncode != 0 and said in refused.stderr.decode(), refused.stderr


def test_the_jinja2_example_deploys_with_its_layer_and_greets(
    cluster: launcher.ClusterInfo, tenant: str, tmp_path: Path
) -> None:
    """examples/greet-jinja2, as `deploy/demo.sh` deploys it (its jinja2 wheel from the wheels
    deploy/setup.sh fetched, as PyPI would give it)."""
    wheels = Path(__file__).resolve().parents[2] / ".state" / "test-wheels"
    assert (wheels / ".wanted").is_file(), f"{wheels} is missing: run deploy/setup.sh"
    env = {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(wheels), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    deployed = hetfaas(cluster, env, "deploy", str(EXAMPLES / "greet-jinja2"), "--tenant", tenant)
    assert deployed.returncode == 0, deployed.stderr
    invoked = hetfaas(
        cluster, env, "invoke", "greet", "--tenant", tenant, "--data", '{"name": "Ada"}', "--json"
    )
    output = json.loads(json.loads(invoked.stdout)["output"])
    assert output["html"].startswith("<h1>Hello, Ada!</h1>") and output["cold_start"] is True, output
    logs = hetfaas(cluster, env, "logs", "greet", "--tenant", tenant)
    assert b"greeting Ada" in logs.stdout, logs.stdout
