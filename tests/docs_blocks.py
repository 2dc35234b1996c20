"""The code blocks of the README and of the documentation pages (``docs/``), as the tests that run
them read them: a page, a section of it under a heading, its fenced blocks, their commands."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEADING = re.compile(r"(#{1,6}) ")
FENCE = "```"


def read(page: str) -> str:
    """The text of ``page``, a path relative to the repository root (``README.md``,
    ``docs/guides/slurm.md``)."""
    path = ROOT / page
    assert path.is_file(), f"{page} does not exist"
    return path.read_text()


def section(page: str, heading: str) -> str:
    """The text of ``page`` under the line ``heading`` (exactly, e.g. ``"## Quick start"``), up to
    the next heading of its level or above; a page's ``# Title`` gives the whole page. A ``#``
    line inside a fenced block (a shell comment) is not a heading."""
    text = read(page)
    level = len(heading) - len(heading.lstrip("#"))
    start, offset, fenced = None, 0, False
    for line in text.splitlines(keepends=True):
        if line.startswith(FENCE):
            fenced = not fenced
        elif not fenced and (match := HEADING.match(line)):
            if start is None and line.rstrip("\n") == heading:
                start = offset + len(line)
            elif start is not None and len(match.group(1)) <= level:
                return text[start:offset]
        offset += len(line)
    assert start is not None, f"{page} has no heading '{heading}'"
    return text[start:]


def blocks(text: str, language: str = "bash") -> list[str]:
    """The contents of the fenced blocks of ``language`` in ``text``, in order."""
    return re.findall(rf"^{FENCE}{language}\n(.*?)^{FENCE}", text, re.S | re.M)


def commands(block: str, prefix: str = "") -> list[str]:
    """The commands of a shell block that start with ``prefix``: continuation lines joined, comment
    lines and trailing ``  # comments`` dropped, runs of spaces made one."""
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        if line.lstrip().startswith("#"):
            continue
        line = " ".join(line.split("  #")[0].split())
        if line and line.startswith(prefix):
            commands.append(line)
    return commands


def pages() -> list[str]:
    """The README and every documentation page, as paths relative to the repository root."""
    return ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").rglob("*.md"))]
