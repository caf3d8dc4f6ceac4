"""``collafuse-hpc report`` on evaluated runs: which runs it counts as seeds of which
point, what it leaves out and says so (a run made twice by a sweep, a seed without its
c = 1 partner, metrics older than the run), and the report from an installed wheel."""

from __future__ import annotations

import csv
import errno
import fcntl
import html
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest
import yaml
from conftest import tiny_config

from collafuse_hpc.cli import main
from collafuse_hpc.config import from_dict
from collafuse_hpc.evaluation.evaluate import evaluate
from collafuse_hpc.runtime.run import run_in_process

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def evaluated(evaluated_run) -> Path:
    """The folder of one run (c = 0.25, seed 0), trained 2 rounds and evaluated, shared by
    the session (conftest): copy it to change it."""
    return evaluated_run(0.25)


def _copy(run: Path, to: Path, c: float | None = None, split: str | None = None, seed: int | None = None) -> Path:
    """A copy of ``run`` labelled as another point (its config's cut, split mode or seed):
    what the report groups by, without training each point."""
    shutil.copytree(run, to)
    with h5py.File(to / "results.h5", "a") as f:
        config = yaml.safe_load(f.attrs["config"])
        for client in config["clients"]:
            client["cut_ratio"] = client["cut_ratio"] if c is None else c
        config["diffusion"]["split"] = split or config["diffusion"]["split"]
        config["run"]["seed"] = config["run"]["seed"] if seed is None else seed
        f.attrs["config"] = yaml.safe_dump(config)
    return to / "results.h5"


def _report(capsys, *paths: Path, out: Path) -> subprocess.CompletedProcess:
    """``collafuse-hpc report`` in this process: its exit code and what it printed (the
    command's own process: the installed-wheel test below)."""
    args = ["report", *map(str, paths), "--out", str(out)]
    code = main(args)
    said = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, said.out, said.err)


def _rows(out: Path, name: str) -> list[dict]:
    with open(out / name) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_a_c1_run_made_under_each_split_mode_is_one_seed_and_a_seed_without_c1_is_named(evaluated, tmp_path, capsys):
    """A study run once with SPLITS=markov and once with SPLITS=reference trains c = 1
    twice for one seed: pooled as two seeds (and versus_c1 taking either), the seed
    interval narrowed. A seed of c < 1 without its c = 1 run fell out of versus_c1 unsaid."""
    local = [_copy(evaluated, tmp_path / f"c1-{split}", c=1.0, split=split) for split in ("markov", "reference")]
    seeds = [evaluated / "results.h5", _copy(evaluated, tmp_path / "c0.25-s1", seed=1)]
    done = _report(capsys, *local, *seeds, out=tmp_path / "report")
    assert done.returncode == 0, done.stderr
    assert f"{local[1]} left out: the same point as {local[0]}" in done.stdout
    assert "c = 0.25: seed(s) 1 left out of versus_c1 (no c = 1 run of that partition and seed)" in done.stdout
    table = {(r["split"], r["c"], r["who"]): r for r in _rows(tmp_path / "report", "table.csv")}
    assert table["markov", "1.0", "pooled"]["seeds"] == "1" and table["markov", "0.25", "pooled"]["seeds"] == "2"
    versus = _rows(tmp_path / "report", "versus_c1.csv")
    assert versus and {(v["seeds"], v["unpaired"]) for v in versus} == {("1", "1")}
    md = (tmp_path / "report/table.md").read_text()
    assert "### Left out" in md and "the same point as" in md and "seed(s) 1 left out of versus_c1" in md
    # the same run given twice is still refused: it is not a second seed
    done = _report(capsys, local[0], local[0], out=tmp_path / "twice")
    assert done.returncode == 2 and "are the same point" in done.stderr


@pytest.mark.slow
def test_metrics_older_than_the_run_are_left_out_and_inspect_says_so(evaluated, tmp_path, capsys):
    """Evaluated at round 2, then trained on to 3: its row would show round 2's numbers
    as the 3-round run's."""
    run = tmp_path / "run"
    shutil.copytree(evaluated, run)
    raw = tiny_config([c["shard"] for c in _config(run)["clients"]], run, [0.25, 0.25], rounds=3)
    run_in_process(from_dict(raw), resume=True)
    done = _report(capsys, run / "results.h5", out=tmp_path / "report")
    assert done.returncode == 1 and "no evaluated runs" in done.stdout
    stale = "its metrics are of round 2, but the run has since trained to round 3"
    assert f"left out: {stale}: evaluate it again" in done.stdout
    capsys.readouterr()
    assert main(["inspect", str(run / "results.h5")]) == 0
    assert f"not the run as it now is: {stale}" in capsys.readouterr().out
    assert main(["compare", str(run / "results.h5")]) == 0
    assert "2 (stale)" in capsys.readouterr().out  # compare marks it too
    evaluate(from_dict(raw))
    done = _report(capsys, run / "results.h5", out=tmp_path / "report")
    assert done.returncode == 0 and "left out" not in done.stdout, done.stdout


def _config(run: Path) -> dict:
    with h5py.File(run / "results.h5", "r") as f:
        return yaml.safe_load(f.attrs["config"])


@pytest.mark.slow
def test_the_report_runs_from_an_installed_wheel_outside_the_repository(evaluated, tmp_path):
    """On a cluster the package comes from a wheel (a module), without tools/: the report,
    its statistics and figures are in the package, and its folder takes the umask."""
    source, wheels = tmp_path / "source", tmp_path / "wheels"  # setuptools builds in the tree: a copy of it
    # a git checkout: the files git tracks (a developer's also holds ignored runs/ and data/, gigabytes written
    # meanwhile); an unpacked source tree: all of it
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True)
    if tracked.returncode == 0 and tracked.stdout:
        for name in (n for n in tracked.stdout.split("\0") if n and (ROOT / n).is_file()):
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    else:
        shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".venv", "build", "*.egg-info", "__pycache__"))
    wheel = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels)]
    built = subprocess.run(
        [*wheel, str(source)],
        capture_output=True,
        text=True,
    )
    assert built.returncode == 0, built.stderr
    site = tmp_path / "site"
    wheel = next(wheels.glob("collafuse_hpc-*.whl"))
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
        capture_output=True,
        text=True,
    )
    assert installed.returncode == 0, installed.stderr
    assert not (site / "tools").exists()
    env = {**os.environ, "PYTHONPATH": str(site)}
    where = subprocess.run(
        [sys.executable, "-c", "import collafuse_hpc.report; print(collafuse_hpc.report.__file__)"],
        cwd=tmp_path, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert where.stdout.startswith(str(site)), where.stdout + where.stderr
    old = os.umask(0o022)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "collafuse_hpc", "report", str(evaluated / "results.h5"), "--out", "report"],
            cwd=tmp_path, env=env, capture_output=True, text=True,
        )  # fmt: skip
    finally:
        os.umask(old)
    assert done.returncode == 0, done.stderr
    assert {"table.csv", "versus_c1.csv", "table.md", "report.html"} <= set(os.listdir(tmp_path / "report"))
    assert (tmp_path / "report").stat().st_mode & 0o777 == 0o755
    # without matplotlib (an optional extra): the tables, and how to get the figures
    hidden = tmp_path / "no-matplotlib/matplotlib"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ImportError('matplotlib hidden by the test')\n")
    env["PYTHONPATH"] = f"{site}{os.pathsep}{hidden.parent}"
    done = subprocess.run(
        [sys.executable, "-m", "collafuse_hpc", "report", str(evaluated / "results.h5"), "--out", "plain"],
        cwd=tmp_path, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0 and "pip install 'collafuse-hpc[report]'" in done.stdout, done.stdout + done.stderr
    assert not list((tmp_path / "plain").glob("*.png")) and (tmp_path / "plain/report.html").exists()


@pytest.mark.slow  # its run is trained and evaluated (conftest.evaluated_run): 20 s on busy cores
def test_the_report_of_one_run_says_and_shows_only_what_it_holds(evaluated, tmp_path, monkeypatch):
    """One run's report promised '[a, b] is the 95% interval' where none appeared, showed 27
    quality columns mostly n/a, drew the trade-off figure's x labels over each other (ticks
    around one c) and left versus_c1.csv a bare header without a word on why."""
    import matplotlib.pyplot as plt

    from collafuse_hpc.report.make import make_report

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figures to measure their labels
    assert make_report([str(evaluated / "results.h5")], str(tmp_path / "report")) == 0
    legend, tables = (tmp_path / "report/table.md").read_text().split("\n\n", 1)
    assert ("[a, b]" in legend) == bool(re.search(r"\[[^]]+, [^]]+\]", tables)), legend
    assert "versus_c1.csv has no rows: no run at c = 1" in legend and _rows(tmp_path / "report", "versus_c1.csv") == []
    for table in tables.split("### ")[1:]:
        rows = [line.strip("|").split(" | ") for line in table.splitlines() if line.startswith("|")][2:]
        for column in list(zip(*rows))[6:]:  # after split, partition, labels shared, c, client, seeds
            assert any(cell.strip() not in ("n/a", "-") for cell in column), table.splitlines()[0]
    assert len(figures) == 2  # the trade-off and the loss
    for fig in figures:
        renderer = fig.canvas.get_renderer()
        for axis in fig.axes:
            labels = [label for label in axis.get_xticklabels() if label.get_text()]
            boxes = [label.get_window_extent(renderer) for label in labels]
            assert not any(a.overlaps(b) for a, b in zip(boxes, boxes[1:])), [t.get_text() for t in labels]


@pytest.mark.slow  # its run is trained and evaluated (conftest.evaluated_run)
def test_a_report_with_a_c1_run_and_nothing_to_pair_says_why_versus_c1_is_empty(evaluated, tmp_path, capsys):
    """A study's first finished point is often c = 1: the report of it alone, or beside a
    c < 1 run of another seed, raised KeyError 'seed' (the reason was sought in the rows
    averaged over seeds) instead of saying why versus_c1.csv is empty."""
    alone = _copy(evaluated, tmp_path / "c1-s0", c=1.0)
    other_seed = _copy(evaluated, tmp_path / "c0.25-s1", seed=1)
    for runs, why in (
        ([alone], "no run to compare with c = 1 (one cut ratio c < 1 for every client, or a federated run)"),
        ([alone, other_seed], "no run compared with c = 1 has a c = 1 run of its partition and seed"),
    ):
        done = _report(capsys, *runs, out=tmp_path / f"report{len(runs)}")
        assert done.returncode == 0, done.stderr
        assert f"versus_c1.csv has no rows: {why}" in done.stdout
        page = (tmp_path / f"report{len(runs)}/report.html").read_text()
        assert html.escape(f"versus_c1.csv has no rows: {why}") in page
        assert _rows(tmp_path / f"report{len(runs)}", "versus_c1.csv") == []
    assert "c = 0.25: seed(s) 1 left out of versus_c1 (no c = 1 run of that partition and seed)" in done.stdout


@pytest.mark.slow  # its run is trained and evaluated (conftest.evaluated_run): 20 s on busy cores
def test_a_pooled_fid_is_printed_with_why_it_sits_below_the_clients(evaluated, tmp_path, capsys):
    """A pooled FID below every client's (6.00 against 12.81 and 12.16) went unexplained: FID
    falls as the number of images grows. evaluate's printout, inspect, compare (with each
    client's FID beside the pooled one) and the report say so wherever a pooled FID is printed."""
    from collafuse_hpc.evaluation.evaluate import print_report
    from collafuse_hpc.evaluation.quality import POOLED_FID
    from collafuse_hpc.results.inspection import summarize

    results = str(evaluated / "results.h5")
    metrics = summarize(results)["metrics"]
    fids = {who: metrics[who]["collaborative"]["fid"] for who in ("pooled", "c0", "c1")}
    assert fids["pooled"] < min(fids["c0"], fids["c1"]), fids  # the case the note explains
    capsys.readouterr()
    print_report({who: sets for who, sets in metrics.items() if who != "attrs"})
    assert main(["inspect", results]) == 0
    assert main(["compare", results]) == 0
    assert main(["report", results, "--out", str(tmp_path / "report")]) == 0
    printed = capsys.readouterr().out
    assert printed.count(f"({POOLED_FID})") == 3 and f"FID/FD {POOLED_FID}." in printed
    assert re.search(r"FID collaborative c0 +\S", printed) and re.search(r"FID collaborative c1 +\S", printed)
    assert POOLED_FID in (tmp_path / "report/table.md").read_text()
    assert html.escape(POOLED_FID) in (tmp_path / "report/report.html").read_text()


@pytest.mark.slow  # its run is trained and evaluated (conftest.evaluated_run): 20 s on busy cores
def test_each_fedavg_row_shows_the_membership_of_the_model_its_clients_sample_with(evaluated, tmp_path):
    """A fine-tuned FedAvg run is two rows: its global model's samples (fedavg) and the
    fine-tuned ones (fedavg+ft). The global row's client's-model AUC was the fine-tuned
    model's (mia_client_auc), which its clients do not sample with and no other party
    holds; it is the global model's (mia_federated_auc), which the server and every
    other client hold. The three-way table puts the copy rates and the linkage at the
    run's releases, with its interval where evaluate wrote one, beside precision and recall.
    The federated run is the split run's copy with a FedAvg config and known membership
    figures, as _copy labels runs without training them."""
    split, fed = tmp_path / "split", tmp_path / "fedavg"
    shutil.copytree(evaluated, split)
    shutil.copytree(evaluated, fed)
    with h5py.File(split / "results.h5", "a") as f:
        for who, figures in (("c0", (0.5, 0.25, 0.75)), ("c1", (0.75, 0.5, 1.0))):  # linkage, its low and high
            attack = f[f"metrics/{who}/attack"].attrs
            for end, value in zip(("", "_low", "_high"), figures, strict=True):
                attack[f"link_pixel_top1_releases{end}"] = value
    known = {"federated": (0.9, 0.8, 1.0), "client": (0.6, 0.55, 0.65)}  # AUC, its interval's low and high
    with h5py.File(fed / "results.h5", "a") as f:
        config = yaml.safe_load(f.attrs["config"])
        config["run"]["method"] = "federated"
        config["federated"] = {"local_steps": 2, "finetune_steps": 3, "architecture": "server"}
        f.attrs["config"] = yaml.safe_dump(config)
        m = f["metrics"]
        for who in ("pooled", "c0", "c1"):
            m.copy(m[f"{who}/collaborative"], m[who], name="global")
            membership = m[f"{who}/membership"].attrs
            for key in [key for key in membership if key.startswith("mia_")]:
                del membership[key]
            for model, figures in known.items():
                for end, value in zip(("", "_low", "_high"), figures, strict=True):
                    membership[f"mia_{model}_auc{end}"] = value
            if who != "pooled":  # a federated client sends no x_c: nothing to attack
                del m[f"{who}/attack"]
                m[f"{who}/disclosure"].attrs["mu_composed"] = 0.0
    from collafuse_hpc.report.make import make_report

    assert make_report([str(split / "results.h5"), str(fed / "results.h5")], str(tmp_path / "report")) == 0
    rows = {(r["method"], r["who"]): r for r in _rows(tmp_path / "report", "table.csv")}
    for who in ("pooled", "c0", "c1"):
        assert float(rows["fedavg", who]["mia_client_auc"]) == 0.9 == float(rows["fedavg", who]["mia_federated_auc"])
        assert float(rows["fedavg", who]["mia_client_auc_low"]) == 0.8
        assert float(rows["fedavg+ft", who]["mia_client_auc"]) == 0.6
        assert float(rows["fedavg+ft", who]["mia_federated_auc"]) == 0.9
    md = (tmp_path / "report/table.md").read_text()
    three_way = md.split("### Alone (c = 1), federated and split")[1].split("\n### ")[0]
    header, _, *cells = [line.strip("|").split(" | ") for line in three_way.splitlines() if line.startswith("|")]
    header = [h.strip() for h in header]
    from collafuse_hpc.report.tables import COLUMNS, METHODS

    for key in ("copy_rate_pixel", "copy_rate_feature", "link_pixel_top1_releases"):  # no classifier: no precision
        assert COLUMNS[key] in header, key
    assert METHODS.index("copy_rate_pixel") == METHODS.index("recall") + 1
    linkage = {
        (row[0].strip(), row[3].strip()): row[header.index(COLUMNS["link_pixel_top1_releases"])] for row in cells
    }
    assert linkage["split", "c0"] == "0.5 [0.25, 0.75]"
    # pooled: 10 of the two clients' 16 probes, with Wilson's interval (scipy's: [0.3864, 0.8152])
    assert linkage["split", "pooled"] == "0.625 [0.3864, 0.8152]"
    assert linkage["fedavg", "c0"] == "no x_c sent (federated: model updates only)"


def test_the_tradeoff_figure_puts_each_fedavg_row_at_its_global_model_s_membership():
    """The quality-against-disclosure panel places FedAvg by what the server and every other
    client hold, the global model (its membership AUC), against the FID of the samples the
    row describes: the global model's set, or the fine-tuned clients' under +ft; split rows
    and rows without a global model's AUC are not federated points."""
    from collafuse_hpc.report.figures import federated_points

    nan = float("nan")
    rows = [
        {"method": "fedavg", "mia_federated_auc": 0.55, "fid_global": 5.5, "fid_collaborative": 5.5},
        {"method": "fedavg+ft", "mia_federated_auc": 0.55, "fid_global": 5.5, "fid_collaborative": 2.6},
        {"method": "fedavg", "mia_federated_auc": 0.6, "fid_global": nan, "fid_collaborative": 7.0},  # no global set
        {"method": "split", "mia_federated_auc": nan, "fid_global": nan, "fid_collaborative": 1.0},
        {"method": "fedavg", "mia_federated_auc": nan, "fid_global": 5.0, "fid_collaborative": 5.0},  # not scored
    ]
    assert federated_points(rows) == [("fedavg", 0.55, 5.5), ("fedavg+ft", 0.55, 2.6), ("fedavg", 0.6, 7.0)]


def test_the_tradeoff_figure_draws_one_line_per_condition(tmp_path, monkeypatch):
    """Rows of two partitions and of labels kept and shared: one line per split mode
    joined them all, c going 0.2, 0.5, 0.2, 0.5, ...; each condition is its own line, named
    by what differs, and each partition's FedAvg point names its partition."""
    pytest.importorskip("matplotlib")

    import matplotlib.pyplot as plt

    from collafuse_hpc.report.figures import tradeoff_figure
    from collafuse_hpc.report.tables import COLUMNS

    def row(partition: str, share: str, c: float, method: str = "split") -> dict:
        numbers = {key: 0.5 for key in COLUMNS if key not in ("method", "split", "partition", "share", "c", "who")}
        return {f"{key}_seed_std": math.nan for key in COLUMNS} | numbers | {
            "method": method, "split": "markov", "partition": partition, "share": share, "c": c, "who": "pooled",
            "seeds": 1, "features": "classifier"}  # fmt: skip

    pooled = [row(p, s, c) for p in ("class", "iid") for s in ("off", "on") for c in (0.2, 0.5)]
    # a study's c = 1 run beside its labels-shared points: "labels kept" holds c = 1 alone and sorts first
    pooled += [row("mnist", "off", 1.0), row("mnist", "on", 0.2), row("mnist", "on", 0.5)]
    for r in pooled[-3:]:  # each partition is scored by its own classifier
        r["features"] = "classifier (mnist)"
    federated = [row(p, "-", "-", "fedavg") for p in ("class", "iid")]
    shown = []
    monkeypatch.setattr(plt, "close", lambda fig: shown.append(fig))
    assert tradeoff_figure(pooled, str(tmp_path / "tradeoff.png"), federated)
    lines = {bars.get_label(): list(bars.lines[0].get_xdata()) for bars in shown[0].axes[0].containers}
    assert lines["collaborative (markov, iid, labels shared)"] == [0.2, 0.5] and len(lines) == 12
    stars = [line for line in shown[0].axes[3].lines if line.get_marker() == "*"]
    assert [star.get_label() for star in stars] == [
        "fedavg (class): membership AUC, global model", "fedavg (iid): membership AUC, global model"]  # fmt: skip
    # linkage chance, x_c and the client's training depend on the partition's images: one line
    # each per partition over every c it holds, named by it, in a colour no condition line has
    # (C3 clashed with the 4th condition; they were drawn for the first condition only)
    axes = shown[0].axes
    twin = [axis for axis in axes if axis not in axes[:4]][0]
    chance = {line.get_label(): list(line.get_xdata()) for line in twin.lines if "chance" in line.get_label()}
    assert chance == {f"linkage chance ({p})": [0.2, 0.5] for p in ("class", "iid")} | {
        "linkage chance (mnist)": [0.2, 0.5, 1.0]}  # fmt: skip
    sent = {bars.get_label(): list(bars.lines[0].get_xdata()) for bars in axes[1].containers}
    assert sent["x_c as sent (mnist)"] == [0.2, 0.5]
    training = [line for line in axes[2].lines if line.get_label().startswith("training")]
    assert sorted(line.get_label() for line in training) == sorted(
        f"{what} ({p})" for what in ("training FLOPs (exact)", "training time") for p in ("class", "iid", "mnist")
    )
    assert [list(line.get_xdata()) for line in axes[2].lines if "ideal" in line.get_label()] == [[0.2, 0.5, 1.0]]
    from matplotlib.colors import to_hex

    conditions = {to_hex(line.get_color()) for line in axes[2].lines if line.get_label().startswith("sampling FLOPs")}
    assert len(conditions) == 6
    assert not conditions & {to_hex(line.get_color()) for line in training}
    assert not conditions & {to_hex(star.get_color()) for star in stars}
    assert axes[0].get_ylabel() == "FD (each partition's own features: compare within a partition)"  # not the first's


def test_a_condition_has_one_colour_in_every_figure_and_none_is_the_neutral_grey(tmp_path, monkeypatch):
    """Eight conditions (two split modes, partitions and shares), one without class fidelity,
    and a FedAvg point: the trade-off and conditions figures give each condition the same
    colour (the conditions figure leaves that one out), eight colours and
    none of them matplotlib's grey C7, the colour of the partition lines (the 8th condition
    took it, and the two figures numbered conditions over differently filtered rows); the
    FedAvg star has a colour of its own; the ideal sampling share is one line per split mode."""
    pytest.importorskip("matplotlib")

    import matplotlib.pyplot as plt
    from matplotlib.colors import to_hex

    from collafuse_hpc.report.figures import conditions_figure, tradeoff_figure
    from collafuse_hpc.report.tables import COLUMNS

    def row(split: str, partition: str, share: str, c, who: str = "pooled", method: str = "split") -> dict:
        numbers = {key: 0.5 for key in COLUMNS if key not in ("method", "split", "partition", "share", "c", "who")}
        return {f"{key}_seed_std": math.nan for key in COLUMNS} | numbers | {
            "method": method, "split": split, "partition": partition, "share": share, "c": c, "who": who,
            "seeds": 1, "features": "classifier"}  # fmt: skip

    splits, partitions, shares = ("markov", "reference"), ("class", "iid"), ("off", "on")
    kinds = [(split, p, share) for split in splits for p in partitions for share in shares]
    table = [row(*kind, c, who) for kind in kinds for c in (0.2, 0.5) for who in ("pooled", "c0")]
    for r in table[:4]:  # a condition without class fidelity (older runs): left out of the conditions figure
        r["fidelity"] = math.nan
    pooled = [r for r in table if r["who"] == "pooled"]
    shown = []
    monkeypatch.setattr(plt, "close", lambda fig: shown.append(fig))
    assert tradeoff_figure(pooled, str(tmp_path / "tradeoff.png"), [row("-", "class", "-", "-", method="fedavg")])
    assert conditions_figure(table, str(tmp_path / "conditions.png"))
    tradeoff, conditions = shown
    in_tradeoff = {
        line.get_label().removeprefix("sampling FLOPs (").removesuffix(")"): to_hex(line.get_color())
        for line in tradeoff.axes[2].lines
        if line.get_label().startswith("sampling FLOPs")
    }
    in_conditions = {bars.get_label(): to_hex(bars.lines[0].get_color()) for bars in conditions.axes[0].containers}
    assert len(in_tradeoff) == 8 and len(in_conditions) == 7 and in_conditions.items() <= in_tradeoff.items()
    # every panel of personalization has its bars, is titled by what it shows, and names each point's c once
    assert [len(axis.containers) for axis in conditions.axes[2:]] == [7, 7]
    assert conditions.axes[3].get_title() == "personalization against client compute"
    assert sorted(t.get_text() for t in conditions.axes[3].texts) == ["c=0.2", "c=0.5"]  # 7 conditions, one place
    assert len(set(in_tradeoff.values())) == 8 and to_hex("C7") not in in_tradeoff.values()
    (star,) = [line for line in tradeoff.axes[3].lines if line.get_marker() == "*"]
    assert to_hex(star.get_color()) not in in_tradeoff.values()
    ideal = sorted(line.get_label() for line in tradeoff.axes[2].lines if "ideal" in line.get_label())
    assert ideal == ["sampling, ideal (markov)", "sampling, ideal (reference)"]


def test_centralized_training_is_one_method_in_the_methods_figure(tmp_path, monkeypatch):
    """aggregate() stands c = 0 beside each split mode; it is one run, drawn once."""
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from collafuse_hpc.report.figures import methods_figure

    def row(method: str, split: str, c) -> dict:
        return {"who": "pooled", "method": method, "c": c, "split": split, "partition": "class", "share": "off",
                "seeds": 1, "fidelity": 0.5, "class_distance": 0.2, "train_flops_run": 1e12,
                "sampling_flops_image": 1e9, "bytes_run": 1e8}  # fmt: skip

    table = [row("fedavg", "-", "-")] + [row("split", s, c) for s in ("markov", "reference") for c in (0, 0.5)]
    shown = []
    monkeypatch.setattr(plt, "close", lambda fig: shown.append(fig))
    assert methods_figure(table, str(tmp_path / "methods.png"))
    (legend,) = [axis.get_legend() for axis in shown[0].axes if axis.get_legend()]
    assert sorted(t.get_text() for t in legend.get_texts()) == [
        "centralized (c = 0)", "fedavg", "split c = 0.5 (markov)", "split c = 0.5 (reference)"]  # fmt: skip
    table.append(row("split", "markov", 0.2) | {"fidelity": math.nan, "class_distance": math.nan})
    assert methods_figure(table, str(tmp_path / "methods.png"))  # a run without a classifier among those with one
    assert shown[-1].axes[0].get_ylabel() == "class distance (lower is better)"  # as the conditions figure's
    for r in table:  # runs evaluated without eval.classifier: the figure was left out without a word
        r["fidelity"] = r["class_distance"] = math.nan
        r["fid_collaborative"], r["fid_collaborative_low"], r["fid_collaborative_high"] = 3.0, 2.0, 4.0
    assert methods_figure(table, str(tmp_path / "methods.png"))
    assert shown[-1].axes[0].get_ylabel() == "FD pooled (lower is better)"


def _waiting_reports(command: list[str], cwd: Path, n: int) -> tuple[list[subprocess.Popen], list[Path]]:
    """``n`` report processes started at once, returned when each has said it waits."""
    logs, reports = [cwd / f"report-{i}.log" for i in range(n)], []
    for log in logs:
        with open(log, "w") as f:
            reports.append(subprocess.Popen(command, cwd=cwd, stdout=f, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + 600
    while not all("waiting for another report" in log.read_text() for log in logs):
        assert time.monotonic() < deadline and all(r.poll() is None for r in reports), [x.read_text() for x in logs]
        time.sleep(0.2)
    return reports, logs


@pytest.mark.slow  # seven report processes: a minute on busy cores
def test_reports_into_one_folder_at_once_take_turns_and_leave_one_whole_report(evaluated, tmp_path):
    """Two study points finishing together each wrote the study's report: one removed the
    folder the other was renaming into place and died with a raw FileNotFoundError. They
    now take turns (the later one reads the runs after the earlier one is written), each
    says it waits, all exit 0, and one whole report is left with nothing aside, whether or
    not the folder above --out existed; SIGTERM (scancel) while waiting changes nothing."""
    command = [sys.executable, "-m", "collafuse_hpc", "report", str(evaluated / "results.h5"), "--out", "report"]
    held = os.open(tmp_path / ".report.lock", os.O_RDWR | os.O_CREAT)
    fcntl.lockf(held, fcntl.LOCK_EX)  # as a report still being written there would
    try:
        reports, logs = _waiting_reports(command, tmp_path, 4)
        reports[0].send_signal(signal.SIGTERM)
        assert reports[0].wait(timeout=60) == 130 and "report: interrupted; report is as it was" in logs[0].read_text()
        assert not (tmp_path / "report").exists()
    finally:
        os.close(held)
    said = [(r.wait(timeout=600), log.read_text()) for r, log in zip(reports[1:], logs[1:], strict=True)]
    assert all(code == 0 and "Traceback" not in text for code, text in said), said
    assert {"table.csv", "table.md", "report.html"} <= set(os.listdir(tmp_path / "report"))
    assert sorted(os.listdir(tmp_path)) == ["report", *(log.name for log in logs)]  # no lock file, nothing aside
    # the folder above --out made by whichever comes first: the others wait on its lock all the same
    command[-1] = "new/study/report"
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    reports = [subprocess.Popen(command, cwd=tmp_path, **pipes) for _ in range(3)]
    said = []
    for r in reports:
        out, err = r.communicate(timeout=600)
        said.append((r.returncode, out, err))
    assert all(code == 0 and "Traceback" not in err for code, _, err in said), said
    assert sum("waiting for another report" in out for _, out, _ in said) >= 1, said
    assert os.listdir(tmp_path / "new/study") == ["report"]


@pytest.mark.slow  # its run is trained and evaluated (conftest.evaluated_run)
def test_a_report_not_written_or_interrupted_leaves_the_earlier_one(evaluated, tmp_path, capsys, monkeypatch):
    """A full disk or Ctrl-C while the report is written is one clear line and the earlier
    report as it was, nothing left aside; once the new report is in place, an interrupt
    says so; a refused report into new folders makes none; a file system without locks
    (ENOLCK, or Lustre's ENOSYS without -o flock) says so and writes the report."""
    out = tmp_path / "report"
    assert _report(capsys, evaluated / "results.h5", out=out).returncode == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def fail(error: BaseException):
        def write(*args, **kwargs):
            raise error

        return write

    for error, code, said in (
        (OSError(errno.ENOSPC, "No space left on device", "/x/.report-1/a.png"), 1, ": No space left on device; "),
        (KeyboardInterrupt(), 130, "interrupted"),
    ):
        with monkeypatch.context() as m:
            m.setattr("collafuse_hpc.report.make.write_report", fail(error))
            done = _report(capsys, evaluated / "results.h5", out=out)
        assert done.returncode == code and said in done.stderr and "is as it was" in done.stderr, done
        assert ".report-" not in done.stderr, done  # the staging folder the user never named
        assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
        assert os.listdir(tmp_path) == ["report"]
    (tmp_path / "broken.h5").write_bytes(b"not an HDF5 file")
    assert _report(capsys, tmp_path / "broken.h5", out=tmp_path / "new/deeper/report").returncode == 2
    assert sorted(os.listdir(tmp_path)) == ["broken.h5", "report"]
    for error in (errno.ENOLCK, errno.ENOSYS):
        with monkeypatch.context() as m:
            m.setattr("collafuse_hpc.report.make.fcntl.lockf", fail(OSError(error, os.strerror(error))))
            done = _report(capsys, evaluated / "results.h5", out=out)
        assert done.returncode == 0 and f"no file locks in {tmp_path} ({os.strerror(error)})" in done.stdout, done
        assert sorted(os.listdir(tmp_path)) == ["broken.h5", "report"] and (out / "report.html").exists()
    (out / "earlier.txt").write_text("of the report before")  # Ctrl-C while the earlier report is removed
    remove = shutil.rmtree
    with monkeypatch.context() as m:
        m.setattr(
            "collafuse_hpc.report.make.shutil.rmtree",
            lambda path, **kw: fail(KeyboardInterrupt())() if str(path).endswith(".old") else remove(path, **kw),
        )
        done = _report(capsys, evaluated / "results.h5", out=out)
    left = [name for name in os.listdir(tmp_path) if name.endswith(".old")]
    assert done.returncode == 130 and f"interrupted after {out} was written; what is left" in done.stderr, done
    assert len(left) == 1 and left[0] in done.stderr and not (out / "earlier.txt").exists()
