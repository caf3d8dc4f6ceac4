"""Every launch line of the README and docs/ runs as written, with only paths and
counts changed: the output folder, the shards, run.rounds, run.samples_per_client,
diffusion.sampling_steps and a federated run's federated.local_steps.
(The SLURM lines run in tests/test_slurm.py, on a real SLURM.)"""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from doc_blocks import ROOT, doc_files, shell_lines
from harness import free_port

pytestmark = pytest.mark.mpi

LAUNCHERS = ("jobs/local.sh", "torchrun", "mpirun", "srun", "sbatch", "collafuse-hpc")
PLACEHOLDER = "runs/quickstart-..."  # the README's name for "the run you trained"


def launch_lines() -> list[str]:
    """Lines that start a training or sampling run."""
    found = []
    for path in doc_files():
        for line in shell_lines(path):
            words = shlex.split(line)
            if words[0] in LAUNCHERS and ("train" in words or "sample" in words or words[0] == "sbatch"):
                found.append(line)
    return list(dict.fromkeys(found))


@pytest.fixture(scope="module")
def quickstart_shards(tmp_path_factory) -> Path:
    """The quickstart's shards, made by its documented prepare line (only --out changed)."""
    documented = (line for p in doc_files() for line in shell_lines(p))
    prepare = next(line for line in documented if line.startswith("collafuse-hpc prepare digits"))
    out = tmp_path_factory.mktemp("quickstart") / "data"
    words = shlex.split(prepare)
    words[words.index("--out") + 1] = str(out)
    done = subprocess.run(words, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return out


def _env() -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)  # collafuse-hpc and torchrun of this venv
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PET_MASTER_PORT": str(free_port())}


def _run(words: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(words, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)


def _as_run(line: str, out: Path, shards: Path, rounds: int) -> list[str]:
    """``line`` into ``out``, on ``shards``, for ``rounds`` rounds; a line that takes the
    trained run itself keeps the run's config, and only draws fewer samples."""
    words = shlex.split(line.replace(PLACEHOLDER, str(out)))
    if str(out) in words:
        return [*words, "--set", "run.samples_per_client=4"]  # the run's own 10-step grid (below)
    assert "configs/quickstart.yaml" in words, f"a launch line of another config: add it to this test: {line}"
    words = [f"run.output_dir={out}" if w.startswith("run.output_dir=") else w for w in words]
    if f"run.output_dir={out}" not in words:
        words += ["--set", f"run.output_dir={out}"]
    words += ["--set", f"run.rounds={rounds}", "--set", "run.samples_per_client=4"]
    words += ["--set", "diffusion.sampling_steps=10"]  # a 10-step grid, as the README test samples: not 200 steps
    if "run.method=federated" in words:  # 2 local steps a round, not 10: 12.7 -> 5.3 s of CPU
        words += ["--set", "federated.local_steps=2"]
    words += ["--set", f"clients.0.shard={shards}/client_0.h5", "--set", f"clients.1.shard={shards}/client_1.h5"]
    return words


def test_the_docs_show_the_launchers_users_need():
    lines = launch_lines()
    starts = {shlex.split(line)[0] for line in lines}
    assert {"jobs/local.sh", "torchrun", "collafuse-hpc", "sbatch"} <= starts, lines
    assert any("--resume" in line for line in lines) and any(" sample " in line for line in lines)


def test_the_slurm_launch_lines_run_in_the_slurm_suite():
    suite = (ROOT / "tests/test_slurm.py").read_text()
    for line in launch_lines():
        words = shlex.split(line)
        if words[0] in ("sbatch", "srun"):
            script = next(w for w in words if w.startswith("jobs/"))
            assert script in suite, f"{line}: tests/test_slurm.py does not run {script}"


def test_every_local_launch_line_runs_as_written(tmp_path, quickstart_shards):
    """Training lines first, each into its own folder; then the lines that continue
    'the run you trained' (--resume) or sample it again: the first training line
    that overrides no key, since a resume must train what that run trained."""
    readme = set(shell_lines(ROOT / "README.md"))  # run in order in a fresh clone by the test below
    lines = [line for line in launch_lines() if shlex.split(line)[0] not in ("sbatch", "srun") and line not in readme]
    trains = [line for line in lines if PLACEHOLDER not in line]
    later = [line for line in lines if PLACEHOLDER in line]
    trained = tmp_path / f"run{next(i for i, line in enumerate(trains) if '--set' not in line)}"
    for i, line in enumerate(trains):
        out = tmp_path / f"run{i}"
        done = _run(_as_run(line, out, quickstart_shards, 2))
        assert done.returncode == 0, f"{line}\n{done.stderr[-3000:]}"
        assert (out / "samples/c0.png").exists(), line
    for line in later:
        done = _run(_as_run(line, trained, quickstart_shards, 3))
        assert done.returncode == 0, f"{line}\n{done.stderr[-3000:]}"
        assert re.search(r"collafuse-hpc: this invocation (trained rounds|sampled) .* in [\d.]+ s\n", done.stdout), line


def test_the_quickstart_and_getting_started_say_how_to_use_the_venv():
    """Without the venv: 'collafuse-hpc: command not found', and tools/*.py 'No module named
    h5py'. The quickstart's closing lines and getting-started say how to activate it, and
    what they say works from a shell that lacks it."""
    closing = (ROOT / "jobs/quickstart.sh").read_text().split("jobs/local.sh 3 train", 1)[1]
    for text in (closing, (ROOT / "docs/getting-started.md").read_text()):
        assert "source .venv/bin/activate" in text or "source $VENV/bin/activate" in text
    bare = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    bare["PATH"] = ":".join(p for p in os.environ["PATH"].split(":") if not p.startswith(str(ROOT)))
    check = "source .venv/bin/activate && collafuse-hpc --version && python tools/report.py --help"
    done = subprocess.run(["bash", "-c", check], cwd=ROOT, env=bare, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "collafuse-hpc" in done.stdout, done.stderr


def test_local_sh_without_the_rank_count_says_so():
    """``jobs/local.sh train CONFIG`` (NP forgotten) answered 'invalid choice: CONFIG'
    from every rank mpirun started with -np train."""
    for args in (["train", "configs/quickstart.yaml"], ["0", "train", "configs/quickstart.yaml"], []):
        done = _run(["jobs/local.sh", *args])
        last = done.stderr.strip().splitlines()[-1]
        assert done.returncode == 2 and "NP, the number of ranks," in last and "usage: jobs/local.sh NP" in last, last
        assert "invalid choice" not in done.stderr


def test_the_readmes_commands_run_in_order_in_a_fresh_clone(tmp_path):
    """The README's lines, in order, in a fresh clone after the quickstart, each write where
    they say: the local.sh and torchrun lines both wrote runs/quickstart, and the second
    failed. Only counts change (rounds, samples, evaluated images, timing repeats); the quickstart's run
    (jobs/quickstart.sh, which also sets up .venv) is trained as it trains it, for 2 rounds."""
    clone = tmp_path / "clone"  # the tracked files as this working tree has them
    clone.mkdir()
    subprocess.run(f"git ls-files -z | tar --null -T - -cf - | tar -xf - -C {clone}", shell=True, cwd=ROOT, check=True)
    (clone / ".venv").symlink_to(ROOT / ".venv")
    env = {**_env(), "PATH": f"{ROOT / '.venv/bin'}:{os.environ['PATH']}"}  # activated
    quickstart = "runs/quickstart-20250101-000000"
    counts = "--set run.samples_per_client=4 --set diffusion.sampling_steps=10 --set run.rounds="  # a 10-step grid
    lines = [
        "collafuse-hpc prepare digits --out data/quickstart --clients 2 --partition class --size 16",
        f"jobs/local.sh 3 train configs/quickstart.yaml --set run.output_dir={quickstart} {counts}2",
    ]
    for line in shell_lines(ROOT / "README.md"):
        if line.split()[0] in ("bash", "cmake", "sbatch"):  # the quickstart and the suites; SLURM: test_slurm.py
            continue
        line = line.replace(PLACEHOLDER, quickstart)
        if " train " in line:
            line += f" {counts}{3 if '--resume' in line else 2}"
        if line.startswith("collafuse-hpc evaluate"):
            line += " --set eval.images=8 --set eval.bootstrap=0 --set eval.timing_repeats=1"
            line += " --set diffusion.sampling_steps=10"
        lines.append(line)
    for line in lines:
        done = subprocess.run(line, shell=True, cwd=clone, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{line}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    assert (clone / "report/report.html").exists()
