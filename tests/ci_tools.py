"""In CI a missing tool fails the tests that need it instead of skipping them.

.ci/run installs espeak-ng, sox, lame and nginx (Debian) and gunicorn (the package's dependencies),
and sets CI. Outside CI a test without its tool skips, saying which tool is missing; in CI the same
skip is turned into a failure (an error when it is skipped at setup, as `skipif` marks do), so a
broken install step cannot pass as a green run with fewer tests. Skips for anything else (an
optional extra such as modelscope, systemd-analyze, a GPU-only path) stay skips.

tests/conftest.py imports the hook below; pytest finds it there by its name.
"""
from __future__ import annotations

import os
import re

import pytest

CI_TOOLS = ("espeak-ng", "sox", "lame", "nginx", "gunicorn")
_MISSING = re.compile(r"(?<![\w-])(%s)(?![\w-]).*\b(not installed|not found|missing)\b"
                      % "|".join(map(re.escape, CI_TOOLS)), re.I)


def missing_ci_tool(reason: str) -> bool:
    """Whether a skip reason says that one of the tools CI installs is missing."""
    return bool(_MISSING.search(reason or ""))


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr or "")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not (report.skipped and os.environ.get("CI") and not hasattr(report, "wasxfail")):
        return
    reason = _skip_reason(report)
    if missing_ci_tool(reason):
        report.outcome = "failed"
        report.longrepr = (f"{reason.removeprefix('Skipped: ')}: .ci/run installs it, so in CI (CI is set) a missing "
                           "tool fails the test instead of skipping it")
