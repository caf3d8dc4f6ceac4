"""A pytest plugin (registered by conftest.py): the CPU seconds each test used, beside
pytest's --durations. Wall time says little on shared cores, where the suite is
CPU-bound: this is where the CPU goes.

Each phase's report (setup, call, teardown) carries ``("cpu_s_<phase>", seconds)`` in
its user_properties: user + system time of the test's process and of the children it
reaped (a CLI command, mpirun and the ranks it reaped), so the figure crosses from an
xdist worker to the controller. With --durations=N the summary lists the N tests (0:
all) that used the most CPU, setup and teardown included."""

from __future__ import annotations

import resource

import pytest

PREFIX = "cpu_s_"


def cpu_s() -> float:
    """CPU seconds (user + system) of this process and its reaped children so far."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    item.cpu_mark = cpu_s()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """The CPU used since the previous phase ended (or the setup began) is this phase's."""
    now = cpu_s()
    report = (yield).get_result()
    report.user_properties.append((PREFIX + call.when, round(now - getattr(item, "cpu_mark", now), 3)))
    item.cpu_mark = cpu_s()


def pytest_terminal_summary(terminalreporter) -> None:
    top = terminalreporter.config.option.durations
    if top is None:
        return
    cpu, wall = {}, {}  # nodeid -> {phase: seconds}
    for reports in terminalreporter.stats.values():
        for report in reports:
            for key, value in getattr(report, "user_properties", ()):
                if isinstance(key, str) and key.startswith(PREFIX):
                    cpu.setdefault(report.nodeid, {})[key] = value
                    wall.setdefault(report.nodeid, {})[report.when] = report.duration
    if not cpu:
        return
    ranked = sorted(cpu, key=lambda nodeid: sum(cpu[nodeid].values()), reverse=True)
    terminalreporter.write_sep("=", f"most CPU: {top or 'all'} tests (CPU s of the test and its children, wall s)")
    for nodeid in ranked[:top] if top else ranked:
        total, setup = sum(cpu[nodeid].values()), cpu[nodeid].get(PREFIX + "setup", 0.0)
        terminalreporter.write_line(
            f"{total:7.1f} cpu s {sum(wall[nodeid].values()):7.1f} wall s  (setup {setup:.1f} cpu s)  {nodeid}"
        )
