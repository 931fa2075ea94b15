#!/usr/bin/env bash
# The main job: install, start a local cluster (nats-server, etcd, a scheduler, two host nodes),
# deploy the sample functions in examples/, invoke them cold and warm, and show what happened.
# The cluster keeps running afterwards. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/setup.sh
export PATH="$PWD/.venv/bin:$PATH"

run() { printf '\n$ %s\n' "$*"; "$@"; }

run hetfaas up --hosts 2
for fn in examples/*/; do run hetfaas deploy "$fn"; done
run hetfaas ls

echo
echo "# Each call prints its output, then (on stderr) the node, cold or warm, and the latency."
echo "# The first call of a function starts it (cold); the next one reuses the warm instance."
echo "# (On a second run of this script the instances are still warm from the first.)"
for name in Ada Grace; do run hetfaas invoke hello --data "$name" -v; done
for text in "one two three" "a b"; do
    printf '\n$ echo "%s" | hetfaas invoke wordcount -v\n' "$text"
    echo "$text" | hetfaas invoke wordcount -v
done
run hetfaas invoke hello --data Linus --json
printf '\n$ hetfaas invoke no-such-function   # errors are structured and exit non-zero\n'
hetfaas invoke no-such-function || echo "(exit status $?)"
run hetfaas status

state=$(python -c 'from deploy.launcher import default_state_dir; print(default_state_dir())')
cat <<MSG

The cluster is still running. Its configs, logs, data and traces are in $state.
  invoke:  .venv/bin/hetfaas invoke hello --data you
  stop:    .venv/bin/hetfaas down
MSG
