"""Fixtures of the end-to-end tests (``tests/support/servers.py``) and the log-tail hook of the running stack."""

import pytest

from support.servers import *  # noqa: F403 - pytest finds fixtures among a conftest's names


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> pytest.TestReport:
    """Attach the tails of the e2e stack's subprocess logs to a failing test's report."""
    rep = yield
    stack = getattr(item, "funcargs", {}).get("stack")
    if rep.failed and stack is not None:
        rep.sections.append(("subprocess logs (last lines)", stack.log_tails()))
    return rep
