"""The docs cannot drift: the configuration reference is the generated one, and every
command of the README's and docs/' shell blocks names subcommands, options, files and
configs that exist. (The launch lines themselves run in tests/test_launch_lines.py.)"""

from __future__ import annotations

import functools
import glob
import re
import shlex
import subprocess
import sys

import pytest
from doc_blocks import ROOT, code_spans, doc_files, shell_lines

from collafuse_hpc.cli import _parser
from collafuse_hpc.config import load
from collafuse_hpc.config_reference import reference

REPO_DIRS = ("jobs/", "configs/", "tools/", "tests/", "collafuse_hpc/", "docs/")
PLACEHOLDERS = ("runs/", "...", "report/", "grids/", "/data/", "/project/", "/tmp/")


def test_the_configuration_page_is_the_generated_reference():
    page = (ROOT / "docs/configuration.md").read_text()
    regenerate = "collafuse-hpc config --reference > docs/configuration.md"
    assert page == reference(), f"docs/configuration.md is stale: {regenerate}"


def test_the_reference_documents_every_key_with_a_meaning():
    rows = [line for line in reference().splitlines() if line.startswith("| `")]
    assert len(rows) > 60
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split(" | ")]
        assert cells[-1], f"a key without a comment in config.py: {cells[0]}"
    assert "| `run.timeout_s` | number | `300.0` | s | > 0 | may change |" in reference()
    assert "| `clients.*.cut_ratio` | number or null | null |  | in [0, 1] | refused |" in reference()


def _commands(line: str) -> list[list[str]]:
    """The simple commands of a shell line: split at && ; |, leading VAR=value dropped,
    ``[--opt]`` (optional in the docs' notation) read as ``--opt``."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    out, words = [], []
    for token in [*lexer, ";"]:
        if token in ("&&", ";", "|", "||"):
            while words and re.fullmatch(r"[A-Z_]+=.*", words[0]):
                words = words[1:]
            out += [words] if words else []
            words = []
        else:
            words.append(token.strip("[]"))
    return out


def _cli_words(words: list[str]) -> list[str] | None:
    """The collafuse-hpc arguments of a command that runs the CLI, however it is launched."""
    for i, w in enumerate(words):
        if w == "collafuse-hpc" or w.endswith("/collafuse-hpc"):
            return words[i + 1 :]
        if w == "-m" and i + 1 < len(words) and words[i + 1] == "collafuse_hpc":
            return words[i + 2 :]
    if words[0] == "jobs/local.sh":
        return words[2:]
    return None


@functools.cache
def _tool_help(tool: str) -> str:
    done = subprocess.run([sys.executable, tool, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{tool} --help: {done.stderr[-500:]}"
    return done.stdout


def _all_commands() -> list[tuple[str, list[str]]]:
    return [(f"{p.name}: {line}", words) for p in doc_files() for line in shell_lines(p) for words in _commands(line)]


def test_the_docs_have_commands_to_check():
    commands = _all_commands()
    assert sum(_cli_words(w) is not None for _, w in commands) >= 20
    assert any(w[:2] == ["collafuse-hpc", "report"] for _, w in commands)


@pytest.mark.parametrize("where,words", _all_commands(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_documented_command_names_what_exists(where, words):
    cli = _cli_words(words)
    if cli is not None:  # argparse knows the subcommand and every option
        try:
            _parser().parse_args(cli)
        except SystemExit as e:
            pytest.fail(f"{where}: collafuse-hpc {' '.join(cli)} is refused by its parser (exit {e.code})")
    if words[0] == "python" and words[1].startswith("tools/"):
        if "argparse" in (ROOT / words[1]).read_text():
            helptext = _tool_help(words[1])
            for option in (w.split("=")[0] for w in words[2:] if w.startswith("--")):
                assert option in helptext, f"{where}: {words[1]} has no option {option}"
    for w in words:
        path = w.split("=", 1)[-1]
        if path.startswith(REPO_DIRS) and not any(p in path for p in PLACEHOLDERS):
            assert glob.glob(str(ROOT / path)), f"{where}: {path} does not exist"
        if path.startswith("configs/") and path.endswith(".yaml"):
            load(str(ROOT / path), check_files=False)


def test_the_world_size_is_servers_plus_client_ranks_wherever_the_docs_give_it():
    """A rank hosts run.clients_per_rank clients: 'the number of clients' is wrong beyond 1."""
    said = [
        (path.name, words)
        for path in doc_files()
        for words in re.findall(
            r"world size (?:is|must equal) `server\.count` \+ the number of ([\w ]+)",
            " ".join(path.read_text().split()),
        )
    ]
    assert said and all(words == "client ranks" for _, words in said), said


def test_results_format_names_the_attributes_of_the_samples_group_where_they_are(tmp_path, shards):
    import h5py
    from conftest import tiny_config

    from collafuse_hpc.config import from_dict
    from collafuse_hpc.runtime.run import run_in_process

    page = (ROOT / "docs/results-format.md").read_text()
    named = re.search(r"its group `records/<n>/samples` has the attributes\s+([^)]*)\)", page)
    assert named, "docs/results-format.md does not say which attributes the samples group has"
    run_in_process(from_dict(tiny_config(shards, tmp_path / "out", [0.25, 0.5], rounds=1)), resume=False)
    with h5py.File(tmp_path / "out/parts/client_c0.h5") as f:
        assert set(re.findall(r"`(\w+)`", named.group(1))) == set(f["records/0/samples"].attrs)


def test_the_evaluation_page_quotes_the_plan_the_quickstart_logs(caplog):
    """docs/evaluation.md quoted a plan of 255 model evaluations per image; the quickstart
    logs 880. The page quotes the line planned_images logs for configs/quickstart.yaml."""
    from collafuse_hpc.diffusion.split import Cut
    from collafuse_hpc.evaluation.sets import planned_images

    caplog.set_level("INFO", logger="collafuse_hpc")
    cfg = load(str(ROOT / "configs/quickstart.yaml"), check_files=False)
    planned_images(cfg, [Cut.for_client(cfg, i) for i in range(len(cfg.clients))])
    plan = caplog.records[0].getMessage()
    quoted = [q for q in code_spans(ROOT / "docs/evaluation.md") if "model evaluations per image" in q]
    assert quoted == [plan], (quoted, plan)


def test_the_quickstart_shows_what_the_package_is_for_and_the_readme_says_what_its_grids_show():
    """The quickstart trained c = 0.2 without labels, the setting docs/study.md finds to lose
    (c0, holding 0-4, drew 5-9): its clients now share their labels, where collaboration
    wins, and the README says what each grid shows."""
    from collafuse_hpc.config import load

    cfg = load(str(ROOT / "configs/quickstart.yaml"), check_files=False)
    assert all(c.share_labels and c.cut_ratio == 0.2 for c in cfg.clients)
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert "each grid shows its own client's digits: c0's 0-4, c1's 5-9" in readme
    assert "Class partition, c = 0.2, labels shared: collaboration wins" in (ROOT / "docs/study.md").read_text()
