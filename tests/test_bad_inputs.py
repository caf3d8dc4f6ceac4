"""The bad-input corpus: every input a user got wrong that we know of, with the exit
code and a fragment of the one-line message it must give. Nothing may be written.

Add a row for every defect found. A row is (name, change, exit code, fragment):
``change(raw, tmp_path, shards)`` edits the config dict or the files it names and
returns extra command-line arguments (or a replacement config path as ``str``).
"""

from __future__ import annotations

import errno
import gzip
import os
import shutil
import struct
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import file_tree, tiny_config, write_config
from layouts import make_folder, make_mnist

from collafuse_hpc.cli import main


def _set(path: str, value):
    """A change that sets one config key (``a.b.0.c``)."""

    def change(raw, tmp_path, shards):
        *parents, last = path.split(".")
        node = raw
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
        return []

    return change


def _args(*args: str):
    return lambda raw, tmp_path, shards: list(args)


def _shard(edit):
    """A change to a copy of client 0's shard."""

    def change(raw, tmp_path, shards):
        copy = tmp_path / "edited.h5"
        shutil.copy(shards[0], copy)
        with h5py.File(copy, "a") as f:
            edit(f)
        raw["clients"][0]["shard"] = str(copy)
        return []

    return change


def _float_labels(f):
    labels = f["train/labels"][()]
    del f["train/labels"]
    f["train/labels"] = labels.astype(np.float32) + 0.5


def _labels_beyond(f):
    f["train/labels"][0] = 12  # data.num_classes is 10


def _labels_on(change):
    def both(raw, tmp_path, shards):
        raw["clients"][0]["share_labels"] = True
        return change(raw, tmp_path, shards)

    return both


def _folder_as_config(raw, tmp_path, shards):
    return str(tmp_path)


CORPUS = [
    ("config path is a folder", _folder_as_config, 2, "is a folder without a results.h5, not a run: give a config"),
    ("unknown key", _set("run.roundz", 3), 2, "unknown config key(s) ['roundz'] in section 'run'"),
    ("wrong type", _set("run.rounds", "many"), 2, "config key 'run.rounds' must be int"),
    ("rounds 0", _set("run.rounds", 0), 2, "'run.rounds' must be >= 1"),
    ("cut ratio above 1", _set("clients.0.cut_ratio", 1.5), 2, "'clients.0.cut_ratio' must be in [0, 1]"),
    ("cut 0 without opt-in", _set("clients.0.cut_ratio", 0.0), 2, "allow_centralized"),
    (
        "cut_step beside the config's cut_ratio",
        _set("clients.0.cut_step", 5),
        2,
        "has both (cut_ratio 0.25, cut_step 5): set clients.0.cut_ratio=null to use cut_step",
    ),
    ("neither cut_ratio nor cut_step", _set("clients.0.cut_ratio", None), 2, "has neither: give one"),
    ("missing shard", _set("clients.0.shard", "/nowhere/c0.h5"), 2, "file '/nowhere/c0.h5' not found"),
    ("image size of another shard", _set("data.image_size", 16), 2, "holds 1x8x8 images, but 'data' asks for"),
    ("client id with a path", _set("clients.0.id", "../../x"), 2, "'clients.0.id' is '../../x'; ids name files"),
    ("client id twice", _set("clients.1.id", "c0"), 2, "client id 'c0' is used twice"),
    ("empty channel_mult", _set("server.model.channel_mult", []), 2, "'server.model.channel_mult' is []"),
    (
        "GroupNorm cannot split",
        _set("server.model.base_channels", 10),
        2,
        "num_channels (30) must be divisible by num_groups (7)",
    ),
    ("width 144 in 32 groups", _set("clients.1.model.base_channels", 36), 2, "must be divisible by num_groups (32)"),
    (  # found only by the forward pass: 8 -> 4 -> 2 -> 1 -> 1, and 1 up-sampled is 2, not 1
        "image size not divisible by 2^(levels - 1)",
        _set("server.model.channel_mult", [1, 1, 1, 1, 1]),
        2,
        "does not give a working UNet for 1x8x8 images: Sizes of tensors must match",
    ),
    ("batch larger than the shard", _set("clients.0.batch_size", 100000), 2, "is 100000, but shard"),
    ("dropout 1", _set("server.model.dropout", 1.0), 2, "'server.model.dropout' must be in [0, 1)"),
    ("sampling steps above T", _set("diffusion.sampling_steps", 99), 2, "'diffusion.sampling_steps' must be in"),
    ("unknown choice", _set("diffusion.schedule", "quadratic"), 2, "valid: ['linear', 'cosine']"),
    ("unknown eval set", _set("eval.sets", ["collaborative", "foo"]), 2, "config key 'eval.sets.1' is 'foo'; valid:"),
    ("no eval set", _set("eval.sets", []), 2, "config key 'eval.sets' is []; give one or more of ['collaborative'"),
    ("shard without channels", _shard(lambda f: f.attrs.__delitem__("channels")), 2, "lacks the attribute(s)"),
    ("float labels", _labels_on(_shard(_float_labels)), 2, "holds float32 values; class labels must be integers"),
    ("labels beyond num_classes", _labels_on(_shard(_labels_beyond)), 2, "set data.num_classes to at least 13"),
    ("override without =", _args("--set", "run.rounds"), 2, "must look like key.path=value"),
    ("resume without a checkpoint", _args("--resume"), 2, "nothing to continue"),
    ("resume with a value", _args("--resume=yes"), 2, "--resume takes no value or 'auto'"),
]


# rows whose file is missing: config plans a job before its data exists, and warns instead
# (tests/test_conventions.py: test_config_plans_a_job_whose_files_do_not_exist_yet)
MISSING_FILES = {"missing shard"}


def _exit_code(args: list[str]) -> int:
    try:
        return main(args)
    except SystemExit as e:  # argparse refuses the command line itself
        return e.code


@pytest.mark.parametrize("command", ["train", "config"])
@pytest.mark.parametrize("name, change, code, fragment", CORPUS, ids=[row[0] for row in CORPUS])
def test_bad_input_gives_one_clear_line_and_writes_nothing(
    tmp_path, shards, capsys, command, name, change, code, fragment
):
    """``config`` refuses what ``train`` refuses, with the same line: a config it accepts trains
    (once the files it warns of exist)."""
    out = tmp_path / "out"
    raw = tiny_config(shards, out, [0.25, 0.5])
    extra = change(raw, tmp_path, shards)
    config, args = (extra, []) if isinstance(extra, str) else (write_config(tmp_path / "run.yaml", raw), extra)
    if command == "config" and any(a.startswith("--resume") for a in args):
        pytest.skip("about continuing a run: config takes no --resume")
    got = _exit_code([command, config, *(["--in-process"] if command == "train" else []), *args])
    err = capsys.readouterr().err
    label = "error:"
    if command == "config" and name in MISSING_FILES:
        code, label = 0, "warning:"
    assert got == code, err
    assert any(fragment in line and label in line for line in err.splitlines()), err
    assert "Traceback" not in err and sum("error:" in line for line in err.splitlines()) == (label == "error:"), err
    assert not out.exists()


@pytest.mark.parametrize("command", [["train", "--dry-run"], ["evaluate"]])
def test_a_config_is_valid_or_not_for_every_command_alike(tmp_path, shards, capsys, command):
    """train --dry-run accepted eval.sets that evaluate refused: one validation (config
    and train: the corpus above)."""
    config = write_config(tmp_path / "run.yaml", tiny_config(shards, tmp_path / "out", [0.25, 0.5]))
    assert _exit_code([command[0], config, *command[1:], "--set", "eval.sets=[collaborative,foo]"]) == 2
    assert "config key 'eval.sets.1' is 'foo'; valid: ['collaborative', " in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# prepare: (name, build(tmp_path) -> command-line arguments after "prepare", exit code, fragment)
def _mnist(edit):
    def build(tmp_path):
        root = tmp_path / "mnist"
        make_mnist(str(root), gz=True)
        edit(root / "train-images-idx3-ubyte.gz")
        return ["mnist", "--root", str(root), "--out", str(tmp_path / "out")]

    return build


def _truncate_gzip(path):
    path.write_bytes(path.read_bytes()[:-40])


def _header_only(path):
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">IIII", 2051, 20, 28, 28)[:6])


def _folder(*extra: str, unreadable_class: int | None = None):
    def build(tmp_path):
        root = tmp_path / "folder"
        make_folder(str(root))
        if unreadable_class is not None:
            for image in (root / f"class_{unreadable_class}").iterdir():
                image.write_bytes(b"not an image")
        return ["folder", "--root", str(root), "--out", str(tmp_path / "out"), "--workers", "1", *extra]

    return build


def _read_only_mount(tmp_path: Path) -> Path:
    """``tmp_path/ro``, a file system mounted read-only (root cannot be kept out otherwise);
    unmounted by :func:`_unmount`."""
    (tmp_path / "ro").mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(tmp_path / "ro")], capture_output=True
    )
    if done.returncode:
        if os.environ.get("CI"):
            pytest.fail(f"cannot mount a read-only tmpfs (CI runs as root): {done.stderr.decode()}")
        pytest.skip("mounting a tmpfs needs root")
    return tmp_path / "ro"


def _unmount(tmp_path: Path) -> None:
    if (tmp_path / "ro").is_dir():
        subprocess.run(["umount", "-l", str(tmp_path / "ro")], check=False)


def _out_read_only(tmp_path):
    return ["digits", "--out", str(_read_only_mount(tmp_path) / "shards")]


def _out_is_a_file(tmp_path):
    (tmp_path / "out").write_text("")
    return ["digits", "--out", str(tmp_path / "out")]


PREPARE_CORPUS = [
    ("truncated gzip IDX", _mnist(_truncate_gzip), 2, "is truncated or damaged (EOFError"),
    ("IDX with only a header", _mnist(_header_only), 2, "is truncated or damaged (error"),
    ("--out is a file", _out_is_a_file, 2, "it is a file, not a folder; give a folder"),
    ("--out on a read-only file system", _out_read_only, 2, "cannot create a file in"),
    ("--alpha nan", _folder("--partition", "dirichlet", "--alpha", "nan"), 2, "must be a positive number, got nan"),
    ("--size 0", _folder("--size", "0"), 2, "--size must be >= 1"),
    ("--bbox-margin without boxes", _folder("--bbox-margin", "0.1"), 2, "--bbox-margin needs bounding boxes (CUB)"),
    (
        "a class that does not decode",
        _folder("--partition", "class", "--clients", "3", unreadable_class=1),
        2,
        "client 1 keeps 0 train and 0 test images once unreadable images are left out; no shard was written",
    ),
]


@pytest.mark.parametrize("name, build, code, fragment", PREPARE_CORPUS, ids=[row[0] for row in PREPARE_CORPUS])
def test_bad_prepare_input_gives_one_clear_line_and_writes_no_shard(tmp_path, capsys, name, build, code, fragment):
    args = build(tmp_path)
    got = _exit_code(["prepare", *args])
    err = capsys.readouterr().err
    assert got == code, err
    assert fragment in err, err
    assert "Traceback" not in err and sum("error:" in line for line in err.splitlines()) == 1, err
    assert not list(tmp_path.glob("out/client_*.h5"))
    _unmount(tmp_path)


# Each command that writes a file or a folder, given a results file, the shards and where to write.
WRITERS = {
    "prepare": lambda results, shards, out: ["prepare", "digits", "--out", out, "--clients", "2", "--size", "8"],
    "train-classifier": lambda results, shards, out: ["train-classifier", *shards, "--out", out],
    "convert-inception": lambda results, shards, out: ["convert-inception", shards[0], out],
    "export": lambda results, shards, out: ["export", results, "--out", out],
    "bundle": lambda results, shards, out: ["bundle", results, out],
    "report": lambda results, shards, out: ["report", results, "--out", out],
}


def _file(path: Path) -> Path:
    path.write_text("mine")
    return path


PLACES = {  # a destination that cannot be written, and the fragment its message must hold
    "under a file": (lambda tmp_path: _file(tmp_path / "notes.txt"), "is a file"),
    "on a read-only file system": (_read_only_mount, "cannot create a file in"),
    "in /proc": (lambda tmp_path: Path("/proc"), "cannot create a file in '/proc'"),
    "under a broken link": (lambda tmp_path: _link(tmp_path / "results", tmp_path / "gone"), "which is missing"),
}


def _link(path: Path, to: Path) -> Path:
    path.symlink_to(to)
    return path


@pytest.mark.parametrize("place", PLACES)
@pytest.mark.parametrize("command", WRITERS)
def test_a_destination_that_cannot_be_written_is_refused_before_the_work(
    tmp_path, shards, capsys, monkeypatch, command, place
):
    """train-classifier trained, and prepare decoded every image, before finding that --out
    could not be written; export and bundle called a folder they could not make "cannot read
    results". The commands that read results are given a shard: refused before reading it."""
    monkeypatch.setattr(
        "collafuse_hpc.evaluation.classifier.train_classifier", lambda *a, **k: pytest.fail("trained first")
    )
    results = shards[0]
    make, fragment = PLACES[place]
    out = make(tmp_path) / "new/out"
    before = file_tree(tmp_path)
    try:
        got = _exit_code(WRITERS[command](results, shards, str(out)))
    finally:
        _unmount(tmp_path)
    err = capsys.readouterr().err
    assert got == 2, err
    assert f"cannot write '{out}" in err and fragment in err, err
    assert "Traceback" not in err and sum("error:" in line for line in err.splitlines()) == 1, err
    assert file_tree(tmp_path) == before and not os.path.lexists(out)


@pytest.mark.slow  # evaluates a run
def test_a_feature_cache_that_cannot_be_written_leaves_the_run_and_says_what_stays(
    tmp_path, evaluated_run, capsys, monkeypatch
):
    """evaluate's failed feature-cache write said "nothing was written", though the cache
    files written before it in the same evaluation stay (to be reused)."""
    run = tmp_path / "run"
    shutil.copytree(evaluated_run(0.25), run)
    before = (run / "results.h5").read_bytes()
    written = []
    real = np.save

    def second_fails(f, value):  # the first client's real features are stored, the second's not
        written.append(f)
        if len(written) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(f, value)

    monkeypatch.setattr("collafuse_hpc.evaluation.features.np.save", second_fails)
    assert _exit_code(["evaluate", str(run), "--set", f"eval.cache_dir={tmp_path / 'cache'}"]) == 1
    err = capsys.readouterr().err
    assert "No space left on device; the run's results are unchanged; feature-cache files written before" in err
    assert "nothing was written" not in err and len(list((tmp_path / "cache").iterdir())) == 1, err
    assert (run / "results.h5").read_bytes() == before


@pytest.mark.slow  # reads an evaluated run
@pytest.mark.parametrize("command", ["export", "bundle"])
def test_a_write_that_fails_is_told_apart_from_a_run_that_cannot_be_read(
    tmp_path, evaluated_run, capsys, monkeypatch, command
):
    """A folder or file that could not be made was reported as "cannot read results"
    (exit 2), which sent the user to check a run that was fine."""
    results = str(evaluated_run(0.25) / "results.h5")
    real = os.replace

    def full_disk(src, dst):
        if str(tmp_path / "new") in str(dst):
            raise OSError(errno.ENOSPC, "No space left on device", src)
        real(src, dst)

    monkeypatch.setattr("collafuse_hpc.atomic.os.replace", full_disk)
    monkeypatch.setattr("collafuse_hpc.results.inspection.np.save", lambda *a: full_disk("x", tmp_path / "new"))
    out = tmp_path / "new/sub/out"
    args = ["export", results, "--out", str(out), "--npy"] if command == "export" else ["bundle", results, str(out)]
    assert _exit_code(args) == 1
    err = capsys.readouterr().err
    assert "cannot write" in err and "No space left on device; nothing was written" in err, err
    assert "cannot read results" not in err and not (tmp_path / "new").exists()


@pytest.mark.parametrize("command", ["train-classifier", "convert-inception", "bundle"])
def test_a_file_output_given_as_a_folder_is_refused_before_the_work(tmp_path, shards, capsys, monkeypatch, command):
    """``--out newdir/`` trained the classifier, then raised torch's "invalid file name"."""
    monkeypatch.setattr(
        "collafuse_hpc.evaluation.classifier.train_classifier", lambda *a, **k: pytest.fail("trained first")
    )
    assert _exit_code(WRITERS[command](shards[0], shards, f"{tmp_path}/new/")) == 2
    assert "it names a folder; give a file name" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_a_report_into_a_mount_point_is_refused_before_the_work(tmp_path, shards, capsys):
    """A report replaces its folder whole, which a mount point cannot be: it failed with
    "Device or resource busy" after the whole report was made."""
    mount = _read_only_mount(tmp_path)
    try:
        assert _exit_code(["report", shards[0], "--out", str(mount)]) == 2
    finally:
        _unmount(tmp_path)
    assert "is a mount point, and a report replaces its folder whole; give a folder in it" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["train", "--in-process"], ["train", "--dry-run"], ["evaluate"], ["config"]])
@pytest.mark.parametrize("key", ["run.output_dir", "eval.cache_dir"])
def test_a_run_folder_or_feature_cache_that_cannot_be_written_is_refused_before_the_work(
    tmp_path, shards, capsys, command, key
):
    """A run folder under a file was "cannot read the run lock (Not a directory): another
    user's job may run in that folder"; evaluate sampled every image (331 s on a study
    run) before finding that its feature cache could not be written."""
    raw = tiny_config(shards, tmp_path / "out", [0.25, 0.5])
    raw["eval"]["at_end"] = True
    config = write_config(tmp_path / "run.yaml", raw)
    (tmp_path / "notes.txt").write_text("mine")
    before = file_tree(tmp_path)
    got = _exit_code([command[0], config, *command[1:], "--set", f"{key}={tmp_path}/notes.txt/sub"])
    err = capsys.readouterr().err
    assert got == 2 and f"{key}: cannot write '{tmp_path}/notes.txt/sub': '{tmp_path}/notes.txt' is a file" in err, err
    assert file_tree(tmp_path) == before and not (tmp_path / "out").exists()


def test_a_default_feature_cache_that_cannot_be_written_says_it_is_the_default_and_how_to_move_it(
    tmp_path, shards, capsys, monkeypatch
):
    """The refusal named "eval.cache_dir (its default)" without saying how to move it."""
    raw = tiny_config(shards, tmp_path / "out", [0.25, 0.5])
    raw["eval"].update(at_end=True, cache_dir="")
    config = write_config(tmp_path / "run.yaml", raw)
    (tmp_path / "notes.txt").write_text("mine")
    monkeypatch.setenv("HOME", str(tmp_path / "notes.txt"))
    monkeypatch.delenv("COLLAFUSE_CACHE", raising=False)
    assert _exit_code(["config", config]) == 2
    err = capsys.readouterr().err
    said = "eval.cache_dir (empty: its default; set it or $COLLAFUSE_CACHE to move it): cannot write"
    assert said in err and f"'{tmp_path}/notes.txt' is a file" in err, err


def test_a_read_only_cache_serves_and_a_read_only_run_folder_stops_only_what_writes_there(tmp_path, shards):
    """evaluate refused a read-only feature cache that held every feature it needed, and
    a run folder it does not write in (it writes only results.h5); train and sample
    write there, and a dry run finds out without writing."""
    from collafuse_hpc.config import from_dict
    from collafuse_hpc.evaluation.evaluate import check_places

    mount = _read_only_mount(tmp_path)
    try:
        raw = tiny_config(shards, mount / "run", [0.25, 0.5])
        raw["eval"]["cache_dir"] = str(mount / "cache")
        cfg = from_dict(raw)
        check_places(cfg, evaluating=True, writes_run=False)  # evaluate
        with pytest.raises(ValueError, match="run.output_dir: cannot write .* read-only file system"):
            check_places(cfg, evaluating=True, writes_run=True)  # train, sample
    finally:
        _unmount(tmp_path)


def test_a_path_with_dots_is_checked_and_written_as_the_system_takes_it(tmp_path, shards, monkeypatch, capsys):
    """``q/../x`` trained, then failed (q does not exist); ``link/../x`` is base/x to the
    system (link to base/inner), and a check that took ``..`` as text looked at ./x, and
    at a broken link's target."""

    def train(shards, out, **kwargs):
        Path(out).write_text("weights")
        return {"train_images": 1, "num_classes": 1, "accuracy": 1.0, "test_images": 1}

    (tmp_path / "base/inner").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "base/inner")
    (tmp_path / "broken").symlink_to(tmp_path / "gone/deep")
    (tmp_path / "base/old.pt").write_text("mine")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("collafuse_hpc.evaluation.classifier.train_classifier", train)
    assert main(["train-classifier", shards[0], "--out", "link/../cls.pt"]) == 0
    assert (tmp_path / "base/cls.pt").exists() and not (tmp_path / "cls.pt").exists()
    for out, said in (
        ("q/../cls2.pt", "it goes through 'q', missing"),
        ("broken/../cls3.pt", "it goes through 'broken', a link to"),
        ("link/../old.pt", "exists: evaluations already made with it"),
    ):
        assert main(["train-classifier", shards[0], "--out", out]) == 2, out
        assert said in capsys.readouterr().err, out
    assert not (tmp_path / "gone").exists() and (tmp_path / "base/old.pt").read_text() == "mine"
    (tmp_path / "afile").write_text("mine")
    for args, said in (  # a trailing slash or a last ".." hid what the path goes through
        (["train-classifier", shards[0], "--out", "q/.."], "it names a folder; give a file name"),
        (["prepare", "digits", "--out", "q/../"], "it goes through 'q', missing"),
        (["prepare", "digits", "--out", "afile/"], "it is a file, not a folder"),
        (["prepare", "digits", "--out", "broken/"], "'broken' is a link to"),
    ):
        assert main(args) == 2, args
        assert said in capsys.readouterr().err, args
    assert main(["train-classifier", shards[0], "--out", "plain.pt"]) == 0  # no folder in the path
    assert sorted(os.listdir(tmp_path)) == ["afile", "base", "broken", "link", "plain.pt"]


def test_dots_and_an_empty_path_are_the_folders_the_system_takes(tmp_path, monkeypatch):
    """``a/./b`` left ``a`` behind after a failed write (rmdir of ``a/.`` fails and ended the
    clean-up); an empty path was checked as ``/``, where the system writes into ``.``."""
    from collafuse_hpc.atomic import check_destination, made_folder

    monkeypatch.chdir(tmp_path)
    for path in ("a/./b", "c/b/."):
        with pytest.raises(RuntimeError), made_folder(path):
            raise RuntimeError("the write failed")
    assert os.listdir(tmp_path) == []
    monkeypatch.chdir(_read_only_mount(tmp_path))
    try:
        with pytest.raises(ValueError, match="cannot create a file in '.'"):
            check_destination("", folder=True)
    finally:
        monkeypatch.chdir(tmp_path)
        _unmount(tmp_path)


@pytest.mark.slow  # reads an evaluated run
def test_a_damaged_part_file_is_named_by_every_command_that_reads_the_run(tmp_path, evaluated_run, capsys):
    """A part file damaged in its middle made inspect, compare and report end in HDF5's
    KeyError or RuntimeError traceback, export too, and bundle said "cannot read results";
    a part cut short was called "missing (the rank never started)" though it was there, and
    compare left it out of its totals without a word (exit 0). Each command now names the
    part and says it is damaged, at every place the damage lands."""
    run = tmp_path / "run"
    shutil.copytree(evaluated_run(0.25), run, ignore=shutil.ignore_patterns("checkpoints"))
    part = run / "parts/client_c1.h5"
    original = part.read_bytes()
    results = str(run / "results.h5")
    named = "clients/c1: part file parts/client_c1.h5 (damaged: HDF5 cannot read it whole"
    for n, at in enumerate([-1, *range(0, len(original), len(original) // 16)]):
        damaged = original[: len(original) // 2] if at < 0 else original[:at] + b"\xff" * 3000 + original[at + 3000 :]
        part.write_bytes(damaged)
        for args in (
            ["inspect", results],
            ["compare", results, results],
            ["export", results, "--out", str(tmp_path / f"grids{n}")],
            ["bundle", results, str(tmp_path / f"bundle{n}.h5")],
            ["report", results, "--out", str(tmp_path / f"report{n}")],
        ):
            got = _exit_code(args)  # an exception would fail the test here
            captured = capsys.readouterr()
            said = captured.out + captured.err
            assert "Traceback" not in said, (at, args, said)
            if got:  # the damage was in what the command reads: it names the part
                assert named in said, (at, args, said)
            if at < 0:  # cut short: there, and damaged, not "never started"; compare left it out of its totals
                assert got == (2 if args[0] == "report" else 1) and named in said, (args, said)
                assert "never started" not in said, said
    assert _exit_code(["inspect", str(tmp_path / "bundle0.h5")]) == 1  # the bundle made of the part cut short
    said = capsys.readouterr().out
    assert "part file parts/client_c1.h5 (left out of this bundle: it could not be read when" in said, said
    part.write_bytes(original)
    for garbage in (10**17, -(10**17)):  # readable, but numpy was asked for 1e17 rounds, or fewer than none
        with h5py.File(part, "a") as f:
            f["rounds/round"][-1] = garbage
        assert _exit_code(["report", results, "--out", str(tmp_path / "report-rounds")]) == 2
        assert "a part file is damaged" in capsys.readouterr().err
    part.unlink()
    part.symlink_to(tmp_path / "elsewhere/client_c1.h5")
    assert _exit_code(["inspect", results]) == 1
    assert "part file parts/client_c1.h5 (a link to" in capsys.readouterr().out


def _edit_attrs(path: Path, change) -> None:
    with h5py.File(path, "a") as f:
        change(f)


def _overwrite_header(path: Path, name: str) -> None:
    """Write garbage over the object header of ``name``: damage in one known place."""
    with h5py.File(path, "r") as f:
        at = h5py.h5o.get_info(f[name].id).addr
    data = bytearray(path.read_bytes())
    data[at : at + 16] = b"\xff" * 16
    path.write_bytes(bytes(data))


@pytest.mark.slow  # reads an evaluated run
def test_a_damaged_results_file_names_the_object_or_attribute_and_every_command_refuses_it(
    tmp_path, evaluated_run, shards, capsys, monkeypatch
):
    """The review of the whole-file read found attributes that still ended in a traceback
    (a number where YAML text belongs: AttributeError; YAML of the wrong shape: the readers'
    AttributeError or KeyError), a damaged header named as the object read before it, a
    dangling /metrics link ending bundle in a KeyError, and an empty results.h5 called
    "not a readable HDF5 file; pass the results.h5 in a run's output_dir"."""
    run = tmp_path / "run"
    shutil.copytree(evaluated_run(0.25), run)
    index = run / "results.h5"
    original = index.read_bytes()
    cases = [
        (lambda p: _edit_attrs(p, lambda f: f.attrs.__setitem__("config", 5)), "/ (attribute config) (a int64"),
        (lambda p: _edit_attrs(p, lambda f: f.attrs.__setitem__("config", "just text")), "/ (attribute config) (YAML"),
        (lambda p: _edit_attrs(p, lambda f: f.attrs.__delitem__("config")), "/ (attribute config) (it holds no"),
        (lambda p: _edit_attrs(p, lambda f: f.attrs.__setitem__("roles", "[1, 2]")), "/ (attribute roles) (YAML"),
        (lambda p: _edit_attrs(p, lambda f: f["records/0"].attrs.__setitem__("settings", np.arange(3))),
         "/records/0 (attribute settings) (a ndarray"),
        (lambda p: _edit_attrs(p, lambda f: f.__delitem__("records/1/metrics")), "/metrics (a link to"),
        (lambda p: _overwrite_header(p, "records/1"), "/records/1 ("),
        (lambda p: _overwrite_header(p, "records/1/metrics/c1/cut"), "/records/1/metrics/c1/cut ("),
        (lambda p: _edit_attrs(p, lambda f: f["records/0"].attrs.__setitem__(b"\xff\xfeab", 1)),
         "/records/0 (attribute b'\\xff\\xfeab') (an attribute name that is not text"),  # readers' KeyError
        (lambda p: p.write_bytes(b""), "/ (the file is empty)"),
    ]  # fmt: skip
    for damage, where in cases:
        index.write_bytes(original)
        damage(index)
        for args in (
            ["inspect", str(run)],
            ["compare", str(run), str(run)],
            ["export", str(run), "--out", str(tmp_path / "grids")],
            ["bundle", str(run), str(tmp_path / "bundle.h5")],
            ["report", str(index), "--out", str(tmp_path / "report")],
        ):
            assert _exit_code(args) == 2, (where, args)
            err = capsys.readouterr().err
            assert f"{str(index)!r} is damaged at {where}" in err and "Traceback" not in err, (where, args, err)
            assert sorted(os.listdir(tmp_path)) == ["run"], (where, args)
    # evaluate of the run's config refuses before it samples (it had sampled everything, then refused)
    config = write_config(tmp_path.parent / "run.yaml", tiny_config(shards, run, [0.25, 0.25], rounds=2))
    with monkeypatch.context() as m:
        m.setattr("collafuse_hpc.evaluation.evaluate.load_roles", lambda *a: pytest.fail("sampled first"))
        assert _exit_code(["evaluate", config]) == 2
    assert f"{str(index)!r} is damaged at / (the file is empty)" in capsys.readouterr().err
    # a bundle holds its roles' content: one damaged inside it is named, and the others are read
    index.write_bytes(original)
    bundle = tmp_path.parent / "bundle.h5"
    assert _exit_code(["bundle", str(run), str(bundle)]) == 0
    _overwrite_header(bundle, "clients/c1/rounds")
    assert _exit_code(["inspect", str(bundle)]) == 1
    out = capsys.readouterr().out
    assert "clients/c1: part file parts/client_c1.h5 (damaged inside this bundle" in out and "c0" in out, out
    _overwrite_header(run / "parts/client_c1.h5", "rounds")  # a part's group: it was shown with no rounds
    assert _exit_code(["inspect", str(run)]) == 1
    assert "clients/c1: part file parts/client_c1.h5 (damaged: HDF5 cannot read it whole" in capsys.readouterr().out
    shutil.copy(evaluated_run(0.25) / "parts/client_c1.h5", run / "parts/client_c1.h5")
    _edit_attrs(run / "parts/client_c1.h5", lambda f: f["rounds"].attrs.__setitem__(b"\xff\xfeab", 1))
    for args in (["inspect", str(run)], ["bundle", str(run), str(tmp_path.parent / "bundle2.h5")]):
        assert _exit_code(args) == 1, args  # inspect's TypeError; bundle had copied the damage in
        said = capsys.readouterr()
        assert "clients/c1: part file parts/client_c1.h5 (damaged" in said.out + said.err, (args, said)


@pytest.mark.slow  # evaluates a run
def test_evaluate_names_a_client_part_it_cannot_read_and_writes_nothing(tmp_path, evaluated_run, capsys):
    """evaluate reads each client's audit (how often each image left it) from its part: a
    part cut short ended in HDF5's "Unable to synchronously open file" without a file
    name, and a part replaced by a broken link was skipped, counting no releases."""
    run = tmp_path / "run"
    shutil.copytree(evaluated_run(0.25), run)
    part = run / "parts/client_c1.h5"
    part.write_bytes(part.read_bytes()[:1000])
    before = _listing(run)
    for said in ("damaged: HDF5 cannot read it whole", "a link to"):
        assert _exit_code(["evaluate", str(run)]) == 2
        err = capsys.readouterr().err
        assert f"client 'c1': its part file {str(part)!r} cannot be read ({said}" in err, err
        assert "restore the file" in err and _listing(run) == before
        part.unlink()
        part.symlink_to(tmp_path / "elsewhere.h5")
        before = _listing(run)


def _listing(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.lstat().st_size for p in sorted(folder.rglob("*"))}


@pytest.mark.slow  # reads an evaluated run
def test_a_damaged_results_file_is_named_by_every_command_and_nothing_is_written(tmp_path, evaluated_run, capsys):
    """results.h5 itself damaged made inspect, compare, report and bundle end in HDF5's
    KeyError or RuntimeError traceback and export in a TypeError, wherever the damage
    landed. Each command now says the file is damaged and where, exits 2 and writes
    nothing; the part files, which it is not, are named as kept."""
    run = tmp_path / "run"
    shutil.copytree(evaluated_run(0.25), run)
    index = run / "results.h5"
    original, before = index.read_bytes(), _listing(run)
    results = str(index)
    said_damaged = f"{results!r} is damaged at /"
    found = 0
    for at in [-1, *range(0, len(original), len(original) // 16)]:
        damaged = original[: len(original) // 2] if at < 0 else original[:at] + b"\xff" * 512 + original[at + 512 :]
        index.write_bytes(damaged)
        commands = [
            ["inspect", results],
            ["compare", results, results],
            ["export", results, "--out", str(tmp_path / "grids")],
            ["bundle", results, str(tmp_path / "bundle.h5")],
            ["report", results, "--out", str(tmp_path / "report")],
        ]
        if at < 0:  # the commands that act on the run: each reads the config first
            commands += [["evaluate", str(run)], ["sample", str(run), "--in-process"]]
        for args in commands:
            got = _exit_code(args)  # an exception would fail the test here
            captured = capsys.readouterr()
            said = captured.out + captured.err
            assert "Traceback" not in said, (at, args, said)
            if said_damaged in said:
                assert got == 2 and "part files in parts/ are separate" in said, (at, args, said)
                assert sorted(os.listdir(tmp_path)) == ["run"], (at, args, os.listdir(tmp_path))
                found += 1
            elif at < 0:
                pytest.fail(f"{args}: a results file cut short was not named: {said}")
        assert _listing(run) == {**before, "results.h5": len(damaged)} and index.read_bytes() == damaged, at
        for name in set(os.listdir(tmp_path)) - {"run"}:  # what a command read past undetected damage wrote
            shutil.rmtree(tmp_path / name) if (tmp_path / name).is_dir() else (tmp_path / name).unlink()
    assert found >= 5 * 8  # the damage was found where it landed in most places, not only when cut short
    index.write_bytes(original)
    assert _exit_code(["inspect", results]) == 0


@pytest.mark.slow  # reads an evaluated run
def test_a_report_goes_where_its_path_points_as_the_system_takes_it(tmp_path, evaluated_run, monkeypatch, capsys):
    """report took --out as text: ``link/../rep`` was ./rep (the system: base/rep) and
    ``q/../rep`` was accepted; a link to a report folder was replaced by a folder, leaving
    ``.NAME-*.old`` behind; ``--out /`` was refused as "it names a folder; give a file name"."""
    results = str(evaluated_run(0.25) / "results.h5")
    (tmp_path / "base/inner").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "base/inner")
    (tmp_path / "broken").symlink_to(tmp_path / "gone")
    (tmp_path / "reports/first").mkdir(parents=True)
    (tmp_path / "latest").symlink_to(tmp_path / "reports/first")
    monkeypatch.chdir(tmp_path)
    for out in ("link/../rep", "latest", "latest/", "new/"):
        assert main(["report", results, "--out", out]) == 0, out
        assert "report: error" not in capsys.readouterr().err
    assert (tmp_path / "base/rep/table.csv").exists() and not (tmp_path / "rep").exists()
    assert (tmp_path / "latest").is_symlink() and (tmp_path / "reports/first/table.csv").exists()
    assert sorted(os.listdir(tmp_path / "reports")) == ["first"]  # no .first-*.old
    assert (tmp_path / "new/table.csv").exists()
    before = file_tree(tmp_path)
    for out, said in (
        ("q/../rep", "it goes through 'q', missing"),
        ("broken", "--out broken is a link to"),
        ("/", "names a folder by '/', '.' or '..'; give the report folder's own name"),
        ("..", "names a folder by '/', '.' or '..'"),
        ("", "--out is empty"),
    ):
        assert main(["report", results, "--out", out]) == 2, out
        assert said in capsys.readouterr().err, out
    assert file_tree(tmp_path) == before and not (tmp_path / "q").exists() and not (tmp_path / "gone").exists()
