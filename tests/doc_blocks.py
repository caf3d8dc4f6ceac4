"""The shell blocks of README.md and docs/: what the docs tell a user to type."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]


def shell_lines(path: Path) -> list[str]:
    """The commands of ``path``'s bash blocks: comments dropped, continued lines joined."""
    lines, block, pending = [], False, ""
    for raw in path.read_text().splitlines():
        if raw.startswith("```"):
            block = raw.strip() == "```bash"
            continue
        if not block:
            continue
        text = pending + raw.split(" #")[0].strip()
        if text.startswith("#") or not text:
            continue
        if text.endswith("\\"):
            pending = text[:-1] + " "
            continue
        lines.append(text)
        pending = ""
    return lines


def code_spans(path: Path) -> list[str]:
    """The `code` spans of ``path``'s text (not its code blocks), each on one line as a log prints it."""
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return re.findall(r"`([^`]+)`", " ".join(text.split()))
