"""The command line, as a user runs it."""

import errno
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml
from conftest import file_tree, tiny_config, until, write_config

from collafuse_hpc.cli import main
from collafuse_hpc.results.inspection import save_grid

ROOT = Path(__file__).resolve().parents[1]


def test_bad_config_exits_2_with_the_key_named(tmp_path, shards, capsys):
    cfg = write_config(tmp_path / "run.yaml", tiny_config(shards, tmp_path / "out", [0.2, 0.2]))
    assert main(["train", cfg, "--in-process", "--set", "clients.1.cut_ratio=2"]) == 2
    assert "'clients.1.cut_ratio' must be in [0, 1], got 2" in capsys.readouterr().err


def test_launch_without_enough_ranks_says_how_to_launch(tmp_path, shards):
    cfg = write_config(tmp_path / "run.yaml", tiny_config(shards, tmp_path / "out", [0.2, 0.2]))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMI", "SLURM_", "RANK"))}
    proc = subprocess.run(
        [sys.executable, "-m", "collafuse_hpc", "train", cfg], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "world size 1 does not match the config" in proc.stderr and "mpirun -np 3" in proc.stderr


def test_train_then_sample_again_then_inspect(tmp_path, shards, capsys):
    raw = tiny_config(shards, tmp_path / "out", [0.3, 1.0], rounds=2)
    cfg = write_config(tmp_path / "run.yaml", raw)
    before = signal.getsignal(signal.SIGTERM)
    assert main(["train", cfg, "--in-process"]) == 0
    assert signal.getsignal(signal.SIGTERM) is before  # the stop handlers are put back
    with h5py.File(tmp_path / "out/results.h5") as f:
        first = f["clients/c0/samples/images"][()]
    assert main(["sample", cfg, "--in-process", "--set", "run.sample_batch=2"]) == 0
    with h5py.File(tmp_path / "out/results.h5") as f:  # the same streams from the same set: the same samples
        assert np.array_equal(f["clients/c0/samples/images"][()], first)
        assert len(f["clients/c0/rounds/round"]) == 2  # sampling adds no training rounds
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "out/results.h5")]) == 0
    text = capsys.readouterr().out
    assert "clients/c0 t_c=6 (c=0.30): rank 1" in text and "audit: 12 images in 2 training messages" in text
    assert "clients/c1 t_c=20 (c=1.00)" in text and "audit: 0 images in 0 training messages" in text


def test_sample_without_checkpoint_is_a_clear_error(tmp_path, shards, capsys):
    cfg = write_config(tmp_path / "run.yaml", tiny_config(shards, tmp_path / "out", [0.2, 0.2]))
    assert main(["sample", cfg, "--in-process"]) == 2
    assert "no complete checkpoint set" in capsys.readouterr().err


@pytest.mark.slow
def test_unreachable_rendezvous_names_the_address(tmp_path, shards):
    cfg = write_config(tmp_path / "run.yaml", tiny_config(shards, tmp_path / "out", [0.2, 0.2], timeout_s=3))
    env = {**os.environ, "RANK": "1", "WORLD_SIZE": "3", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "9"}
    proc = subprocess.run(
        [sys.executable, "-m", "collafuse_hpc", "train", cfg], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 1
    assert "could not reach the rendezvous at 127.0.0.1:9 (torchrun) within 3 s" in proc.stderr


def test_log_level_is_accepted_before_and_after_every_subcommand(tmp_path, shards, capsys):
    """Users type ``collafuse-hpc evaluate run.yaml --log-level DEBUG``; it was refused."""
    from collafuse_hpc.cli import _parser

    parser = _parser()
    subcommands = next(a for a in parser._actions if a.dest == "command").choices
    operands = {  # the fewest arguments each subcommand parses with
        "train": ["c.yaml"],
        "sample": ["c.yaml"],
        "evaluate": ["c.yaml"],
        "config": ["c.yaml"],
        "inspect": ["r.h5"],
        "export": ["r.h5", "--out", "o"],
        "bundle": ["r.h5", "o.h5"],
        "compare": ["r.h5"],
        "report": ["r.h5", "--out", "o"],
        "convert-inception": ["a.pt", "b.pth"],
        "train-classifier": ["s.h5", "--out", "c.pt"],
        "prepare": ["digits", "--out", "o"],
    }
    assert set(subcommands) == set(operands)
    for name, rest in operands.items():
        assert parser.parse_args([name, *rest]).log_level == "INFO", name
        assert parser.parse_args(["--log-level", "ERROR", name, *rest]).log_level == "ERROR", name
        assert parser.parse_args([name, *rest, "--log-level", "DEBUG"]).log_level == "DEBUG", name
    cfg = write_config(tmp_path / "run.yaml", tiny_config(shards, tmp_path / "out", [0.2, 0.2]))
    assert main(["config", cfg, "--log-level", "WARNING"]) == 0


def test_the_inspect_tool_without_a_subcommand_names_what_is_missing():
    """tools/inspect_results.py printed its docstring and exited 1; argparse says what
    is required, with the usage line, and exits 2 as every command line does."""
    done = subprocess.run([sys.executable, "tools/inspect_results.py"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and "the following arguments are required: command" in done.stderr


def _recorded_run(tmp_path, shards, monkeypatch, argv: list[str]) -> tuple[Path, str]:
    """A run folder whose results.h5 holds the config and one train record that ran ``argv``
    (what train writes first; no rounds are needed to refuse or describe the run)."""
    from collafuse_hpc.config import dump, from_dict
    from collafuse_hpc.results.writer import begin_record, create_index

    run = tmp_path / "my run"
    run.mkdir()
    index = str(run / "results.h5")
    create_index(index, dump(from_dict(tiny_config(shards, run, [0.25, 1.0]))), 0, {})
    monkeypatch.setattr(sys, "argv", argv)
    begin_record(index, "train", 0, {})
    return run, index


def test_train_of_a_run_names_the_command_that_continues_it(tmp_path, shards, capsys, monkeypatch):
    """train RUN_FOLDER answered "config file ... cannot be read: Is a directory" (issue 36), and
    train RUN/results.h5 "is not text (YAML expected)". train refuses a run, its dry run too, with
    the command its training record ran, as --resume continues it (the docs' way: its config,
    --resume, its folder)."""
    config = write_config(tmp_path / "run.yaml", tiny_config(shards, tmp_path / "elsewhere", [0.25, 1.0]))
    trained = ["/venv/bin/collafuse-hpc", "train", config, "--set", "clients.0.cut_ratio=0.4"]
    run, index = _recorded_run(tmp_path, shards, monkeypatch, [*trained, "--set", "run.output_dir=x", "--in-process"])
    before = file_tree(tmp_path)
    resume = f"collafuse-hpc train {config} --set clients.0.cut_ratio=0.4 --in-process --resume"
    for given in (str(run), index):
        for extra in ([], ["--dry-run"], ["--resume"]):
            capsys.readouterr()
            assert main(["train", given, *extra]) == 2, (given, extra)
            err = capsys.readouterr().err.strip()
            assert "\n" not in err and f"train takes a config file, and {given!r} is a trained run" in err, err
            assert f"{resume} --set run.output_dir='{run}';" in err and f"collafuse-hpc evaluate '{run}'" in err, err
    assert file_tree(tmp_path) == before
    # recorded elsewhere (its config not here) or by the Python API (no train command line): CONFIG
    (tmp_path / "api").mkdir()
    api, _ = _recorded_run(tmp_path / "api", shards, monkeypatch, ["pytest", "-q"])
    assert main(["train", str(api)]) == 2
    assert "collafuse-hpc train CONFIG --resume --set run.output_dir=" in capsys.readouterr().err


def test_config_of_a_run_describes_it(tmp_path, shards, capsys, monkeypatch):
    """config, like sample and evaluate, takes a run's folder or results.h5 (it answered 'Is a
    directory'): the run's own config, its rank map and cuts; --set only what a run's commands may."""
    run, index = _recorded_run(tmp_path, shards, monkeypatch, ["collafuse-hpc", "train", "c.yaml"])
    for given in (str(run), index):
        capsys.readouterr()
        assert main(["config", given]) == 0, capsys.readouterr().err
        out = capsys.readouterr().out
        assert yaml.safe_load(out.split("\n# ")[0])["run"]["output_dir"] == str(run), out
        assert "client c1   20" in out and "0 + 20" in out, out
    assert main(["config", str(run), "--set", "clients.0.cut_ratio=0.5"]) == 2
    assert "config of a trained run takes its own config: --set clients.0.cut_ratio" in capsys.readouterr().err


@pytest.mark.slow  # an evaluation of its own, stopped: 20 s on busy cores
def test_a_command_stopped_by_sigterm_or_ctrl_c_says_so_and_leaves_no_partial_output(evaluated_run, tmp_path, capsys):
    """Ctrl-C in `evaluate` printed a 40-line traceback, and SIGTERM (scancel, a time limit)
    killed it silently; an interrupted `export` left the grids it had written, so running
    it again was refused as mixing in an earlier export. Each is now one line, exit 130,
    and nothing partial stays."""
    run = tmp_path / "run"
    shutil.copytree(evaluated_run(0.25), run)
    before = file_tree(run)
    said = tmp_path / "evaluate.log"
    with open(said, "w") as log:
        command = [sys.executable, "-m", "collafuse_hpc", "evaluate", str(run), "--set", "eval.images=64"]
        evaluating = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    until(lambda: "evaluate" in said.read_text() or evaluating.poll() is not None, timeout=300)
    evaluating.send_signal(signal.SIGTERM)
    evaluating.wait(timeout=120)
    err = said.read_text()
    assert evaluating.returncode == 130 and "Traceback" not in err, err
    assert "collafuse-hpc: stopped: interrupted; evaluate left no partial output: run it again" in err
    assert file_tree(run) == before
    # a signal while its record is written arrives after it: the record is whole, not "did not finish"
    from collafuse_hpc.results import writer

    point = writer.point_newest

    def signalled(*args):
        os.kill(os.getpid(), signal.SIGTERM)
        point(*args)

    with pytest.MonkeyPatch.context() as m:
        m.setattr("collafuse_hpc.results.writer.point_newest", signalled)
        assert main(["evaluate", str(run), "--set", "eval.images=16", "--set", "eval.bootstrap=10"]) == 130
    said = capsys.readouterr().err
    assert f"stopped: interrupted after the evaluation of round 2 was written whole to {run / 'results.h5'}" in said
    assert "run it again" not in said
    with h5py.File(run / "results.h5") as f:
        newest = f["records"][str(max(map(int, f["records"])))]
        assert newest.attrs["command"] == "evaluate" and newest.attrs["finished"] and newest.attrs["totals"]
    grids = tmp_path / "new/sub/grids"  # the folders export makes go with what it wrote
    capsys.readouterr()
    for stop, code, said in (
        (KeyboardInterrupt(), 130, "export left no partial output"),
        (OSError(errno.ENOSPC, "No space left on device"), 1, "No space left on device; nothing was written"),
    ):
        calls = []

        def save_then_stop(array, path, stop=stop, calls=calls):
            calls.append(path)
            if len(calls) == 2:  # as PIL's and numpy's write errors: no file named
                raise stop
            save_grid(array, path)

        with pytest.MonkeyPatch.context() as m:
            m.setattr("collafuse_hpc.results.inspection.save_grid", save_then_stop)
            assert main(["export", str(run), "--out", str(grids)]) == code
        assert said in capsys.readouterr().err and not (tmp_path / "new").exists()
    assert main(["export", str(run), "--out", str(grids)]) == 0 and len(os.listdir(grids)) > 2


def test_a_run_command_given_a_path_that_does_not_exist_names_both_things_it_takes(tmp_path, capsys):
    """`evaluate runs/nope` answered "config file 'runs/nope' not found" to a user who meant a run."""
    for command in ("evaluate", "sample", "config"):
        assert main([command, str(tmp_path / "nope")]) == 2
        err = capsys.readouterr().err
        assert f"'{tmp_path / 'nope'}' not found: give a run's folder (its run.output_dir) or a config file" in err
