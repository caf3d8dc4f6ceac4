"""What users of torchrun, SLURM and diffusers expect: --version, a dry run, log
lines with level and rank, progress, TensorBoard scalars, and results files that
generic HDF5 tools read (units, the round dimension scale, one self-contained file)."""

import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys

import h5py
import pytest
import yaml
from conftest import file_tree, tiny_config, write_config

from collafuse_hpc.cli import main
from collafuse_hpc.config import from_dict
from collafuse_hpc.logs import Progress
from collafuse_hpc.runtime.launch import apply_env_defaults, env_rank
from collafuse_hpc.version import __version__

CLI = [sys.executable, "-m", "collafuse_hpc"]


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"collafuse-hpc {__version__}"


def test_config_and_dry_run_print_the_resolved_run_and_write_nothing(tmp_path, shards, capsys):
    raw = tiny_config(shards, tmp_path / "out", [0.25, 1.0])
    raw["diffusion"]["sampling_steps"] = 10
    cfg = write_config(tmp_path / "run.yaml", raw)
    for args in (["config", cfg], ["train", cfg, "--dry-run"]):
        assert main([*args, "--set", "run.rounds=7"]) == 0
        out = capsys.readouterr().out
        resolved = yaml.safe_load(out.split("\n# ")[0])
        assert resolved["run"]["rounds"] == 7 and resolved["run"]["keep_checkpoints"] == 2  # defaults filled in
        assert "# 3 ranks (launch with mpirun -np 3)" in out
        # rank, role, t_c, hand-over step, serving rank, sampling steps (server + client)
        assert re.search(r"1\s+client c0\s+5\s+5\s+0\s+8 \+ 2", out), out
        assert re.search(r"2\s+client c1\s+20\s+20\s+0\s+0 \+ 10", out), out
    assert not (tmp_path / "out").exists()
    # a dry run answers whether the command would start: train --dry-run passed a folder train refused
    assert main(["sample", cfg, "--in-process", "--dry-run"]) == 2
    assert "sample: no complete checkpoint set in" in capsys.readouterr().err  # the line sample itself says
    (tmp_path / "out").mkdir()
    (tmp_path / "out/results.h5").write_bytes(b"")
    assert main(["train", cfg, "--dry-run"]) == 2
    assert "holds results of an earlier run; pass --resume" in capsys.readouterr().err
    assert main(["config", cfg, "--set", "clients.0.cut_ratio=0"]) == 2  # a cut of 0 needs the opt-in
    assert "allow_centralized" in capsys.readouterr().err


def test_a_dry_run_of_a_trained_run_passes_and_one_into_a_folder_a_job_runs_in_is_refused(tmp_path, shards, capsys):
    raw = tiny_config(shards, tmp_path / "out", [0.25, 0.5], rounds=1)
    cfg = write_config(tmp_path / "run.yaml", raw)
    assert main(["train", cfg, "--in-process"]) == 0
    before = file_tree(tmp_path / "out")
    capsys.readouterr()
    assert main(["sample", cfg, "--in-process", "--dry-run"]) == 0
    assert "# 3 ranks" in capsys.readouterr().out
    (tmp_path / "out/.lock").write_text(json.dumps({"job": "other", "host": socket.gethostname(), "pid": os.getpid()}))
    for args in (["sample", cfg, "--dry-run"], ["train", cfg, "--resume", "--set", "run.rounds=2", "--dry-run"]):
        assert main(args) == 2, args  # train and sample refuse it: the dry run says so before the job is queued
        assert f"output folder '{tmp_path / 'out'}' is in use by job 'other'" in capsys.readouterr().err
    (tmp_path / "out/.lock").unlink()
    assert file_tree(tmp_path / "out") == before


def test_config_plans_a_job_whose_files_do_not_exist_yet(tmp_path, shards, capsys):
    """``config`` refused to print the rank map before the shards were prepared, when the
    map is wanted. It prints the map and cuts and lists every missing file the run needs
    (shards; the evaluation's network with eval.at_end) as a warning, exit 0, still refusing
    whatever it can check; ``train`` and its dry run refuse, naming the first."""
    raw = tiny_config(shards, tmp_path / "out", [0.25, 1.0])
    raw["clients"][1]["shard"] = str(tmp_path / "later/client_1.h5")
    raw["eval"].update(at_end=True, extractor="classifier", classifier_path=str(tmp_path / "later/digits.pt"))
    cfg = write_config(tmp_path / "run.yaml", raw)
    assert main(["config", cfg]) == 0
    out, err = capsys.readouterr()
    assert "# 3 ranks (launch with mpirun -np 3)" in out and re.search(r"2\s+client c1\s+20\s+20\s+0", out), out
    warnings = [line for line in err.splitlines() if line.startswith("collafuse-hpc: warning: ")]
    assert len(warnings) == 3 and "error" not in err, err
    assert f"'clients.1.shard': file {str(tmp_path / 'later/client_1.h5')!r} not found" in warnings[0]
    assert "make it with 'collafuse-hpc prepare' (docs/data.md)" in warnings[0] and "tools/" not in err
    assert f"classifier file {str(tmp_path / 'later/digits.pt')!r} not found; make one" in warnings[1]
    assert "train refuses to start until they do" in warnings[2]
    # what can be checked still is: the shard that exists against the config
    assert main(["config", cfg, "--set", "clients.0.batch_size=100000"]) == 2
    assert "is 100000, but shard" in capsys.readouterr().err
    for args in (["train", cfg, "--in-process"], ["train", cfg, "--dry-run"]):
        assert main(args) == 2
        out, err = capsys.readouterr()
        assert not out and "'clients.1.shard': file" in err and "error:" in err, err
    assert main(["train", cfg, "--dry-run", "--set", f"clients.1.shard={shards[1]}"]) == 2
    assert "classifier file" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_log_lines_carry_level_and_rank(tmp_path, shards):
    env = {**os.environ, "OMPI_COMM_WORLD_RANK": "3"}
    cfg = write_config(tmp_path / "run.yaml", tiny_config(shards, tmp_path / "out", [0.5], rounds=1))
    done = subprocess.run([*CLI, "train", cfg, "--in-process"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert re.search(r"^\d\d:\d\d:\d\d INFO \[rank 3\] server_0: mean over the last 10%", done.stderr, re.M)
    quiet = subprocess.run(
        [*CLI, "--log-level", "WARNING", "train", cfg, "--in-process", "--set", f"run.output_dir={tmp_path / 'q'}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert quiet.returncode == 0 and " INFO " not in quiet.stderr, quiet.stderr
    assert env_rank({"SLURM_PROCID": "5"}) == 5 and env_rank({}) is None


def test_progress_reports_images_rate_and_time_left(caplog):
    caplog.set_level("INFO", logger="collafuse_hpc")
    progress = Progress("sampling for 2 client(s)", 100, every_s=0)
    progress.update(25)
    progress.update(75, "0 unreadable")
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "sampling for 2 client(s): 0/100 images"
    assert re.fullmatch(r"sampling for 2 client\(s\): 25/100 images, [\d.]+ images/s, \d+ s left", lines[1])
    assert re.fullmatch(r"sampling for 2 client\(s\): 100/100 images, [\d.]+ images/s, done, 0 unreadable", lines[2])


def test_env_defaults_fill_only_empty_eval_keys(tmp_path, shards):
    cfg = from_dict(tiny_config(shards, tmp_path, [0.5]))
    env = {"COLLAFUSE_INCEPTION": "/site/fid.pth", "COLLAFUSE_CACHE": "/site/cache"}
    apply_env_defaults(cfg, env)
    assert cfg.eval.inception_path == "/site/fid.pth"
    assert cfg.eval.cache_dir == str(tmp_path.parent / "feature_cache")  # set in the config: kept


@pytest.mark.slow
def test_results_read_with_plain_h5py_and_bundle_into_one_file(tmp_path, shards, capsys, caplog):
    caplog.set_level("INFO", logger="collafuse_hpc")
    raw = tiny_config(shards, tmp_path / "out", [0.25, 0.5], rounds=3, log_every=1)
    raw["eval"]["at_end"] = True
    raw["run"]["samples_per_client"] = 6
    assert main(["train", write_config(tmp_path / "run.yaml", raw), "--in-process"]) == 0
    assert re.search(r"server sampling for 2 client\(s\): 12/12 images, [\d.]+ images/s, done", caplog.text)
    assert re.search(r"evaluating client\(s\) c1: 8/8 images, [\d.]+ images/s, done", caplog.text)
    bundle = tmp_path / "sent" / "run.h5"
    bundle.parent.mkdir()
    assert main(["bundle", str(tmp_path / "out/results.h5"), str(bundle)]) == 0
    shutil.rmtree(tmp_path / "out")  # the bundle needs none of the run's files
    found = {}
    with h5py.File(bundle, "r") as f:
        f.visititems(lambda name, obj: found.update({name: obj.attrs.get("units")}) if "units" in obj.attrs else None)
        rounds = f["clients/c0/rounds"]
        assert rounds["round"][()].tolist() == [0, 1, 2] and rounds["round"].is_scale
        assert rounds["loss_local"].dims[0][0] == rounds["round"]  # the round axis, as xarray reads it
        assert f["metrics/pooled/collaborative"].attrs["fid"] > 0
        assert f.attrs["schema"] == "collafuse-results" and yaml.safe_load(f.attrs["missing_parts"]) == []
        assert f["clients/c0/samples/images"].shape == (6, 1, 8, 8)  # the newest, through the bundled link
        assert f["records/1/metrics/pooled/collaborative"].attrs["fid"] > 0  # the history came along
    assert found["server/rounds/loss_server"] == "mean squared error" and found["server/rounds/time_recv_s"] == "s"
    assert found["clients/c0/records/0/samples/images"] == "uint8 pixels 0..255"  # visititems skips soft links
    columns = [name for name in found if "/rounds/" in name or "/audit/" in name]
    assert columns and all(found[name] for name in columns)  # every column says its units


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="the tensorboard extra is not installed")
def test_tensorboard_gets_every_logged_round(tmp_path, shards):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    raw = tiny_config(shards, tmp_path / "out", [0.25, 0.5], rounds=3, log_every=1, tensorboard=True)
    assert main(["train", write_config(tmp_path / "run.yaml", raw), "--in-process"]) == 0
    events = EventAccumulator(str(tmp_path / "out/tensorboard/client_c0")).Reload()
    assert [s.step for s in events.Scalars("loss_local")] == [0, 1, 2]
    assert "loss_server" in EventAccumulator(str(tmp_path / "out/tensorboard/server")).Reload().Tags()["scalars"]
