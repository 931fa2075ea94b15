"""Every service answers /healthz, /readyz and /metrics on its HTTP endpoint, as load balancers,
orchestrators and Prometheus ask them; a service not ready says so with 503 and why."""

import asyncio
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from deploy import launcher

pytestmark = pytest.mark.integration


def get(state_dir: str, service: str, path: str) -> tuple[int, str]:
    settings = tomllib.loads((Path(state_dir) / "config" / f"{service}.toml").read_text())
    try:
        with urllib.request.urlopen(f"http://{settings['metrics_listen']}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.mark.parametrize("service", ["scheduler-0", "host-1", "host-2"])
async def test_a_serving_service_is_live_and_ready(cluster: launcher.ClusterInfo, service: str) -> None:
    answers = {path: await asyncio.to_thread(get, cluster.state_dir, service, path) for path in PATHS}

    assert answers["/healthz"] == (200, "ok\n")
    assert answers["/readyz"] == (200, "ready\n")
    assert answers["/metrics"][0] == 200
    assert answers["/nope"][0] == 404


PATHS = ("/healthz", "/readyz", "/metrics", "/nope")
