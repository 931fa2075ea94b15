from fabric.runner import run_service, settings_from_argv
from verifier_service.app import run_verifier
from verifier_service.settings import VerifierSettings

settings = settings_from_argv(VerifierSettings, "verifier_service")
run_service(lambda: run_verifier(settings), settings.log_level, settings.verifier_id)
