import os

# Function processes are forked and exec'd at once (no Python runs in the child), so gRPC's
# fork handlers (etcd client) have nothing to protect; without this they log on every spawn.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

from fabric.runner import run_service, settings_from_argv
from host_node.app import run_host_node
from host_node.settings import HostNodeSettings

settings = settings_from_argv(HostNodeSettings, "host_node")
run_service(lambda: run_host_node(settings), settings.log_level, settings.node_id)
