"""`lm-eval-longshort finetune` checks every option, the training windows and the held-out plays
before any model loads: each problem is one line, `lm-eval-longshort finetune: error: ...`,
exit 2, nothing written, no training step.

Through the installed console script (a subprocess, offline) for the cases of issue 15, and
through ``cli.main`` in this process for the rest (the same entry point, faster). Held-out play
lengths are checked against an independent rule: the ladder needs L + W tokens, dense L + e with
e = default_rng([seed, doc, L]).integers(1, min(L // 2, L - ceil(min_ratio·L)) + 1)
(docs/metrics.md).
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from offline import offline_env

from lm_eval_longshort import cli

CONSOLE = Path(sys.executable).parent / "lm-eval-longshort"
PREFIX = "lm-eval-longshort finetune: error: "
# Printed once training starts (ours, then the Trainer's per-step logs).
TRAINING_MARKS = ("[finetune] training", "'loss':", "lm_loss")
# More windows than the corpus holds: a run whose other inputs pass stops at the windows check,
# so an accepted value is seen without training anything.
TOO_MANY_STEPS = "100000000"


def _console(out: Path, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(CONSOLE), "finetune", "--output-dir", str(out), *argv],
        capture_output=True,
        text=True,
        env=offline_env(),
        timeout=240,
    )


def _error_line(stderr: str) -> str:
    """The single error line of a refusal (anything else on stderr fails the test)."""
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(PREFIX), stderr
    return lines[0]


def _no_outputs(out: Path) -> None:
    """No checkpoint folder and no weight file anywhere under ``out``."""
    if out.exists():
        found = [p for p in out.rglob("*") if p.name.startswith("alpha_") or p.suffix in (".safetensors", ".bin")]
        assert not found, found


def _main(capsys, tmp_path: Path, *argv: str) -> str:
    """Run `finetune` through cli.main; return the error line of the expected refusal."""
    out = tmp_path / "out"
    code = cli.main(["finetune", "--output-dir", str(out), *argv])
    captured = capsys.readouterr()
    assert code == 2, captured
    assert not any(mark in captured.out for mark in TRAINING_MARKS), captured.out
    _no_outputs(out)
    return _error_line(captured.err)


# --------------------------------------------------------------------------- the console script


def test_eval_length_longer_than_held_out_plays_is_refused_before_training(assets, tmp_path):
    out = tmp_path / "out"
    done = _console(out, "--eval-lengths", "64", "100000")
    assert done.returncode == 2, done.stderr
    line = _error_line(done.stderr)
    assert "--eval-lengths 100000:" in line and "use lengths up to" in line
    assert not any(mark in done.stdout for mark in TRAINING_MARKS), done.stdout
    assert "tokenizing" not in done.stdout  # refused before the training plays are even tokenized
    _no_outputs(out)


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (("--lr", "-1"), "--lr -1:"),
        (("--steps", "0"), "--steps 0:"),
        (("--alphas", "0", "-0.5"), "alpha=-0.5 must be a finite number >= 0"),
    ],
)
def test_console_refuses_bad_options_in_one_line(assets, tmp_path, argv, named):
    out = tmp_path / "out"
    done = _console(out, *argv)
    assert done.returncode == 2, done.stderr
    assert named in _error_line(done.stderr)
    assert not any(mark in done.stdout for mark in TRAINING_MARKS), done.stdout
    _no_outputs(out)


# --------------------------------------------------------------------------- every option


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (("--lr", "0"), "--lr 0:"),
        (("--lr", "nan"), "--lr nan:"),
        (("--length", "1"), "--length 1:"),
        (("--alphas", "inf"), "--alphas inf:"),
        (("--alphas", "0.1", "0", "0.1"), "alpha 0.1 is given twice"),
        (("--batch-size", "0"), "--batch-size 0:"),
        (("--target-tokens", "0"), "--target-tokens 0:"),
        (("--min-ratio", "1"), "--min-ratio 1:"),
        (("--min-ratio", "0"), "--min-ratio 0:"),
        (("--min-ratio", "0.9", "--length", "5"), "--length 5 with --min-ratio 0.9:"),
        (("--min-ratio", "0.9", "--eval-lengths", "64", "6"), "--eval-lengths 6 with --min-ratio 0.9:"),
        (("--seed", "-1"), "--seed -1:"),
        (("--seed", str(2**32)), f"--seed {2**32}:"),
        (("--eval-docs", "1"), "--eval-docs 1:"),
        (("--eval-docs", "38"), "--eval-docs 38:"),  # the corpus has 38 plays
        (("--eval-lengths", "64", "1"), "--eval-lengths 1:"),
        (("--target-tokens", "100000"), "--eval-lengths 64 256: too long"),
    ],
)
def test_bad_option_is_one_line_naming_it(assets, capsys, tmp_path, argv, named):
    assert named in _main(capsys, tmp_path, *argv)


def test_unwritable_outputs_are_refused_before_training(assets, capsys, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    line = _main(capsys, tmp_path, "--report", str(tmp_path))
    assert f"--report {tmp_path}: is a folder" in line
    line = _main(capsys, tmp_path, "--report", str(a_file / "r.md"))
    assert f"{a_file} is a file" in line
    code = cli.main(["finetune", "--output-dir", str(a_file)])
    assert code == 2 and f"--output-dir {a_file}: is a file" in _error_line(capsys.readouterr().err)
    assert a_file.read_text() == "x"


# --------------------------------------------------------------------------- the length rules


@pytest.fixture(scope="module")
def play_sizes(assets) -> list[tuple[int, int]]:
    """(corpus index, plain token count) of every play; the last 3 are the default held-out ones."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(assets.model_dir)
    with open(assets.corpus_file, encoding="utf-8") as fh:
        texts = [json.loads(line)["text"] for line in fh]
    return [(i, len(tokenizer(text, add_special_tokens=False)["input_ids"])) for i, text in enumerate(texts)]


def _dense_gap(seed: int, doc: int, length: int, min_ratio: float = 0.5) -> int:
    high = min(length // 2, length - math.ceil(min_ratio * length))
    return int(np.random.default_rng([seed, doc, length]).integers(1, high + 1))


def test_ladder_needs_length_plus_target_tokens(play_sizes, capsys, tmp_path):
    # W = n // 2 makes the ladder's need the binding one (every dense gap is <= L // 2 < W).
    n = min(size for _, size in play_sizes[-3:])
    w = n // 2
    fits = n - w
    line = _main(capsys, tmp_path, "--target-tokens", str(w), "--eval-lengths", str(fits), "--steps", TOO_MANY_STEPS)
    assert line.startswith(PREFIX + f"--steps {TOO_MANY_STEPS}")  # the eval lengths passed
    line = _main(capsys, tmp_path, "--target-tokens", str(w), "--eval-lengths", str(fits + 1))
    assert f"--eval-lengths {fits + 1}: too long" in line and f"needs {n + 1}" in line


def test_dense_needs_length_plus_its_drawn_gap(play_sizes, capsys, tmp_path):
    plays, seed = play_sizes[-3:], 1234
    n = min(size for _, size in plays)

    def dense_ok(length: int) -> bool:
        return all(length + _dense_gap(seed, doc, length) <= size for doc, size in plays)

    # With W = 1 the ladder takes any L < n: lengths near n are refused only by their gap.
    refused = next(length for length in range(n - 1, 1, -1) if not dense_ok(length))
    accepted = next(length for length in range(n - 1, 1, -1) if dense_ok(length))
    line = _main(capsys, tmp_path, "--target-tokens", "1", "--eval-lengths", str(refused))
    assert f"--eval-lengths {refused}: too long" in line
    line = _main(capsys, tmp_path, "--target-tokens", "1", "--eval-lengths", str(accepted), "--steps", TOO_MANY_STEPS)
    assert line.startswith(PREFIX + f"--steps {TOO_MANY_STEPS}")


def test_suggested_eval_length_fits(play_sizes, capsys, tmp_path):
    line = _main(capsys, tmp_path, "--eval-lengths", "64", "100000")
    assert "--eval-lengths 100000: too long" in line
    fit = int(re.search(r"use lengths up to (\d+)", line).group(1))
    assert fit > 256
    # Whatever gap is drawn (at most L // 2), both tasks can measure L = fit on every held-out play.
    assert all(fit + max(32, fit // 2) <= size for _, size in play_sizes[-3:])
    assert fit + 1 + max(32, (fit + 1) // 2) > min(size for _, size in play_sizes[-3:])  # and no more


def test_too_long_training_length_is_refused_with_one_that_fits(play_sizes, tmp_path):
    out = tmp_path / "out"
    done = _console(out, "--length", "100000")
    assert done.returncode == 2, done.stderr
    line = _error_line(done.stderr)
    assert "--length 100000 + the largest gap 50000 = 150000 tokens" in line
    assert "the 35 training plays give 0" in line
    assert not any(mark in done.stdout for mark in TRAINING_MARKS), done.stdout
    _no_outputs(out)
    # The suggestion is the longest L whose windows of L + L // 2 tokens (min_ratio 0.5: the
    # largest gap is L // 2), whole ones per play, number 8 (8 steps x 1 window).
    fit = int(re.search(r"use --length (\d+) or less", line).group(1))
    plays = play_sizes[:-3]  # the training plays of the default --eval-docs 3

    def windows(length: int) -> int:
        return sum(size // (length + length // 2) for _, size in plays)

    assert windows(fit) >= 8 > windows(fit + 1)
