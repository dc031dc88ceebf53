"""The package's docstring examples (``>>>``) run as tests: an example that no longer holds fails here.

The modules are found by scanning the imported package's source files for ``>>>`` lines, so a new
or moved example is picked up without a list to keep. Each module's examples must all run: doctest's
``attempted`` count must equal the number of ``>>>`` lines in the file, so an example doctest does
not collect (in a comment, a nested function, a skipped block) fails instead of passing unseen.
"""

from __future__ import annotations

import doctest
import importlib
from pathlib import Path

import pytest

import lm_eval_longshort

PACKAGE = Path(lm_eval_longshort.__file__).resolve().parent


def example_lines(path: Path) -> int:
    """How many lines of a source file start an example (``>>>``, after indentation)."""
    return sum(line.lstrip().startswith(">>>") for line in path.read_text(encoding="utf-8").splitlines())


def modules_with_examples() -> list[str]:
    """Dotted names of the package modules whose source holds a ``>>>`` line."""
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if example_lines(path):
            parts = (PACKAGE.name, *path.relative_to(PACKAGE).with_suffix("").parts)
            names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


MODULES = modules_with_examples()


def test_examples_are_found():
    """The scan cannot silently find nothing: aggregate.py's examples are known to exist."""
    assert "lm_eval_longshort.numerics.aggregate" in MODULES


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, verbose=False, report=True)
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} examples failed (see the output above)"
    assert result.attempted == example_lines(Path(module.__file__)), f"{name}: not every >>> example ran"
