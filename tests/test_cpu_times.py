"""The suite's CPU summary (tests/cpu_times.py): each test's CPU seconds, its reaped
children's included, reach the summary from an xdist worker."""

import os
import re
import subprocess
import sys
from pathlib import Path

BURN = """
import subprocess, sys, time


def test_waits():
    time.sleep(0.5)


def test_burns_in_a_child():
    spin = "import time\\nt = time.process_time()\\nwhile time.process_time() - t < 0.6: pass"
    subprocess.run([sys.executable, "-c", spin], check=True)
"""


def test_the_summary_ranks_tests_by_the_cpu_of_their_children_under_xdist(tmp_path):
    (tmp_path / "test_burn.py").write_text(BURN)
    # only the plugins it needs: the installed ones (hypothesis, ...) took 2 of its 3.5 s of CPU
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent), "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    plugins = ["-p", "xdist", "-p", "cpu_times", "-p", "no:cacheprovider"]
    cmd = [sys.executable, "-m", "pytest", *plugins, "-n", "1", "--durations=5"]
    done = subprocess.run([*cmd, "test_burn.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = re.findall(r"^ +([\d.]+) cpu s +([\d.]+) wall s .*::(\w+)$", done.stdout, re.M)
    assert [name for *_, name in rows] == ["test_burns_in_a_child", "test_waits"], done.stdout
    (burn_cpu, _, _), (wait_cpu, wait_wall, _) = rows
    assert float(burn_cpu) >= 0.6 and float(wait_cpu) < 0.3 <= float(wait_wall)
