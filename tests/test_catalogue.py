"""The metric catalogue (numerics/catalogue.py) is the one list of metrics.

1. Keys: ``catalogue.key`` builds and ``catalogue.parse_key`` parses every key the tasks write.
2. Every divergence of the catalogue has its kernel, and ``all_divergences`` computes exactly those.
3. No other module lists metric names (the package's source read as text, parsed with ast).
4. A new divergence is one catalogue entry plus its kernel: a toy divergence (twice symKL, from the
   same distributions), added in a fresh process before anything is imported, reaches a real
   misalignment task of the embedded SmolLM2 (``last`` and ``dense``), its results table and
   higher_is_better, ``report``, ``compare --metric toy``, the sweep's values.csv and a titled plot.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from offline import offline_env

from lm_eval_longshort.numerics import catalogue, divergences

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lm_eval_longshort"
# Modules allowed to list metric names besides the catalogue, with the reason (none today; the test
# fails if an exempt module no longer needs its exemption).
EXEMPT: dict[str, str] = {}


@pytest.mark.parametrize(
    ("parts", "text"),
    [
        (("symkl", 4096, False), "symkl@4096"),
        (("ppl", 4096, True), "ppl@4096_stderr"),
        (("keyppl", None, False), "keyppl"),
        (("keyppl", None, True), "keyppl_stderr"),
        (("ppl@max", None, False), "ppl@max"),
        (("key_frac", None, True), "key_frac_stderr"),
    ],
)
def test_key_and_parse_key_round_trip(parts, text):
    name, length, stderr = parts
    assert catalogue.key(name, length, stderr=stderr) == text
    assert catalogue.parse_key(text) == parts


def test_registering_a_bad_or_taken_name_fails():
    with pytest.raises(ValueError, match="already in the catalogue"):
        catalogue.register(catalogue.CATALOGUE["ppl"])
    with pytest.raises(ValueError, match="delimit keys"):
        catalogue.register(catalogue.Metric("a@b", "misalign", True, "t", "l", "lower"))
    with pytest.raises(ValueError, match="transform"):
        catalogue.register(catalogue.Metric("cube", "ppl", True, "t", "l", "lower", transform="cube"))


def test_every_divergence_has_its_kernel():
    names = catalogue.divergences()
    assert names == divergences.METRIC_NAMES
    assert set(names) <= set(divergences.METRICS)
    logp = torch.log_softmax(torch.randn(3, 50, generator=torch.Generator().manual_seed(0)), -1)
    assert tuple(divergences.all_divergences(logp, logp.flip(0))) == names


def _metric_names_listed(node: ast.AST, names: set[str]) -> list[str]:
    """Metric names among a literal's elements (or its elements' first items: ``(("ppl", x), ...)``)."""
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        elements = node.elts
    elif isinstance(node, ast.Dict):
        elements = [k for k in node.keys if k is not None]
    else:
        return []
    heads = [e.elts[0] if isinstance(e, (ast.Tuple, ast.List)) and e.elts else e for e in elements]
    return [h.value for h in heads if isinstance(h, ast.Constant) and h.value in names]


def test_no_other_module_lists_metric_names():
    """Tuples, lists, sets and dict keys holding two or more metric names live only in the catalogue."""
    names = set(catalogue.CATALOGUE)
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        if relative == "numerics/catalogue.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            listed = _metric_names_listed(node, names)
            if len(listed) >= 2:
                found.setdefault(relative, []).append(f"line {node.lineno}: {listed}")
    offenders = {k: v for k, v in found.items() if k not in EXEMPT}
    assert not offenders, f"metric names listed outside numerics/catalogue.py: {offenders}"
    stale = sorted(p for p in EXEMPT if (PACKAGE / p).exists() and p not in found)
    assert not stale, f"these modules no longer list metric names: drop their exemption {stale}"


# The whole path of a new divergence, in a fresh interpreter: the catalogue entry and the kernel
# are added before any backend, task or report module is imported (as a contributor's edit of
# catalogue.py and divergences.py would be there from the start).
TOY_SCRIPT = r"""
import json, shutil, sys
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

from lm_eval_longshort.numerics import catalogue
catalogue.register(catalogue.Metric(
    "toy", "misalign", True, "Toy divergence (twice symKL)", "toy (nats / token)", "lower", table=True, plot=True))
from lm_eval_longshort.numerics import divergences
divergences.METRICS["toy"] = lambda logp, logq: 2 * divergences.symkl(logp, logq)

import torch
from harness_run import evaluate_tasks
from lm_eval.models.huggingface import HFLM
from test_small_fixes import save_like_lm_eval
from transformers import AutoModelForCausalLM, AutoTokenizer

from lm_eval_longshort import cli, reporting
from lm_eval_longshort.assets import prepare
from lm_eval_longshort.sweep import report

out_dir = Path(sys.argv[1])
assets = prepare(progress=False)
model = AutoModelForCausalLM.from_pretrained(assets.model_dir, dtype=torch.float32).eval()
lm = HFLM(pretrained=model, tokenizer=AutoTokenizer.from_pretrained(assets.model_dir), max_length=256, batch_size=1)
MIS = "longshort_misalign_shakespeare"
facts = {}
for mode in ("last", "dense"):
    out = evaluate_tasks(lm, [MIS], {"lengths": [16, 32], "pairs": 1, "mode": mode}, limit=2, bootstrap_iters=100)
    results = out["results"][MIS]
    facts[mode] = {
        "toy": [results[f"toy@{n},none"] for n in (16, 32)],
        "symkl": [results[f"symkl@{n},none"] for n in (16, 32)],
        "stderr": [results[f"toy@{n}_stderr,none"] for n in (16, 32)],
        "higher_is_better": out["higher_is_better"][MIS]["toy@16"],
    }
    save_like_lm_eval(out, out_dir / mode)
shutil.copytree(out_dir / "last", out_dir / "last_again")


def run_cli(*argv):
    buffer = StringIO()
    with redirect_stdout(buffer):
        code = cli.main([str(a) for a in argv])
    return code, buffer.getvalue()


facts["report"] = run_cli("report", out_dir / "last")
facts["compare"] = run_cli(
    "compare", out_dir / "last", out_dir / "last_again", "--label", "a", "b", "--metric", "toy",
    "--csv", out_dir / "cmp.csv")
facts["compare_csv"] = (out_dir / "cmp.csv").read_text()
facts["compare_differences"] = (out_dir / "cmp_differences.csv").read_text()
runs = reporting.load_runs([out_dir / "last"], labels=["a"])
facts["values_csv"] = report.values_csv(runs)
figure = reporting.draw_runs(runs)
facts["titles"] = [ax.get_title() for ax in figure.axes]
facts["ylabels"] = [ax.get_ylabel() for ax in figure.axes]
print("FACTS " + json.dumps(facts))
"""


@pytest.mark.slow
def test_a_new_divergence_reaches_every_output(tmp_path, assets):
    script = tmp_path / "toy.py"
    script.write_text(TOY_SCRIPT, encoding="utf-8")
    env = offline_env(PYTHONPATH=str(ROOT / "tests"))
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "out")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("FACTS ")]
    facts = json.loads(line.removeprefix("FACTS "))
    for mode in ("last", "dense"):
        got = facts[mode]
        # the task pooled the toy kernel's values: twice symKL (its own kernel, not the fused pass)
        assert got["toy"] == pytest.approx([2 * v for v in got["symkl"]], rel=1e-4)
        assert all(se > 0 for se in got["stderr"]) and got["higher_is_better"] is False
    code, text = facts["report"]
    assert code == 0
    header = next(line for line in text.splitlines() if line.split()[:1] == ["L"])
    assert header.split()[-1] == "toy"  # its column, after the built-in divergences
    code, text = facts["compare"]
    assert code == 0 and "toy" in text.split("Values")[1].splitlines()[1]
    assert (
        facts["compare_csv"]
        .splitlines()[0]
        .endswith(",toy,symkl_stderr,sce_stderr,js_stderr,top1_stderr,tv_stderr,toy_stderr")
    )
    assert {line.split(",")[2] for line in facts["compare_differences"].splitlines()[1:]} == {"toy"}
    toy_rows = [line.split(",") for line in facts["values_csv"].splitlines() if ",toy," in line]
    assert [row[3] for row in toy_rows] == ["16", "32"]
    assert [float(row[4]) for row in toy_rows] == facts["last"]["toy"]
    assert any(title.startswith("Toy divergence (twice symKL)\n") for title in facts["titles"])
    assert "toy (nats / token)" in facts["ylabels"]
