"""Preemption (stop at a round boundary, checkpoint, resume) and the output-folder lock."""

import errno
import json
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import file_tree, harness, mpirun, run_mpi, spawn_ranks, tiny_config, until, wait_for_rounds, write_config

from collafuse_hpc.cli import main
from collafuse_hpc.config import from_dict
from collafuse_hpc.runtime import checkpoint
from collafuse_hpc.runtime.preemption import EXIT_REQUEUE, Preempted, StopRequest
from collafuse_hpc.runtime.run import run_in_process
from collafuse_hpc.runtime.watchdog import Watchdog

ROOT = Path(__file__).resolve().parents[1]


def _losses(out):
    with h5py.File(out / "results.h5") as f:
        return {
            key: {n: f[key]["rounds"][n][()] for n in ("loss_local", "loss_server") if n in f[key]["rounds"]}
            for key in ("server", "clients/c0", "clients/c1")
        }


def _assert_same_losses(a, b):
    for key in a:
        for name in a[key]:
            np.testing.assert_allclose(a[key][name], b[key][name], rtol=1e-5, equal_nan=True, err_msg=key + name)


@pytest.mark.slow
def test_stop_request_checkpoints_and_resume_matches_an_uninterrupted_run(tmp_path, shards):
    full = tiny_config(shards, tmp_path / "full", [0.2, 0.5], rounds=6, checkpoint_every=0)
    run_in_process(from_dict(full), resume=False)
    raw = tiny_config(shards, tmp_path / "cut", [0.2, 0.5], rounds=6, checkpoint_every=0, stop_check_every=2)
    stop = StopRequest()
    stop.signal_name = "SIGUSR1"  # as if the signal had arrived during round 0
    # posted at the check after round 2, read at the next check (round 4): one interval later
    with pytest.raises(Preempted, match="stopped by SIGUSR1 after round 4"):
        run_in_process(from_dict(raw), resume=False, stop=stop)
    assert checkpoint.complete_rounds(str(tmp_path / "cut")) == [4]
    assert not (tmp_path / "cut/.lock").exists()
    run_in_process(from_dict(raw), resume=True)
    _assert_same_losses(_losses(tmp_path / "full"), _losses(tmp_path / "cut"))


def test_a_live_lock_of_another_job_refuses_the_folder_and_a_dead_one_is_taken_over(tmp_path, shards):
    raw = tiny_config(shards, tmp_path / "out", [0.2, 0.5], rounds=1)
    os.makedirs(tmp_path / "out")
    lock = tmp_path / "out/.lock"
    lock.write_text(json.dumps({"job": "other", "host": socket.gethostname(), "pid": os.getpid()}))
    with pytest.raises(ValueError, match="is in use by job 'other'"):
        run_in_process(from_dict(raw), resume=False)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(json.dumps({"job": "other", "host": socket.gethostname(), "pid": dead.pid}))
    run_in_process(from_dict(raw), resume=False)
    assert not lock.exists()


def _take_lock(folder: str, job: str, start, said) -> None:
    """One job's rank 0 taking the run lock when ``start`` lets every job go, and holding
    it until every job has tried (a run holds it while it trains)."""
    from collafuse_hpc.runtime.lock import RunLock

    start.wait()
    try:
        lock = RunLock(folder, job)
    except ValueError as e:
        said.put(str(e))
        start.wait()
        return
    said.put("took it")
    start.wait()
    lock.release()


def _race_for_lock(folder: str, jobs: int) -> list[str]:
    """What each of ``jobs`` processes, released at one instant, got taking the run lock of
    ``folder``: "took it" or the refusal's message, sorted (refusals first)."""
    context = multiprocessing.get_context("fork")
    start, said = context.Barrier(jobs, timeout=60), context.Queue()
    racers = [
        context.Process(target=_take_lock, args=(folder, f"job{i}", start, said), daemon=True) for i in range(jobs)
    ]
    for racer in racers:
        racer.start()
    try:
        return sorted(said.get(timeout=60) for _ in racers)
    finally:
        for racer in racers:
            racer.join(timeout=60)
            racer.terminate()


def test_of_two_jobs_started_together_into_one_folder_one_takes_it_and_the_other_is_refused(tmp_path):
    """Both checked that no lock was there, then both wrote theirs: two jobs trained into
    one folder (6 of 20 tries). Two processes released at one instant, 30 times."""
    for attempt in range(30):
        folder = str(tmp_path / f"run{attempt}")
        outcomes = _race_for_lock(folder, 2)
        assert outcomes[1] == "took it" and "is in use by job 'job" in outcomes[0], outcomes
        assert os.listdir(folder) == [], "the lock is released, and nothing is left beside it"


def test_of_jobs_finding_one_dead_jobs_lock_together_one_takes_it_over_and_the_others_are_refused(tmp_path):
    """A requeued job and a second job started into its folder both find the dead job's
    lock: both checked that it was abandoned, then both replaced it (26 of 30 tries).
    Three processes released at one instant, 30 times."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for attempt in range(30):
        folder = str(tmp_path / f"run{attempt}")
        os.makedirs(folder)
        with open(os.path.join(folder, ".lock"), "w") as f:
            json.dump({"job": "dead", "host": socket.gethostname(), "pid": dead.pid}, f)
        outcomes = _race_for_lock(folder, 3)
        assert outcomes[2] == "took it", outcomes
        assert all("in use by job 'job" in o for o in outcomes[:2]), outcomes
        assert os.listdir(folder) == [], "the lock is released, and no marker is left beside it"


def test_a_takeover_left_by_a_job_that_died_during_it_is_named_with_what_to_remove(tmp_path):
    """A marker of a takeover under way is waited for; one its taker left (killed between
    two system calls) refuses the folder, in the dry run too, naming what to remove."""
    from collafuse_hpc.runtime.lock import STALE_S, RunLock, check

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = tmp_path / ".lock"
    lock.write_text(json.dumps({"job": "dead", "host": socket.gethostname(), "pid": dead.pid}))
    st = lock.stat()
    marker = tmp_path / f".lock.takeover-{st.st_ino}-{st.st_mtime_ns}"
    marker.write_text(json.dumps({"job": "taker", "host": socket.gethostname(), "pid": dead.pid}))
    os.utime(marker, (time.time() - STALE_S + 1,) * 2)  # under way for a second more
    check(str(tmp_path), "mine")
    t0 = time.monotonic()
    with pytest.raises(ValueError, match=f"died while doing so; if no job runs there, remove '{marker}'"):
        RunLock(str(tmp_path), "mine")
    assert 0.5 < time.monotonic() - t0 < 10, "it waited for the taker until its marker was stale"
    with pytest.raises(ValueError, match=f"remove '{marker}'"):  # what train --dry-run calls
        check(str(tmp_path), "mine")
    assert sorted(os.listdir(tmp_path)) == [".lock", marker.name], "a refused job changes nothing"
    marker.unlink()
    RunLock(str(tmp_path), "mine").release()
    assert os.listdir(tmp_path) == []


def test_a_job_that_lost_its_lock_while_stalled_stops_touching_it_and_leaves_it(tmp_path, monkeypatch, caplog):
    """A job stalled past STALE_S (suspended) loses its folder to another: its heartbeat
    kept the new owner's lock fresh, and its release removed it, letting a third job in.
    A takeover marker of a lock that is gone is cleared, not refused for good."""
    from collafuse_hpc.runtime import lock as run_lock

    monkeypatch.setattr(run_lock, "HEARTBEAT_S", 0.05)
    mine = run_lock.RunLock(str(tmp_path), "mine")
    other = json.dumps({"job": "other", "host": socket.gethostname(), "pid": os.getpid()})
    (tmp_path / "new").write_text(other)
    os.replace(tmp_path / "new", tmp_path / ".lock")  # as a takeover writes it
    with caplog.at_level("WARNING", logger="collafuse_hpc"):
        until(lambda: "is no longer this job's" in caplog.text, timeout=10, what="the heartbeat noticing")
    mine.release()
    assert (tmp_path / ".lock").read_text() == other
    (tmp_path / ".lock").unlink()
    gone = tmp_path / ".lock.takeover-1-2"  # its taker stopped after replacing the lock
    gone.write_text(other)
    os.utime(gone, (time.time() - run_lock.STALE_S - 1,) * 2)
    run_lock.check(str(tmp_path), "mine", tidy=False)  # a dry run's: it writes nothing
    assert os.listdir(tmp_path) == [gone.name]
    run_lock.check(str(tmp_path), "mine")
    assert os.listdir(tmp_path) == []
    caplog.clear()
    mine = run_lock.RunLock(str(tmp_path), "mine")  # its lock removed by hand: put back, no takeover said
    (tmp_path / ".lock").unlink()
    until(lambda: (tmp_path / ".lock").exists(), timeout=10, what="the heartbeat putting the lock back")
    assert json.loads((tmp_path / ".lock").read_text())["job"] == "mine" and "no longer" not in caplog.text
    mine.release()
    assert os.listdir(tmp_path) == []


def test_write_new_is_exclusive_without_hard_links_and_takes_a_link_made_before_an_eexist(tmp_path, monkeypatch):
    from collafuse_hpc.atomic import write_new

    link = os.link

    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    with monkeypatch.context() as m:
        m.setattr(os, "link", no_links)
        assert write_new(str(tmp_path / "a"), "first") and not write_new(str(tmp_path / "a"), "second")
    assert (tmp_path / "a").read_text() == "first"

    def made_then_eexist(src, dst):  # NFS: a retransmitted link that was made answers EEXIST
        link(src, dst)
        raise FileExistsError(errno.EEXIST, "File exists")

    monkeypatch.setattr(os, "link", made_then_eexist)
    assert write_new(str(tmp_path / "b"), "mine") and (tmp_path / "b").read_text() == "mine"
    assert sorted(os.listdir(tmp_path)) == ["a", "b"]


@pytest.mark.parametrize("content", ["", "{not json", "[1, 2]", "folder"])
def test_a_lock_that_cannot_be_read_is_refused_while_fresh_and_taken_over_once_stale(tmp_path, content):
    """An empty or corrupt lock made RunLock retry forever at full CPU; a folder in its
    place (or another user's lock, mode 0600) too."""
    from collafuse_hpc.runtime.lock import STALE_S, RunLock

    lock = tmp_path / ".lock"
    if content == "folder":
        lock.mkdir()
        with pytest.raises(ValueError, match=r"cannot read the run lock .*\.lock' \(Is a directory\)"):
            RunLock(str(tmp_path), "mine")
        return
    lock.write_text(content)
    with pytest.raises(ValueError, match="is in use by a job its lock does not name .lock touched 0 s ago"):
        RunLock(str(tmp_path), "mine")
    os.utime(lock, (time.time() - STALE_S - 1,) * 2)
    RunLock(str(tmp_path), "mine").release()
    assert os.listdir(tmp_path) == []


@pytest.mark.mpi
def test_sigusr1_to_mpirun_stops_checkpoints_exits_for_requeue_and_resumes(tmp_path, shards):
    rounds = 20  # the stop lands a round or two after round 3; the resume trains the rest
    raw = tiny_config(shards, tmp_path / "out", [0.2, 0.5], rounds=rounds, log_every=1, checkpoint_every=0)
    cfg = write_config(tmp_path / "run.yaml", raw)
    mpirun()
    proc = harness.start_mpi(3, ["train", cfg], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_rounds(tmp_path / "out/parts/server_0.h5", 3)
    proc.send_signal(signal.SIGUSR1)
    t0 = time.monotonic()
    out, err = proc.communicate(timeout=90)
    assert proc.returncode == EXIT_REQUEUE, err[-3000:]
    assert time.monotonic() - t0 < 30
    assert "stopped by SIGUSR1 after round" in err
    (stopped,) = checkpoint.complete_rounds(str(tmp_path / "out"))
    assert 3 <= stopped < rounds
    proc = run_mpi(3, ["train", cfg, "--resume"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resuming from the checkpoint set of round {stopped}" in proc.stderr
    with h5py.File(tmp_path / "out/results.h5") as f:
        assert list(f["server/rounds/round"][()]) == list(range(rounds))
        for key in ("server", "clients/c0", "clients/c1"):  # the stopped invocation's rounds count in the run's
            assert (f[f"{key}/summary"].attrs["rounds_run"], f[f"{key}/summary"].attrs["invocations"]) == (rounds, 2)
        assert f["records/0"].attrs["finished"]


SLOW_RANK0 = {"rank": 0, "mode": "slow_write", "delay_s": 8}  # longer than run.stop_grace_s (5 s)


@pytest.mark.mpi
def test_sigusr1_to_mpirun_keeps_the_agreed_set_that_rank_0_writes_slower_than_the_grace(tmp_path, shards):
    """A large optimizer state on a parallel file system: rank 0 takes 8 s to write its file
    of the agreed set. The ranks waiting for it at the barrier keep waiting, and the set
    completes: with checkpoint_every 0 the requeued job would otherwise start from round 0."""
    raw = tiny_config(shards, tmp_path / "out", [0.2, 0.5], SLOW_RANK0, rounds=40, log_every=1, checkpoint_every=0)
    cfg = write_config(tmp_path / "run.yaml", raw)
    mpirun()
    proc = harness.start_mpi(3, ["train", cfg], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_rounds(tmp_path / "out/parts/server_0.h5", 3)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=90)
    assert proc.returncode == EXIT_REQUEUE, err[-3000:]
    assert "stopped by SIGUSR1 after round" in err and "no progress" not in err, err[-3000:]
    (stopped,) = checkpoint.complete_rounds(str(tmp_path / "out"))
    for rank in range(3):
        checkpoint.load_rank(str(tmp_path / "out"), stopped, rank)


@pytest.mark.slow
def test_a_signal_while_a_resuming_rank_cuts_its_part_file_back_waits_for_the_cut(tmp_path, shards):
    """On a resume each rank cuts its part file back to the rounds before the set (they run
    again). The server takes 8 s for it; a signal to it then ends it (exit 75) only after
    the cut: never inside an HDF5 write."""
    out = tmp_path / "out"
    raw = tiny_config(shards, out, [0.2, 0.5], rounds=6, log_every=1, checkpoint_every=2, keep_checkpoints=3)
    run_in_process(from_dict(raw), resume=False)
    shutil.rmtree(checkpoint.set_dir(str(out), 6))  # as if the run had stopped before its last set
    raw.update(fault=SLOW_RANK0)
    raw["run"]["rounds"] = 40
    procs = spawn_ranks(3, ["train", write_config(tmp_path / "run.yaml", raw), "--resume"], tmp_path / "logs")
    try:
        until(lambda: "writes 8 s slower" in (tmp_path / "logs/rank0.err").read_text(), what="the slow write")
        procs[0].send_signal(signal.SIGUSR1)
        assert procs[0].wait(timeout=60) == EXIT_REQUEUE, (tmp_path / "logs/rank0.err").read_text()[-2000:]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    with h5py.File(out / "parts/server_0.h5") as f:
        assert list(f["rounds/round"][()]) == [0, 1, 2, 3]


@pytest.mark.slow
def test_a_truncated_checkpoint_falls_back_to_the_previous_set(tmp_path, shards, caplog):
    caplog.set_level(logging.INFO, logger="collafuse_hpc")
    full = tiny_config(shards, tmp_path / "full", [0.2, 0.5], rounds=6, checkpoint_every=0)
    run_in_process(from_dict(full), resume=False)
    raw = tiny_config(shards, tmp_path / "cut", [0.2, 0.5], rounds=4, checkpoint_every=2, keep_checkpoints=3)
    run_in_process(from_dict(raw), resume=False)
    assert checkpoint.complete_rounds(str(tmp_path / "cut")) == [2, 4]
    victim = tmp_path / "cut/checkpoints/round_00000004/rank1.pt"
    victim.write_bytes(victim.read_bytes()[:100])  # truncated, as by a full disk
    raw["run"]["rounds"] = 6
    run_in_process(from_dict(raw), resume=True)
    assert "rank1.pt' is damaged" in caplog.text and "rounds 3..4 are trained again" in caplog.text
    assert "resuming from the checkpoint set of round 2" in caplog.text
    _assert_same_losses(_losses(tmp_path / "full"), _losses(tmp_path / "cut"))


def test_gpu_ranks_beyond_the_node_gpus_are_refused(monkeypatch):
    from collafuse_hpc.runtime.launch import Launch, resolve_device

    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 1)
    launch = Launch(
        rank=3, world_size=4, local_rank=1, local_world_size=2, master_addr="x", master_port=1, source="slurm"
    )
    with pytest.raises(ValueError, match="rank 3 is local rank 1 on a node with 1 GPU"):
        resolve_device("cuda", launch)


def test_watchdog_fires_only_without_progress():
    dog = Watchdog("rank 1 (client 'c0')", limit_s=100, on_stall=lambda report: None)
    dog.beat("round 3")
    beat = time.monotonic()
    assert dog.stalled(beat + 99) is None  # progress within the limit: nothing
    assert dog.stalled(beat + 101) == "rank 1 (client 'c0'): no progress for 101 s during round 3; aborting this rank"
    dog.beat("round 4")
    assert dog.stalled(time.monotonic() + 99) is None  # a later beat restarts the clock
    dog.stop()
    fired = threading.Event()  # and its thread acts on a stall: no beat at all, a short limit
    Watchdog("rank 2", limit_s=0.2, on_stall=lambda report: fired.set())
    assert fired.wait(30)


def test_a_reader_of_a_live_run_never_blocks_the_writer(tmp_path):
    """h5dump, tools/ or a notebook holding a part file open (with HDF5's lock)
    must not make a training rank fail on its next flush."""
    from collafuse_hpc.results.writer import RoleResults

    path = tmp_path / "parts/server_0.h5"
    results = RoleResults(str(path), {"role": "server"})
    results.log({"round": 0, "loss_server": 1.0})
    results.flush()
    reader = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import h5py, time; f = h5py.File({str(path)!r}, 'r'); print('open', flush=True); time.sleep(10)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert reader.stdout.readline().strip() == "open"
        results.log({"round": 1, "loss_server": 0.5})
        results.flush()
    finally:
        reader.kill()
    with h5py.File(path, "r") as f:
        assert list(f["rounds/round"][()]) == [0, 1]


@pytest.mark.slow
def test_resume_mistakes_are_refused_before_anything_is_written(tmp_path, shards, capsys, caplog):
    caplog.set_level(logging.INFO, logger="collafuse_hpc")
    raw = tiny_config(shards, tmp_path / "out", [0.25, 0.5], rounds=4, checkpoint_every=2)
    config = write_config(tmp_path / "run.yaml", raw)
    assert main(["train", config, "--in-process"]) == 0
    before = file_tree(tmp_path / "out")
    mistakes = {  # what the user changed -> what the refusal must name
        ("--set", "server.model.base_channels=16"): "server.model.base_channels: 8 -> 16",
        ("--set", "clients.0.cut_ratio=0.5"): "clients.0.cut_ratio: 0.25 -> 0.5",
        ("--set", "run.seed=1"): "run.seed: 0 -> 1",
        ("--set", "run.rounds=2"): "has finished 4 rounds, but run.rounds is 2; rounds are never undone",
        ("--set", "run.output_dir=" + str(tmp_path / "elsewhere")): "there is no checkpoints folder",
        ("--set", f"clients.0.shard={shards[2]}"): f"client 'c0' trained on {shards[0]!r} (content_hash",
    }
    for args, message in mistakes.items():
        assert main(["train", config, "--in-process", "--resume", *args]) == 2, args
        assert message in capsys.readouterr().err, args
    assert file_tree(tmp_path / "out") == before and not (tmp_path / "elsewhere").exists()
    # keys that do not change what the run trains may change; results.h5 then records them
    moved = shutil.copy(shards[0], tmp_path / "staged_c0.h5")  # the same images elsewhere: may move
    more = [
        "--set",
        "run.rounds=6",
        "--set",
        "run.log_every=3",
        "--set",
        "eval.images=4",
        "--set",
        f"clients.0.shard={moved}",
    ]
    (tmp_path / "out/checkpoints/round_00000003").mkdir()  # left half-written by a crash: never resumable
    assert main(["train", config, "--in-process", "--resume", *more]) == 0
    with h5py.File(tmp_path / "out/results.h5") as f:
        assert "rounds: 6" in f.attrs["config"] and len(f["server/rounds/round"]) == 6
    assert sorted(p.name for p in (tmp_path / "out/checkpoints").iterdir()) == ["round_00000004", "round_00000006"]
    other = ["--set", "run.rounds=7", "--set", f"clients.0.shard={shards[2]}"]  # other images, on purpose
    assert main(["train", config, "--in-process", "--resume", *other, "--set", "clients.0.allow_new_shard=true"]) == 0
    # --resume=auto starts a run that has no checkpoint yet, and continues one that has
    fresh = ["--set", "run.output_dir=" + str(tmp_path / "fresh")]
    caplog.clear()
    assert main(["train", config, "--in-process", "--resume=auto", *fresh]) == 0
    assert "resuming" not in caplog.text
    assert main(["train", config, "--in-process", "--resume=auto", *fresh, "--set", "run.rounds=6"]) == 0
    assert "resuming from the checkpoint set of round 4" in caplog.text


def _launch(launcher: str, cfg: str, tmp_path) -> list[subprocess.Popen]:
    """The run's processes: the launcher first (local.sh, mpirun) or every rank (torchrun-style)."""
    if launcher == "ranks":
        return spawn_ranks(3, ["train", cfg], tmp_path / "logs")
    if launcher == "mpirun":
        return [harness.start_mpi(3, ["train", cfg], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)]
    env = harness.mpi_env(MPIRUN=mpirun(), VENV=str(Path(sys.executable).parent.parent))
    cmd = ["bash", str(ROOT / "jobs/local.sh"), "3", "train", cfg]
    return [subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)]


# (launcher, signal, who gets it, exit status): the ways a run is stopped by a person, a
# scheduler or a launcher. mpirun kills its ranks at once on SIGTERM/SIGINT; there the
# newest complete checkpoint set must stay intact and the run continue from it.
SIGNAL_MATRIX = [
    ("local.sh", signal.SIGTERM, "launcher", EXIT_REQUEUE),
    ("local.sh", signal.SIGINT, "launcher", EXIT_REQUEUE),
    ("ranks", signal.SIGTERM, "every rank", EXIT_REQUEUE),
    ("ranks", signal.SIGINT, "one client", EXIT_REQUEUE),
    ("mpirun", signal.SIGTERM, "launcher", "killed"),
]


@pytest.mark.mpi
@pytest.mark.parametrize("launcher, sig, target, expected", SIGNAL_MATRIX, ids=lambda v: getattr(v, "name", str(v)))
def test_a_signal_mid_training_keeps_a_complete_checkpoint_set_to_continue_from(
    tmp_path, shards, launcher, sig, target, expected
):
    rounds = 200
    raw = tiny_config(shards, tmp_path / "out", [0.2, 0.5], rounds=rounds, log_every=1, checkpoint_every=2)
    cfg = write_config(tmp_path / "run.yaml", raw)
    procs = _launch(launcher, cfg, tmp_path)
    wait_for_rounds(tmp_path / "out/parts/server_0.h5", 5)
    for p in procs if target == "every rank" else procs[1:2] if target == "one client" else procs[:1]:
        p.send_signal(sig)
    codes = [p.wait(timeout=90) for p in procs]
    sets = checkpoint.complete_rounds(str(tmp_path / "out"))
    if expected == "killed":
        assert codes[0] not in (0, EXIT_REQUEUE) and sets, codes
    else:
        assert codes == [EXIT_REQUEUE] * len(procs)
        assert 5 <= sets[-1] < rounds and len(sets) <= 2  # the stop's set, keep_checkpoints 2
    for rank in range(3):  # every file of the newest set loads
        checkpoint.load_rank(str(tmp_path / "out"), sets[-1], rank)
    if launcher == "mpirun":  # continue from it to the end: two rounds past the set (not the 200 the stop needed)
        done = run_mpi(3, ["train", cfg, "--resume", "--set", f"run.rounds={sets[-1] + 2}"])
        assert done.returncode == 0 and f"resuming from the checkpoint set of round {sets[-1]}" in done.stderr
        with h5py.File(tmp_path / "out/results.h5") as f:
            assert list(f["server/rounds/round"][()]) == list(range(sets[-1] + 2))


def _has(path, key: str) -> bool:
    try:
        with h5py.File(path, "r", locking=False) as f:
            return key in f
    except (OSError, KeyError):
        return False


# moment -> (config changes, when to send SIGTERM, expected exit): a stop request during the
# final sampling lets it finish (the run is complete); during the evaluation at the end it
# stops the evaluation, and the requeued run evaluates again
MOMENTS = {
    "start": ({}, lambda out: (out / "results.h5").exists(), EXIT_REQUEUE),
    "checkpoint write": ({"checkpoint_every": 1}, lambda out: checkpoint.complete_rounds(str(out)), EXIT_REQUEUE),
    "sampling": (  # 600 a client: about 2 s of sampling on a quiet core for the signal to land in (1500: 8.5 s of CPU)
        {"rounds": 3, "samples_per_client": 600},
        lambda out: checkpoint.complete_rounds(str(out)) == [3],
        0,
    ),
    "evaluation": (
        {"rounds": 3, "eval": {"at_end": True, "images": 24}},
        lambda out: _has(out / "parts/client_c1.h5", "summary"),
        EXIT_REQUEUE,
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("moment", list(MOMENTS))
def test_sigterm_at_every_moment_of_a_run_keeps_what_is_done(tmp_path, shards, moment):
    changes, ready, expected = MOMENTS[moment]
    raw = tiny_config(shards, tmp_path / "out", [0.25, 0.5], rounds=200, log_every=1, checkpoint_every=0)
    raw["eval"].update(changes.pop("eval", {}))
    raw["run"].update(changes)
    cfg = write_config(tmp_path / "run.yaml", raw)
    cmd = [sys.executable, "-m", "collafuse_hpc", "train", cfg, "--in-process"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    until(lambda: ready(tmp_path / "out"), what=f"the run reaching {moment}")
    assert proc.poll() is None, f"the run ended before the signal at {moment}: make that moment last longer"
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=90)[1]
    assert proc.returncode == expected, err[-2000:]
    sets = checkpoint.complete_rounds(str(tmp_path / "out"))
    for rank in range(3):
        checkpoint.load_rank(str(tmp_path / "out"), sets[-1], rank)
    if moment == "sampling":
        assert _has(tmp_path / "out/parts/client_c1.h5", "samples/images")
    if moment == "evaluation":
        assert "during the evaluation at the end" in err and not _has(tmp_path / "out/results.h5", "metrics")
        done = subprocess.run([*cmd, "--resume=auto"], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and _has(tmp_path / "out/results.h5", "metrics"), done.stderr[-2000:]


def test_a_checkpoint_of_the_earlier_format_is_refused_with_what_to_do(tmp_path, shards, capsys):
    raw = tiny_config(shards, tmp_path / "out", [0.25, 0.5], rounds=2)
    config = write_config(tmp_path / "run.yaml", raw)
    assert main(["train", config, "--in-process"]) == 0
    for path in (tmp_path / "out/checkpoints").glob("round_*/rank*.pt"):  # as version 1 wrote them
        ckpt = torch.load(path, weights_only=True)
        ckpt["format"] = "collafuse-checkpoint-v1"
        ckpt["state"].pop("released", None)
        torch.save(ckpt, path)
    capsys.readouterr()
    before = file_tree(tmp_path / "out")
    assert main(["train", config, "--in-process", "--resume", "--set", "run.rounds=4"]) == 2
    assert main(["evaluate", config]) == 2
    err = capsys.readouterr().err
    assert err.count("was written by an earlier collafuse-hpc (format v1") == 2, err
    assert file_tree(tmp_path / "out") == before  # refused: nothing written


def _catches(pid: int, sig: signal.Signals) -> bool:
    """Whether process ``pid`` has a handler for ``sig`` (the SigCgt mask of /proc)."""
    with open(f"/proc/{pid}/status") as f:
        mask = next(int(line.split()[1], 16) for line in f if line.startswith("SigCgt:"))
    return bool(mask >> (sig - 1) & 1)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_a_signal_while_the_command_starts_stops_it_cleanly(tmp_path, shards, sig):
    """The stop handler is in place before the command loads torch: a signal that lands
    while it loads gives exit 75, said on stderr, never a death by the signal. The signal
    goes as soon as the kernel shows the handler (a fixed delay raced Python's own start
    on busy cores)."""
    cfg = write_config(tmp_path / "run.yaml", tiny_config(shards, tmp_path / "out", [0.2, 0.5], rounds=400))
    proc = subprocess.Popen(
        [sys.executable, "-m", "collafuse_hpc", "train", cfg, "--in-process"], stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 60
    while not _catches(proc.pid, sig):  # polled closely: torch loads about 0.35 s after the handler here
        assert time.monotonic() < deadline and proc.poll() is None, f"no {sig.name} handler within 60 s"
        time.sleep(0.005)
    loaded = Path(f"/proc/{proc.pid}/maps").read_text()
    proc.send_signal(sig)
    assert "libtorch" not in loaded  # the handler came before torch
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_REQUEUE, (proc.returncode, err[-2000:])
    assert f"stopped by {sig.name} before training started" in err


@pytest.mark.mpi
def test_local_sh_gives_the_commands_exit_status_in_posix_mode(tmp_path):
    """jobs/local.sh reads mpirun's status with a second wait (the first may be cut short by
    a trap); in bash's POSIX mode (POSIXLY_CORRECT in the environment) that second wait
    answered 127, 'not a child', whatever the run gave. A missing config is exit 2."""
    env = harness.mpi_env(MPIRUN=mpirun(), VENV=str(Path(sys.executable).parent.parent), POSIXLY_CORRECT="1")
    done = subprocess.run(
        ["bash", str(ROOT / "jobs/local.sh"), "1", "train", str(tmp_path / "missing.yaml")],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2 and "not found" in done.stderr, (done.returncode, done.stderr[-2000:])


def test_a_stop_to_local_sh_before_a_slow_rank_catches_it_gives_75(tmp_path, shards):
    """Under load, jobs/local.sh signalled 0.3 s after its start exited 138: mpirun forwarded
    the SIGUSR1 to a rank whose Python had not installed its handler yet, and it died of it.
    Nothing was trained, and the job scripts requeue only on 75. Rank 1 sleeps before the
    package loads (a slow shared file system); the stop goes once every rank's process runs."""
    cfg = write_config(tmp_path / "run.yaml", tiny_config(shards, tmp_path / "out", [0.2, 0.5], rounds=400))
    env = harness.mpi_env(MPIRUN=mpirun(), VENV=str(Path(sys.executable).parent.parent))
    env.update(harness.slow_start(tmp_path / "slow", rank=1, seconds=60))
    proc = subprocess.Popen(
        ["bash", str(ROOT / "jobs/local.sh"), "3", "train", cfg], env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        until(lambda: len(harness.rank_pids(cfg)) == 3, timeout=60, what="mpirun starting 3 ranks")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == EXIT_REQUEUE, (proc.returncode, err[-2000:])
    assert "died of SIGUSR1 while it was still starting" in err.strip().splitlines()[-1], err[-2000:]
    assert not (tmp_path / "out/results.h5").exists()


@pytest.mark.slow
def test_a_rank_waiting_on_a_failed_peer_ends_soon_after_a_signal(tmp_path, shards):
    """Client c0 freezes (SIGSTOP: alive, silent); a SIGTERM to the other ranks
    cannot reach the agreed stop, so they end stop_grace_s after it, exit 75, and the
    newest complete checkpoint set is kept."""
    raw = tiny_config(shards, tmp_path / "out", [0.2, 0.5], rounds=400, checkpoint_every=2, timeout_s=120)
    procs = spawn_ranks(3, ["train", write_config(tmp_path / "run.yaml", raw)])
    try:
        until(lambda: checkpoint.complete_rounds(str(tmp_path / "out")), what="a complete checkpoint set")
        procs[1].send_signal(signal.SIGSTOP)
        kept = checkpoint.complete_rounds(str(tmp_path / "out"))[-1]
        time.sleep(1.0)
        sent = time.monotonic()
        for p in (procs[0], procs[2]):
            p.send_signal(signal.SIGTERM)
        for p in (procs[0], procs[2]):
            _, err = p.communicate(timeout=30)
            assert p.returncode == EXIT_REQUEUE, err[-2000:]
            assert "no progress for 5 s after the signal" in err
        assert time.monotonic() - sent < 15
        assert checkpoint.complete_rounds(str(tmp_path / "out"))[-1] >= kept
    finally:
        for p in procs:
            p.kill()
            p.communicate()


@pytest.mark.slow
def test_a_damaged_set_is_skipped_naming_the_rounds_and_an_io_error_fails_keeping_everything(
    tmp_path, shards, capsys, caplog, monkeypatch
):
    """An I/O error reading the newest set fails the command (exit 1, the path) and
    changes nothing; a damaged newest set is skipped with the rounds it costs named."""
    import errno

    out = tmp_path / "out"
    cfg = write_config(tmp_path / "run.yaml", tiny_config(shards, out, [0.2, 0.5], rounds=4, checkpoint_every=2))
    assert main(["train", cfg, "--in-process"]) == 0
    assert checkpoint.complete_rounds(str(out)) == [2, 4]
    real = checkpoint._torch_load

    def eio(path, mmap):
        if "round_00000004" in path:
            raise OSError(errno.EIO, "Input/output error")
        return real(path, mmap)

    monkeypatch.setattr(checkpoint, "_torch_load", eio)
    before = file_tree(out)
    capsys.readouterr()
    assert main(["train", cfg, "--in-process", "--resume", "--set", "run.rounds=6"]) == 1
    err = capsys.readouterr().err
    assert "round_00000004/rank0.pt' could not be read (Input/output error): an I/O error" in err
    assert file_tree(out) == before
    assert main(["evaluate", cfg]) == 1
    assert "an I/O error, not a damaged file" in capsys.readouterr().err
    monkeypatch.undo()

    newest = out / "checkpoints/round_00000004/rank0.pt"
    newest.write_bytes(newest.read_bytes()[:200])
    caplog.set_level(logging.WARNING, logger="collafuse_hpc")
    assert main(["train", cfg, "--in-process", "--resume", "--set", "run.rounds=6"]) == 0
    assert "the checkpoint set of round 4 cannot be used" in caplog.text and "is damaged" in caplog.text
    assert "Continuing from the set of round 2: rounds 3..4 are trained again" in caplog.text
    assert checkpoint.complete_rounds(str(out))[-1] == 6
