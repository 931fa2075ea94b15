from dpu_node.app import run_dpu_node
from dpu_node.settings import DpuNodeSettings
from fabric.runner import run_service, settings_from_argv

settings = settings_from_argv(DpuNodeSettings, "dpu_node")
run_service(lambda: run_dpu_node(settings), settings.log_level, settings.node_id)
