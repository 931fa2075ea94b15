from fabric.runner import run_service, settings_from_argv
from scheduler.app import run_scheduler
from scheduler.settings import SchedulerSettings

settings = settings_from_argv(SchedulerSettings, "scheduler")
run_service(lambda: run_scheduler(settings), settings.log_level, settings.scheduler_id)
