#!/usr/bin/env bash
# Installs everything (deploy/setup.sh), then runs lint, type checks and the whole test suite against real
# nats-server and etcd processes that the fixtures start on free loopback ports.
# Extra arguments go to pytest, e.g. `deploy/test.sh tests/unit -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
exec .venv/bin/python -m pytest "$@"
