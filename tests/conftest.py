"""Suite-wide rules: a privileged test may not skip when the suite runs as root (CI does)."""

import os

import pytest


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and item.get_closest_marker("privileged") and os.geteuid() == 0:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"privileged test skipped while running as root ({reason}); CI must run it"
