"""The project's own jobs/ scripts submitted with sbatch to a real SLURM
(tests/slurm/start_cluster.sh starts a two-node one on this host; CI does)."""

import csv
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import h5py
import pytest
from conftest import harness, tiny_config, until, wait_for_rounds, write_config

from collafuse_hpc.runtime import checkpoint

ROOT = Path(__file__).resolve().parents[1]
CI_NODES = ["--partition=ci", "--gres=none", "--cpus-per-task=1"]  # override the GPU cluster lines

pytestmark = pytest.mark.slurm


@pytest.fixture(scope="module", autouse=True)
def slurm():
    try:
        ok = shutil.which("sbatch") and subprocess.run(["sinfo", "-h"], capture_output=True, timeout=20).returncode == 0
    except subprocess.TimeoutExpired:  # sinfo retries for a minute when no controller or config answers
        ok = False
    if not ok:
        reason = "no running SLURM (start one with: bash tests/slurm/start_cluster.sh DIR; export SLURM_CONF=...)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)


def _run(*args: str, **env: str) -> str:
    """stdout of a command run from the checkout (``env``: extra variables)."""
    return subprocess.run(
        args, cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, check=True, timeout=60
    ).stdout


def _job(jid: str) -> dict[str, str]:
    out = _run("scontrol", "show", "job", "-o", jid)
    return dict(re.findall(r"(\w+)=(\S*)", out))


def _wait(jid: str, states: set[str], timeout: float = 240) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = _job(jid)
        if info["JobState"] in states:
            return info
        time.sleep(1)
    raise AssertionError(f"job {jid} still {info['JobState']} after {timeout} s (wanted {states}): {info}")


def _config(tmp_path, shards, rounds, fault=None, **run):
    raw = tiny_config(shards, tmp_path / "unused", [0.2, 0.5], fault, rounds=rounds, **run)
    return write_config(tmp_path / "run.yaml", raw)


FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}


def _submit_train(
    tmp_path: Path, cfg: str, out: Path, env: dict[str, str] | None = None, script: str = "jobs/train.sbatch"
) -> str:
    """jobs/train.sbatch (or ``script``) on both nodes (1 server + 2 clients), with ``env`` added
    to the job's environment; returns the job id."""
    return _run(
        "sbatch",
        "--parsable",
        *CI_NODES,
        "--nodes=2",
        "--ntasks=3",
        "--ntasks-per-node=2",
        f"--output={tmp_path}/job.out",
        ",".join(["--export=ALL", f"OUTPUT_DIR={out}", *(f"{k}={v}" for k, v in (env or {}).items())]),
        script,
        cfg,
    ).strip()


def _train_running(tmp_path: Path, shards, rounds: int, fault: dict | None = None, **run) -> tuple[str, Path]:
    """jobs/train.sbatch submitted and past its 5th round; returns (job id, output folder)."""
    out = tmp_path / "out"
    jid = _submit_train(tmp_path, _config(tmp_path, shards, rounds, fault, **run), out)
    _wait(jid, {"RUNNING"}, timeout=60)
    wait_for_rounds(out / "parts/server_0.h5", 5)
    return jid, out


def test_two_node_train_job(tmp_path, shards):
    cfg = _config(tmp_path, shards, rounds=6)
    out = tmp_path / "out"
    jid = _submit_train(tmp_path, cfg, out)
    info = _wait(jid, FINAL)
    log = (tmp_path / "job.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-3000:]
    assert info["NodeList"] == "node[1-2]" and "launch: slurm, 3 ranks" in log
    with h5py.File(out / "results.h5") as f:
        assert list(f["server/rounds/round"][()]) == list(range(6))


@pytest.mark.timeout(600)
def test_study_job_array_submitted_again_runs_only_what_is_not_evaluated(tmp_path, shards):
    """jobs/study.sh --slurm into one STUDY_DIR, three times: all points, then the one whose
    run was lost (the evaluated one is not trained or evaluated again), then nothing; the
    report jobs' output accumulates."""
    study = tmp_path / "study"
    cfg = _config(tmp_path, shards, rounds=3)
    env = {"STUDY_DIR": str(study), "SEEDS": "0", "SPLITS": "markov", "CUTS": "0.2 1.0"}
    submit = ("bash", "jobs/study.sh", cfg, "--slurm", *CI_NODES, "--nodes=1", "--ntasks=3", "--ntasks-per-node=3")
    arrays = []
    try:
        for points in (2, 1):
            text = _run(*submit, **env)
            array, report = re.search(rf"array job (\d+) \({points} points\), report job (\d+)", text).groups()
            arrays.append(array)
            info = _wait(report, FINAL, timeout=400)
            assert info["JobState"] == "COMPLETED", (study / "report.out").read_text()[-2000:]
            with open(study / "report/table.csv") as f:
                pooled = [(row["c"], row["seeds"]) for row in csv.DictReader(f) if row["who"] == "pooled"]
            assert pooled == [("0.2", "1"), ("1.0", "1")]
            if points == 2:
                kept = (study / "c1.0-markov-s0/results.h5").read_bytes()
                shutil.rmtree(study / "c0.2-markov-s0")  # as if that run had been lost
        assert "c1.0-markov-s0 already evaluated" in text
        assert (study / "c1.0-markov-s0/results.h5").read_bytes() == kept  # not trained or evaluated again
        assert (study / "report.out").read_text().count("grids/, report.html") == 2  # appended, not replaced
        assert "every point is evaluated" in _run(*submit, **env)
    finally:
        for array in arrays:
            for log in (ROOT / "runs").glob(f"slurm-{array}_*.out"):
                log.unlink()


@pytest.mark.timeout(420)  # three runs evaluated at the end on 2 cores: 27 s in the suite, 43 s beside 2 workers
def test_sweep_job_array_and_dependent_report(tmp_path, shards):
    cfg = _config(tmp_path, shards, rounds=3)
    text = _run(
        "bash", "jobs/sweep.sh", cfg, *CI_NODES, "--nodes=1", "--ntasks=3", "--ntasks-per-node=3", CUTS="0.2 0.6 1.0"
    )
    array, report = re.search(r"array job (\d+) .* report job (\d+)", text).groups()
    try:
        info = _wait(report, FINAL, timeout=360)  # 4 to 5 minutes before the evaluation kept to run.threads
        sweep = ROOT / "runs" / f"sweep-{array}"
        assert info["JobState"] == "COMPLETED", (sweep / "report.out").read_text()[-2000:]
        for task in range(3):
            assert _job(f"{array}_{task}")["JobState"] == "COMPLETED"
        with open(sweep / "report/table.csv") as f:
            pooled = [row for row in csv.DictReader(f) if row["who"] == "pooled"]
        assert [(row["split"], row["c"], row["seeds"]) for row in pooled] == [
            ("markov", c, "1") for c in ("0.2", "0.6", "1.0")
        ]
        assert (sweep / "report/tradeoff.png").stat().st_size > 0
        for c, t_c in (("0.2", 4), ("0.6", 12), ("1.0", 20)):
            with h5py.File(sweep / f"c{c}/results.h5") as f:
                assert f["clients/c1"].attrs["t_c"] == t_c
                assert f["metrics/c1/disclosure"].attrs["t_c"] == t_c
    finally:
        shutil.rmtree(ROOT / "runs" / f"sweep-{array}", ignore_errors=True)
        for log in (ROOT / "runs").glob(f"slurm-{array}_*.out"):
            log.unlink()


@pytest.mark.parametrize(
    "fault", [None, {"rank": 0, "mode": "slow_write", "delay_s": 8}], ids=["fast-write", "slow-write"]
)
def test_usr1_checkpoints_requeues_and_the_requeued_job_finishes(tmp_path, shards, fault):
    """With a slow write too: rank 0 takes 8 s (more than run.stop_grace_s) for its file of
    the agreed set; the others wait, and the requeued job continues from that set."""
    rounds = 40  # the signal lands a round or two after round 5; the requeued job trains the rest
    jid, out = _train_running(tmp_path, shards, rounds, fault, log_every=1, checkpoint_every=0)
    _run("scancel", "--batch", "--signal=USR1", jid)  # what --signal=B:USR1@120 does before the time limit
    until(lambda: _job(jid).get("Restarts") == "1", 120)
    assert _job(jid)["Restarts"] == "1", (tmp_path / "job.out").read_text()[-3000:]
    _wait(jid, {"PENDING"}, timeout=60)
    # Skip SLURM's 2-minute requeue hold-off, but not within the same second as the
    # requeue: slurmd refuses a job credential no newer than the revoked one.
    time.sleep(3)
    _run("scontrol", "update", f"JobId={jid}", "StartTime=now")
    info = _wait(jid, FINAL)
    log = (tmp_path / "job.out").read_text()
    assert info["JobState"] == "COMPLETED", log[-3000:]
    stopped = int(re.search(r"stopped by SIGUSR1 after round (\d+)", log).group(1))
    assert 5 <= stopped < rounds and "requeueing job" in log
    assert f"resuming from the checkpoint set of round {stopped}" in log
    with h5py.File(out / "results.h5") as f:
        assert list(f["server/rounds/round"][()]) == list(range(rounds))


def test_usr1_before_a_slow_rank_catches_it_requeues(tmp_path, shards):
    """SLURM's USR1, forwarded by the batch script while rank 1's Python still starts
    (slowed on purpose: a busy shared file system), killed that rank: srun ended 138 or 143
    and the job was not requeued. Nothing was trained: the script says so, gives 75 and
    requeues."""
    cfg = _config(tmp_path, shards, rounds=400)
    jid = _submit_train(tmp_path, cfg, tmp_path / "out", harness.slow_start(tmp_path / "slow", rank=1, seconds=60))
    try:
        until(lambda: len(harness.rank_pids(cfg)) == 3, 120, "srun starting 3 tasks")
        _run("scancel", "--batch", "--signal=USR1", jid)
        until(lambda: _job(jid).get("Restarts") == "1", 60, "the requeue")
    finally:
        log = (tmp_path / "job.out").read_text()
        _run("scancel", jid)  # the requeued job would start slowly again: what matters is the requeue
    assert re.search(r"died of SIG(USR1|TERM) while it was still starting", log), log[-3000:]
    assert "requeueing job" in log, log[-3000:]
    assert not (tmp_path / "out/results.h5").exists()


def _log_has(tmp_path: Path, text: str, count: int = 1) -> bool:
    return (tmp_path / "job.out").exists() and (tmp_path / "job.out").read_text().count(text) >= count


def _slow_module_line(tmp_path: Path) -> str:
    """jobs/train.sbatch with its module line made slow: it makes preparing-<restart> in
    ``tmp_path`` and waits for go-<restart> there; returns the script's path."""
    train = (ROOT / "jobs/train.sbatch").read_text()
    module_line = "# module load cuda/12.4 python/3.11   # cluster specific"
    assert module_line in train  # the line a user edits for their cluster
    n = "${SLURM_RESTART_COUNT:-0}"
    wait = f"touch {tmp_path}/preparing-{n}; until [ -e {tmp_path}/go-{n} ]; do sleep 0.2; done"
    script = tmp_path / "train.sbatch"
    script.write_text(train.replace(module_line, wait))
    return str(script)


def _start_now(jid: str) -> None:
    """Skip SLURM's requeue hold-off (up to 2 minutes) of a requeued job that still waits."""
    time.sleep(3)  # not in the requeue's second: slurmd refuses a credential no newer than the revoked one
    if _job(jid)["JobState"] == "PENDING":
        subprocess.run(["scontrol", "update", f"JobId={jid}", "StartTime=now"], capture_output=True, timeout=60)


def _stop_while_preparing(tmp_path: Path, jid: str, sig: str, restart: int) -> None:
    until(lambda: (tmp_path / f"preparing-{restart}").exists(), 120, f"the module line of restart {restart}")
    _run("scancel", "--batch", f"--signal={sig}", jid)
    until(lambda: _log_has(tmp_path, f"got {sig} (restart {restart})"), 60, f"the script's trap of {sig}")
    (tmp_path / f"go-{restart}").touch()


@pytest.mark.parametrize("sig", ["USR1", "TERM"])
def test_a_stop_while_the_batch_script_still_prepares_stops_it_cleanly(tmp_path, shards, sig):
    """A stop while the script still runs its cluster-specific lines (a slow module load)
    killed the script before it set its traps: no requeue, no exit 75. Now no job step
    starts; USR1 requeues the job, TERM ends it with 75. A requeued job stopped again before
    anything was trained (a --time shorter than --signal's lead) is not requeued again: it
    looped."""
    jid = _submit_train(
        tmp_path, _config(tmp_path, shards, rounds=4), tmp_path / "out", script=_slow_module_line(tmp_path)
    )
    try:
        _stop_while_preparing(tmp_path, jid, sig, 0)
        if sig == "USR1":
            until(lambda: _job(jid).get("Restarts") == "1", 60, "the requeue")
            _start_now(jid)
            _stop_while_preparing(tmp_path, jid, sig, 1)
        info = _wait(jid, FINAL, timeout=60)
    finally:
        log = (tmp_path / "job.out").read_text()
        _run("scancel", jid)
    assert info["ExitCode"] == "75:0", log[-3000:]
    assert log.count(f"{sig} before the job step started: no step starts") == (2 if sig == "USR1" else 1), log
    if sig == "USR1":
        assert "requeueing job" in log and "not requeued again, which could repeat" in log, log[-3000:]
        assert info["Restarts"] == "1"
    else:
        assert "not requeued (stopped by TERM/INT)" in log and info["Restarts"] == "0", log[-3000:]
    assert not (tmp_path / "out").exists()  # no step started: nothing was written


def test_a_requeued_job_that_trained_is_requeued_again_at_its_next_stop(tmp_path, shards):
    """The rule that ends a requeue loop (a requeued job stopped again before its allocation
    trained a round) must not refuse a job that did train: USR1, requeue, train on, USR1
    again: requeued a second time, and each allocation left a newer checkpoint set."""
    jid, out = _train_running(tmp_path, shards, 100_000, log_every=1, checkpoint_every=0)
    try:
        _run("scancel", "--batch", "--signal=USR1", jid)
        until(lambda: _job(jid).get("Restarts") == "1", 120, "the first requeue")
        first = checkpoint.complete_rounds(str(out))[-1]
        _start_now(jid)
        wait_for_rounds(out / "parts/server_0.h5", first + 4, timeout=240)
        _run("scancel", "--batch", "--signal=USR1", jid)
        until(lambda: _job(jid).get("Restarts") == "2", 120, "the second requeue")
    finally:
        log = (tmp_path / "job.out").read_text()
        _run("scancel", jid)
    assert "not requeued again" not in log and log.count("requeueing job") == 2, log[-3000:]
    assert checkpoint.complete_rounds(str(out))[-1] > first


def test_a_stop_while_srun_still_creates_the_step_reaches_the_ranks(tmp_path, shards):
    """USR1 forwarded while srun still created the job step (busy nodes, a slow controller)
    went to a job without a step and reached no rank: the job trained on to its time limit,
    unrequeued. The script sends it again until the step exists: the ranks stop (at a round
    boundary, before training, or die while starting: exit 75 each) and the job is requeued."""
    real = shutil.which("srun")
    wrapper = tmp_path / "bin/srun"
    wrapper.parent.mkdir()
    wrapper.write_text(
        f"#!/usr/bin/env bash\ntouch {tmp_path}/srun-called\n"
        f'until [ -e {tmp_path}/go-srun ]; do sleep 0.2; done\nexec {real} "$@"\n'
    )
    wrapper.chmod(0o755)
    path = {"PATH": f"{wrapper.parent}:{os.environ['PATH']}"}
    jid = _submit_train(tmp_path, _config(tmp_path, shards, rounds=400), tmp_path / "out", path)
    try:
        until(lambda: (tmp_path / "srun-called").exists(), 120, "srun")
        _run("scancel", "--batch", "--signal=USR1", jid)
        until(lambda: _log_has(tmp_path, "got USR1 (restart 0)"), 60, "the script's trap of USR1")
        (tmp_path / "go-srun").touch()
        until(lambda: _job(jid).get("Restarts") == "1", 120, "the requeue")
    finally:
        log = (tmp_path / "job.out").read_text()
        _run("scancel", jid)  # what matters is the stop and the requeue
    assert "USR1, ranks stop at the next round boundary" in log and "requeueing job" in log, log[-3000:]
    stopped = r"stopped by SIGUSR1 (after round|before training)|died of SIG(USR1|TERM) while it was still starting"
    assert re.search(stopped, log), log[-3000:]


def test_heterogeneous_job_server_component_and_client_component(tmp_path, shards):
    """jobs/hetero.sbatch: 1 server task (component 0) + 5 client tasks (component 1)."""
    raw = tiny_config([shards[k % 4] for k in range(5)], tmp_path / "unused", [0.2, 0.4, 0.6, 0.8, 1.0], rounds=3)
    cfg = write_config(tmp_path / "run.yaml", raw)
    out = tmp_path / "out"
    both = {"SBATCH_PARTITION": "ci", "SBATCH_GRES": "none"}  # for both components
    args = ("--parsable", f"--output={tmp_path}/job.out", f"--export=ALL,OUTPUT_DIR={out}", "jobs/hetero.sbatch", cfg)
    jid = _run("sbatch", *args, **both).strip().split("+")[0]
    info = _wait(jid, FINAL)
    log = (tmp_path / "job.out").read_text()
    assert info["JobState"] == "COMPLETED", log[-3000:]
    assert "launch: slurm, 6 ranks (1 servers, 5 clients)" in log
    with h5py.File(out / "results.h5") as f:
        assert f["server"].attrs["rank"] == 0 and f["clients/c4"].attrs["rank"] == 5


def test_scancel_without_a_signal_leaves_a_checkpoint_set_to_continue_from(tmp_path, shards):
    """scancel sends SIGTERM to every step's tasks (then SIGKILL after KillWait): the ranks
    stop at a round boundary with a complete checkpoint set; the job ends CANCELLED."""
    rounds = 400
    jid, out = _train_running(tmp_path, shards, rounds, log_every=1, checkpoint_every=0)
    _run("scancel", jid)
    info = _wait(jid, FINAL, timeout=120)
    log = (tmp_path / "job.out").read_text()
    assert info["JobState"] == "CANCELLED", log[-3000:]
    until(lambda: checkpoint.complete_rounds(str(out)), 30)  # the tasks outlive the batch shell
    (stopped,) = checkpoint.complete_rounds(str(out))
    assert 5 <= stopped < rounds, log[-3000:]
    for rank in range(3):
        checkpoint.load_rank(str(out), stopped, rank)


def test_time_limit_with_signal_usr1_to_the_tasks_checkpoints_and_requeues(tmp_path, shards):
    """--signal=USR1@N without B: sends USR1 to the job's steps before the time limit; the
    tasks stop with exit 75, their newest complete set is the stop's round, and the batch
    script requeues the job. Here every round writes a set (see below): that a stop writes
    its own set when none is due is what the TERM/INT and USR1 requeue tests check."""
    # outlasts the limit; rank 0 writes each round's checkpoint set 3 s slower, so the job
    # waits for the signal instead of training flat out until it comes (12 to 19 s of CPU)
    slow = {"rank": 0, "mode": "slow_write", "delay_s": 3}
    cfg = _config(tmp_path, shards, rounds=100_000, fault=slow, log_every=10, checkpoint_every=1)
    out = tmp_path / "out"
    jid = _run(
        "sbatch",
        "--parsable",
        *CI_NODES,
        "--nodes=1",
        "--ntasks=3",
        "--time=2",
        # due 60 s after the start. SLURM checks time limits every 30 s and sends the signal up to
        # 30 s early: at @75 (due at 45 s) it came about 20 s after the start, when on busy cores
        # the ranks may not train yet
        "--signal=USR1@60",
        f"--output={tmp_path}/job.out",
        f"--export=ALL,OUTPUT_DIR={out}",
        "jobs/train.sbatch",
        cfg,
    ).strip()
    until(lambda: _job(jid).get("Restarts") == "1", 180)
    log = (tmp_path / "job.out").read_text()
    assert _job(jid)["Restarts"] == "1", log[-3000:]
    stopped = int(re.search(r"stopped by SIGUSR1 after round (\d+)", log).group(1))
    assert checkpoint.complete_rounds(str(out))[-1] == stopped and "requeueing job" in log
    _run("scancel", jid)  # the requeued job would meet the same time limit: what matters is the requeue


@pytest.mark.parametrize("sig", ["TERM", "INT"])
def test_a_signal_to_the_job_steps_checkpoints_and_requeues(tmp_path, shards, sig):
    """scancel --signal=TERM|INT (no --batch) reaches srun and the tasks: the ranks stop at a
    round boundary with exit 75 and the batch script requeues the job."""
    jid, out = _train_running(tmp_path, shards, 100_000, log_every=10, checkpoint_every=0)
    _run("scancel", f"--signal={sig}", jid)
    until(lambda: _job(jid).get("Restarts") == "1", 120)
    log = (tmp_path / "job.out").read_text()
    _run("scancel", jid)  # what matters is the stop and the requeue
    stopped = int(re.search(rf"stopped by SIG{sig} after round (\d+)", log).group(1))
    assert checkpoint.complete_rounds(str(out))[-1] == stopped and "requeueing job" in log, log[-3000:]


@pytest.mark.parametrize("sig", ["TERM", "INT"])
def test_a_signal_to_the_batch_script_stops_the_ranks_with_a_checkpoint_set(tmp_path, shards, sig):
    jid, out = _train_running(tmp_path, shards, 400, log_every=1, checkpoint_every=0)
    _run("scancel", "--batch", f"--signal={sig}", jid)
    info = _wait(jid, FINAL, timeout=120)
    log = (tmp_path / "job.out").read_text()
    assert info["ExitCode"] == "75:0" and "not requeued (stopped by TERM/INT)" in log, log[-3000:]
    (stopped,) = checkpoint.complete_rounds(str(out))
    assert re.search(rf"stopped by SIGTERM after round {stopped}", log)


def test_a_federated_job_checkpoints_on_usr1_requeues_finishes_samples_and_evaluates(tmp_path, shards):
    """run.method=federated under jobs/train.sbatch on both nodes: SLURM's USR1 stops it
    with a checkpoint set, the requeued job resumes from it, trains every round, samples
    (the fine-tuned and the global model) and evaluates them (eval.at_end)."""
    rounds = 40  # the signal lands a round or two after round 5; the requeued job trains the rest
    raw = tiny_config(shards, tmp_path / "unused", [0.2, 0.5], rounds=rounds, log_every=1, method="federated")
    raw["federated"] = {"local_steps": 1, "finetune_steps": 2}
    raw["eval"].update(at_end=True, sets=["collaborative", "global"])
    out = tmp_path / "out"
    jid = _submit_train(tmp_path, write_config(tmp_path / "run.yaml", raw), out)
    _wait(jid, {"RUNNING"}, timeout=60)
    wait_for_rounds(out / "parts/server_0.h5", 5)
    _run("scancel", "--batch", "--signal=USR1", jid)
    until(lambda: _job(jid).get("Restarts") == "1", 120)
    _wait(jid, {"PENDING"}, timeout=60)
    time.sleep(3)  # as above: slurmd refuses a credential no newer than the revoked one
    _run("scontrol", "update", f"JobId={jid}", "StartTime=now")
    info = _wait(jid, FINAL)
    log = (tmp_path / "job.out").read_text()
    assert info["JobState"] == "COMPLETED", log[-3000:]
    stopped = int(re.search(r"stopped by SIGUSR1 after round (\d+)", log).group(1))
    assert 5 <= stopped < rounds and f"resuming from the checkpoint set of round {stopped}" in log
    with h5py.File(out / "results.h5") as f:
        assert list(f["server/rounds/round"][()]) == list(range(rounds))
        assert f["clients/c0/audit"].attrs["messages_sent"] == rounds  # one update a round, none lost or doubled
        for cid in ("c0", "c1"):
            assert len(f[f"clients/{cid}/samples/images"]) == len(f[f"clients/{cid}/samples/images_global"]) > 0
            assert {"collaborative", "global"} <= set(f[f"metrics/{cid}"]), cid
        assert f["metrics"].attrs["checkpoint_round"] == rounds
