"""A full disk: nothing half-written stays, the message names the file and the space,
the newest complete checkpoint set and every written round stay readable, and the
run continues once there is space again. Uses a small tmpfs (needs root)."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import time

import h5py
import pytest
import torch
from conftest import tiny_config, wait_for_rounds, write_config

from collafuse_hpc.runtime import checkpoint


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MiB tmpfs at tmp_path/disk, unmounted after the test."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode:
        if os.environ.get("CI"):
            pytest.fail(f"cannot mount a tmpfs (CI runs as root): {done.stderr.decode()}")
        pytest.skip("mounting a tmpfs needs root")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(folder, leave: int) -> None:
    """Write a ballast file so that ``leave`` bytes stay free."""
    with open(folder / "ballast", "wb") as f:  # emptied first: the free space counts the old ballast's
        f.write(b"\0" * max(0, shutil.disk_usage(folder).free - leave))


def test_a_checkpoint_that_does_not_fit_leaves_nothing_and_says_what_it_needs(small_disk):
    out = str(small_disk / "out")
    state = {"w": torch.zeros(300_000)}  # 1.2 MB
    checkpoint.save_rank(out, 2, 0, state, "config: {}", {})
    checkpoint.mark_complete(out, 2, keep=2)
    checkpoint.save_rank(out, 4, 1, state, "config: {}", {})  # another rank's file of the next set
    _fill(small_disk, 200_000)
    with pytest.raises(OSError) as e:
        checkpoint.save_rank(out, 4, 0, state, "config: {}", {})
    assert e.value.errno == errno.ENOSPC
    path = f"{out}/checkpoints/round_00000004/rank0.pt"
    assert f"round 4: cannot write '{path}': No space left on device: it needs 12" in str(e.value)
    assert checkpoint.complete_rounds(out) == [2] and not os.path.exists(checkpoint.set_dir(out, 4))
    _fill(small_disk, 200_000)  # the failed set's files were removed
    with pytest.raises(OSError) as e:  # the set's first file, its folder new
        checkpoint.save_rank(out, 6, 0, state, "config: {}", {})
    assert e.value.errno == errno.ENOSPC and "No space left on device: it needs" in str(e.value)
    assert [p.name for p in (small_disk / "out").rglob("*tmp*")] == []


@pytest.mark.slow  # reads an evaluated run
def test_export_and_bundle_onto_a_full_disk_say_so_and_leave_nothing(small_disk, evaluated_run, capsys, monkeypatch):
    """A bundle that filled the disk was "cannot read results" (exit 2), or a traceback of
    HDF5's flush; an export's numpy write named no cause."""
    from collafuse_hpc.cli import main

    results = str(evaluated_run(0.25) / "results.h5")
    for leave in (0, 8_000, 40_000):  # the disk fills at different writes (24 files, 96 kB of tmpfs pages; 580 kB)
        _fill(small_disk, leave)
        for args in (
            ["export", results, "--out", str(small_disk / "new/grids"), "--npy"],
            ["bundle", results, str(small_disk / "new/run.h5")],
        ):
            assert main(args) == 1, args
            err = capsys.readouterr().err
            full = "No space left on device" in err or "(a full disk, or a quota reached)" in err  # numpy's words
            assert full and "; nothing was written" in err and "Traceback" not in err, err
            assert sorted(os.listdir(small_disk)) == ["ballast"], args
    os.remove(small_disk / "ballast")
    monkeypatch.chdir(small_disk)
    assert main(["bundle", results, "plain.h5"]) == 0 and os.path.isfile(small_disk / "plain.h5")  # no folder given


@pytest.mark.slow
def test_a_run_that_fills_the_disk_stops_cleanly_and_continues_after(small_disk, tmp_path, shards):
    raw = tiny_config(shards, small_disk / "out", [0.25, 0.5], rounds=400, log_every=1, checkpoint_every=5)
    cfg = write_config(tmp_path / "run.yaml", raw)
    cmd = [sys.executable, "-m", "collafuse_hpc", "train", cfg, "--in-process"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_rounds(small_disk / "out/parts/server_0.h5", 12)
    _fill(small_disk, 1 << 20)
    t0 = time.monotonic()
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 1 and time.monotonic() - t0 < 30, err
    assert "no space left" in err.lower() and str(small_disk / "out") in err and "Traceback" not in err, err
    assert [p.name for p in (small_disk / "out").rglob("*tmp*")] == []
    sets = checkpoint.complete_rounds(str(small_disk / "out"))
    assert sets and sets[-1] >= 10
    for rank in range(3):
        checkpoint.load_rank(str(small_disk / "out"), sets[-1], rank)
    with h5py.File(small_disk / "out/results.h5") as f:
        assert len(f["server/rounds/round"]) >= sets[-1]  # the rounds before the full disk are readable
    (small_disk / "ballast").unlink()
    raw["run"]["rounds"] = sets[-1] + 5
    write_config(tmp_path / "run.yaml", raw)
    done = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    with h5py.File(small_disk / "out/results.h5") as f:
        assert list(f["server/rounds/round"][()]) == list(range(sets[-1] + 5))


def _prepare(source: str, out, leave: int | None = None, disk=None) -> subprocess.CompletedProcess:
    """The prepare command in its own process: HDF5 writing onto a full disk crashed it (SIGSEGV)."""
    if leave is not None:
        _fill(disk, leave)
    how = ["digits", "--size", "16"] if source == "digits" else ["folder", "--root", source, "--size", "32"]
    cmd = [sys.executable, "-m", "collafuse_hpc", "prepare", *how, "--out", str(out), "--clients", "2"]
    cmd += ["--workers", "1"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("source", ["folder", "digits"])
def test_prepare_onto_a_full_disk_refuses_or_fails_cleanly_and_continues_after(small_disk, tmp_path, source):
    """prepare printed hundreds of HDF5 tracebacks and crashed (SIGSEGV) when the disk filled
    while it wrote its cache or a shard, and kept the shards written before (and an empty
    --out when it failed at the first). Refused before the work when the disk cannot hold
    the decoded images and shards; a write that fails all the same leaves no shard, keeps
    the decoded images, and the same command continues once there is space."""
    from layouts import make_folder

    if source == "folder":
        source = str(tmp_path / "pictures")
        make_folder(source, classes=2, per_class=200)  # 400 images, 1.2 MB at 32 x 32 RGB
    out = small_disk / "data"
    need = 2.5e6 if source != "digits" else 0.46e6  # cache and shards, or shards (digits are decoded in memory)
    for leave, code in ((0, 2), (int(need * 0.9), 2), (int(need + 20_000), 1)):
        done = _prepare(source, out, leave, small_disk)
        err = done.stderr
        assert done.returncode == code, err
        assert "Traceback" not in err and sum("error:" in line for line in err.splitlines()) == 1, err
        if code == 2:
            assert "MB free, and the" in err and "free space or choose another --out" in err, err
        else:
            assert "No space left on device; no shard was written" in err, err
            assert ("the images decoded before are kept in" in err) == (source != "digits"), err
        assert not list(small_disk.rglob("client_*")) and not list(small_disk.rglob("*tmp*")), err
        kept = list(small_disk.rglob("*.npz"))
        assert sorted(os.listdir(small_disk)) == (["ballast", "data"] if kept else ["ballast"]), code
    (small_disk / "ballast").unlink()
    done = _prepare(source, out)
    made = sorted(os.listdir(out))
    assert done.returncode == 0 and made == [".cache", "client_0.h5", "client_1.h5"][source == "digits" :]
    if source != "digits":  # the decoded images were kept: nothing is decoded again
        assert "0/0 images, nothing to do" in done.stderr, done.stderr


def test_a_decoded_image_cache_that_fills_the_disk_keeps_every_batch_written(small_disk, tmp_path, monkeypatch, caplog):
    """The cache was one HDF5 file appended in place: a failed flush left it damaged, and the
    next run could not open it. Now each batch is a file written whole."""
    from layouts import make_folder

    from collafuse_hpc.atomic import WriteError
    from collafuse_hpc.data import prepare as prep
    from collafuse_hpc.data.sources import read_folder

    source = str(tmp_path / "pictures")
    make_folder(source, classes=2, per_class=300)
    monkeypatch.setattr(prep, "_check_space", lambda *a: None)  # the disk fills after the check
    monkeypatch.setattr(prep, "CHUNK", 64)
    _fill(small_disk, 300_000)  # room for one or two batches (64 x 3072 bytes each)
    with pytest.raises(WriteError, match="No space left on device"):
        prep.prepare(read_folder(source), str(small_disk / "data"), 2, "iid", size=32, workers=1)
    kept = list(small_disk.rglob("*.npz"))
    assert kept and not list(small_disk.rglob("*tmp*")) and not list(small_disk.rglob("client_*"))
    (small_disk / "ballast").unlink()
    caplog.set_level("INFO", logger="collafuse_hpc")
    prep.prepare(read_folder(source), str(small_disk / "data"), 2, "iid", size=32, workers=1)
    assert f"decoding folder: {600 - 64 * len(kept)}/{600 - 64 * len(kept)} images" in caplog.text


def test_train_classifier_over_a_file_size_limit_says_so_and_leaves_nothing(tmp_path, shards):
    """train-classifier under ``ulimit -f`` ended in torch's RuntimeError traceback, and a
    folder it made stayed."""
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000))

    out = tmp_path / "new/classifier.pt"
    cmd = [sys.executable, "-m", "collafuse_hpc", "train-classifier", *shards, "--out", str(out), "--epochs", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, preexec_fn=limit)
    assert done.returncode == 1, done.stderr
    assert f"cannot write '{out}': File too large: it needs" in done.stderr and "(ulimit -f) is 50000" in done.stderr
    assert "; nothing was written" in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert os.listdir(tmp_path) == []


@pytest.mark.slow  # evaluates a run
def test_an_evaluation_that_fills_the_disk_keeps_results_h5_readable_and_says_so(
    small_disk, evaluated_run, monkeypatch, capsys
):
    """evaluate wrote its metrics into results.h5 with a plain HDF5 append: a disk that
    filled during the evaluation left HDF5's error and a results file it may have broken.
    The metrics are now written as every other result is, refused below the reserve that
    keeps HDF5 from breaking the file; the run's results stay readable, and the same
    evaluation succeeds once there is space."""
    from collafuse_hpc.cli import main
    from collafuse_hpc.evaluation import evaluate

    run = small_disk / "run"
    shutil.copytree(evaluated_run(0.25), run)
    begin = evaluate.begin_record

    def begin_then_fill(*args, **kwargs):  # another job fills the disk while the metrics are computed
        n = begin(*args, **kwargs)
        _fill(small_disk, 0)
        return n

    monkeypatch.setattr(evaluate, "begin_record", begin_then_fill)
    assert main(["evaluate", str(run)]) == 1
    err = capsys.readouterr().err
    assert f"no space left to write results to {str(run / 'results.h5')!r}" in err and "Traceback" not in err, err
    assert main(["inspect", str(run)]) == 0  # readable: the record begun did not finish, the metrics are record 1's
    with h5py.File(run / "results.h5") as f:
        assert sorted(f["records"], key=int) == ["0", "1", "2"] and f["records/2"].attrs["finished"] == ""
        assert "metrics" not in f["records/2"] and f.get("metrics", getlink=True).path == "records/1/metrics"
    monkeypatch.setattr(evaluate, "begin_record", begin)
    (small_disk / "ballast").unlink()
    assert main(["evaluate", str(run)]) == 0
