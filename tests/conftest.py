"""The `torch` marker's rules (see pyproject.toml and .ci/run).

Tests that need torch/torchvision (the reference pipeline) carry `@pytest.mark.torch` and
skip where torch is absent, so README's test command stays light. CI installs the
reference extra and runs `BERG_JAX_REQUIRE_TORCH=1 python -m pytest -m torch`: there a
torch test that skips fails instead, so a broken torch install cannot pass as green.
In every run, a test that skips for want of torch without the marker fails too (mark it),
so `-m torch` selects exactly the tests that need torch.
"""

from __future__ import annotations

import os

import pytest

REQUIRE_TORCH_ENV = "BERG_JAX_REQUIRE_TORCH"


def require_torch() -> bool:
    return os.environ.get(REQUIRE_TORCH_ENV, "").strip() not in ("", "0")


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # (path, lineno, reason)
        return str(longrepr[2])
    return str(longrepr)


def _about_torch(reason: str) -> bool:
    return "torch" in reason.lower()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not report.skipped or hasattr(report, "wasxfail"):
        return
    reason = _skip_reason(report)
    marked = item.get_closest_marker("torch") is not None
    if marked and require_torch():
        report.outcome = "failed"
        report.longrepr = f"{REQUIRE_TORCH_ENV}=1 and this torch test skipped: {reason}"
    elif not marked and _about_torch(reason):
        report.outcome = "failed"
        report.longrepr = (f"skipped for want of torch ({reason}) but not marked "
                           "@pytest.mark.torch: mark it, so CI's `-m torch` run includes it")


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and require_torch() and _about_torch(_skip_reason(report)):
        report.outcome = "failed"
        report.longrepr = f"{REQUIRE_TORCH_ENV}=1 and a module skipped for want of torch: {_skip_reason(report)}"
