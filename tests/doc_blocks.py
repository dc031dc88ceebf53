"""Command blocks of README.md and docs/*.md, for the tests that run them as written."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def fenced_blocks(page: Path, lang: str) -> list[str]:
    text = page.read_text(encoding="utf-8")
    return re.findall(rf"^```{lang}\n(.*?)^```", text, flags=re.S | re.M)


def commands(block: str) -> list[str]:
    """The block's commands: continuation lines joined (also lines inside an open quote), comments dropped."""
    out, pending = [], ""
    for line in block.replace("\\\n", " ").splitlines():
        pending = f"{pending}\n{line}" if pending else line
        try:
            shlex.split(pending, comments=True)
        except ValueError:  # a quote is still open: the command goes on
            continue
        command = pending.strip()
        pending = ""
        if command and not command.startswith("#"):
            out.append(command)
    assert not pending, f"unclosed quote in block: {pending!r}"
    return out


def scaling_recipe(heading: str) -> str:
    """The ```sh block under ``heading`` in docs/scaling.md (the recipes the tests run)."""
    text = (ROOT / "docs" / "scaling.md").read_text(encoding="utf-8")
    section = text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"^```sh\n(.*?)^```", section, flags=re.S | re.M).group(1)
