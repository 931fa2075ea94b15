#!/usr/bin/env bash
# The main job: install, start a local cluster (nats-server, etcd, two scheduler replicas, two host nodes),
# deploy the sample functions in examples/, invoke them cold and warm, and show what happened.
# The cluster keeps running afterwards. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/setup.sh
export PATH="$PWD/.venv/bin:$PATH"

run() { printf '\n$ %s\n' "$*"; "$@"; }

if [ "$(id -u)" -eq 0 ]; then
    run hetfaas up --hosts 2 --schedulers 2 --dpus 1   # the verifier and DPU nodes load eBPF: root only
    examples=(examples/*/)
else
    run hetfaas up --hosts 2 --schedulers 2
    examples=(examples/hello-python/ examples/wordcount-exec/ examples/greet-jinja2/)
fi
for fn in "${examples[@]}"; do run hetfaas deploy "$fn"; done
run hetfaas ls
run hetfaas tenant set default --max-concurrency 100   # at most 100 of its invocations at once

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
echo
echo "# greet has a dependency (jinja2, built into its layer at deploy) and takes handle(event, context)."
echo "# Its first call on a node takes a stem cell (an interpreter already waiting in its sandbox);"
echo "# once it has run there, a template of it forks its later cold starts (-v says which)."
for name in Ada Grace; do run hetfaas invoke greet --data "{\"name\": \"$name\"}" -v; done
run hetfaas logs greet --tail 2
if [ "$(id -u)" -eq 0 ]; then
    echo
    echo "# eBPF functions run on the DPU node: the payload is the packet; the reply gives the"
    echo "# program's verdict (XDP_PASS, XDP_DROP, XDP_TX), the packet out and the kernel's run time."
    packet() { python -c "import sys; sys.stdout.buffer.write(b'\\xaa'*6 + b'\\xbb'*6 + b'\\x08\\x00' + bytes([0x45,0,0,28,0,0,0,0,64,17,0,0]) + bytes(8) + (1234).to_bytes(2,'big') + ($1).to_bytes(2,'big') + b'\\x00\\x08\\x00\\x00' + bytes(22))"; }
    for i in 1 2 3; do
        printf '\n$ <UDP packet> | hetfaas invoke packet-counter -v   # the packet out goes to /dev/null\n'
        packet 53 | hetfaas invoke packet-counter --data-file - -v >/dev/null
    done
    run hetfaas maps packet-counter
    printf '\n$ <UDP packet to port 9> | hetfaas invoke port-filter -v\n'
    packet 9 | hetfaas invoke port-filter --data-file - -v >/dev/null
    printf '\n$ <UDP packet to port 53> | hetfaas invoke port-filter -v\n'
    packet 53 | hetfaas invoke port-filter --data-file - -v >/dev/null
    printf '\n$ <packet> | hetfaas invoke mac-bounce --json\n'
    packet 53 | hetfaas invoke mac-bounce --data-file - --json
    printf '\n$ hetfaas verify examples/ebpf-port-filter/filter.o\n'
    hetfaas verify examples/ebpf-port-filter/filter.o
fi
printf '\n$ hetfaas invoke no-such-function   # errors are structured and exit non-zero\n'
hetfaas invoke no-such-function || echo "(exit status $?)"
run hetfaas status

state=$(python -c 'from deploy.launcher import default_state_dir; print(default_state_dir())')
cat <<MSG

The cluster is still running. Its configs, logs, data and traces are in $state.
  invoke:  .venv/bin/hetfaas invoke hello --data you
  stop:    .venv/bin/hetfaas down
MSG
