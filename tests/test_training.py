"""The training regularizer (lm_eval_longshort.training) and the `finetune` command.

* the term equals the `dense` task's logged SCE / symKL sums on the same document and gap
  (the real task through lm_eval.simple_evaluate, the embedded SmolLM2);
* on a tiny random Llama: the term against numpy formulas over plain forwards, alpha = 0 is
  exactly the model's own LM loss, the gradient reaches the parameters through each input
  and splits into the two paths, a few steps lower the term, the Trainer logs both terms;
* every bad input fails before any step runs;
* `finetune` end to end at the smallest size: its checkpoints are measured as the runs of one sweep
  on the held-out plays, and its report's numbers are that sweep's values and, for the paired
  differences, numerics.aggregate on the per-document sums in the sweep's results.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from harness_run import evaluate, response
from offline import offline_env
from reference import dense_positions, numpy_divergences
from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel, TrainingArguments

from lm_eval_longshort.numerics import aggregate
from lm_eval_longshort.training import (
    MisalignmentTrainer,
    RegularizerConfig,
    check_model,
    regularized_loss,
)
from lm_eval_longshort.training.evaluation import pairs_to_compare

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 61


def tiny_config() -> LlamaConfig:
    """A 2-layer Llama over VOCAB token ids."""
    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )


@pytest.fixture(scope="module")
def tiny():
    """The tiny_config Llama with random weights (seeded), float32."""
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_config()).eval()


def windows(n: int, tokens: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, tokens), generator=torch.Generator().manual_seed(seed))


def numpy_logsoftmax(logits: torch.Tensor) -> np.ndarray:
    x = logits.detach().double().numpy()
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def numpy_term(model, rows: torch.Tensor, length: int, gap: int, ratio: float, bos: int | None = None):
    """(mean sce, mean symkl) over windows and compared positions, from plain forwards + numpy
    (docs/metrics.md, dense)."""
    sce, symkl = [], []
    pre = [] if bos is None else [bos]
    for row in rows.tolist():
        a = numpy_logsoftmax(model(input_ids=torch.tensor([pre + row[:length]])).logits[0])
        b = numpy_logsoftmax(model(input_ids=torch.tensor([pre + row[gap : gap + length]])).logits[0])
        shift = len(pre)
        for t in dense_positions(length, gap, ratio):
            want = numpy_divergences(a[t + shift], b[t - gap + shift])
            sce.append(want["sce"])
            symkl.append(want["symkl"])
    return float(np.mean(sce)), float(np.mean(symkl))


# --------------------------------------------------------------------------- one definition


def test_term_equals_dense_task_on_same_document_and_gap(hflm, smol, plays, tmp_path):
    """One definition: the term times its positions equals the task's logged sce_sum / symkl_sum."""
    model, tok = smol
    texts = [plays[i]["text"][:3000] for i in range(2)]
    for i, text in enumerate(texts):
        (tmp_path / f"doc{i}.txt").write_text(text, encoding="utf-8")
    lengths, ratio = [48, 80], 0.5
    _, samples = evaluate(
        hflm,
        "longshort_misalign_local",
        {"files": str(tmp_path / "*.txt"), "mode": "dense", "lengths": lengths, "min_ratio": ratio},
        limit=None,
    )
    groups = [g for s in samples for g in response(s)["groups"]]
    assert sorted((g["doc_index"], g["L"]) for g in groups) == [(0, 48), (0, 80), (1, 48), (1, 80)]
    for group in groups:
        ids = torch.tensor([tok(texts[group["doc_index"]], add_special_tokens=False)["input_ids"]])
        length, gap = group["L"], group["b_start"]
        for divergence in ("sce", "symkl"):
            config = RegularizerConfig(length=length, alpha=0.1, min_ratio=ratio, divergence=divergence)
            low, high = config.gaps
            assert low <= gap <= high  # the task's draw lies in the training default range
            with torch.no_grad():
                terms = regularized_loss(model, ids[:, : length + high], config, gap=gap)
            assert terms.n_positions == group["n_positions"]
            assert float(terms.misalign) * terms.n_positions == pytest.approx(group[f"{divergence}_sum"], rel=2e-4)


def test_term_matches_numpy_with_and_without_bos(tiny):
    rows = windows(2, 40)
    for bos in (None, 7):
        for divergence, index in (("sce", 0), ("symkl", 1)):
            config = RegularizerConfig(length=30, alpha=0.2, min_ratio=0.6, divergence=divergence, bos_token_id=bos)
            with torch.no_grad():
                terms = regularized_loss(tiny, rows, config, gap=9)
            # positions t in [max(9, 18 + 9 - 1), 29]: 4 per window
            assert terms.n_positions == 4
            want = numpy_term(tiny, rows, 30, 9, 0.6, bos)[index]
            assert float(terms.misalign) == pytest.approx(want, rel=1e-5), (bos, divergence)


# --------------------------------------------------------------------------- the LM loss and the sum


def test_alpha_zero_is_exactly_the_plain_lm_loss(tiny):
    rows = windows(3, 48, seed=1)
    config = RegularizerConfig(length=32, alpha=0.0)
    terms = regularized_loss(tiny, rows, config, generator=torch.Generator().manual_seed(3))
    plain = tiny(input_ids=rows[:, :32], labels=rows[:, :32]).loss
    assert torch.equal(terms.total, plain) and torch.equal(terms.lm_loss, plain)
    # Independent of HF's loss code: mean next-token NLL over A written out.
    logp = torch.log_softmax(tiny(input_ids=rows[:, :32]).logits[:, :-1].double(), -1)
    nll = -logp.gather(-1, rows[:, 1:32, None]).mean()
    assert float(terms.total) == pytest.approx(float(nll), rel=1e-6)
    assert not terms.misalign.requires_grad  # logged only
    weighted = regularized_loss(tiny, rows, RegularizerConfig(length=32, alpha=0.3), gap=terms.gap)
    assert float(weighted.total) == pytest.approx(float(plain) + 0.3 * float(terms.misalign), rel=1e-6)


def test_gradient_reaches_parameters_through_both_inputs(tiny):
    rows = windows(2, 40, seed=2)
    config = RegularizerConfig(length=32, alpha=0.5)
    params = [p for p in tiny.parameters() if p.requires_grad]

    def grads(detach):
        term = regularized_loss(tiny, rows, config, gap=6, detach=detach).misalign
        return torch.autograd.grad(term, params, allow_unused=True)

    only_b, only_a, both = grads("long"), grads("short"), grads(None)
    norm = lambda gs: sum(float(g.norm()) for g in gs if g is not None)  # noqa: E731
    assert norm(only_a) > 1e-6 and norm(only_b) > 1e-6
    # Chain rule: the full gradient is the sum of the two paths' gradients.
    for a, b, full in zip(only_a, only_b, both, strict=True):
        assert full is not None
        assert torch.allclose(full, a + b, atol=1e-6, rtol=1e-4)


def test_a_few_steps_lower_the_term_on_the_training_windows():
    torch.manual_seed(1)
    config_ = tiny_config()
    start = LlamaForCausalLM(config_)
    rows = windows(4, 48, seed=4)
    config = RegularizerConfig(length=32, alpha=3.0)

    def term_over_all_gaps(model) -> float:
        with torch.no_grad():
            return float(
                np.mean(
                    [
                        float(regularized_loss(model, rows, config, gap=g).misalign)
                        for g in range(config.gaps[0], config.gaps[1] + 1)
                    ]
                )
            )

    def trained(alpha: float):
        model = LlamaForCausalLM(config_)
        model.load_state_dict(start.state_dict())
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        gaps = torch.Generator().manual_seed(0)
        step_config = RegularizerConfig(length=32, alpha=alpha)
        for _ in range(15):
            opt.zero_grad()
            regularized_loss(model, rows, step_config, generator=gaps).total.backward()
            opt.step()
        return model

    before = term_over_all_gaps(start)
    after, lm_only = term_over_all_gaps(trained(3.0)), term_over_all_gaps(trained(0.0))
    print(f"term before {before:.4f}, after alpha=3 {after:.4f}, after alpha=0 {lm_only:.4f}")
    assert after < before - 0.2
    assert after < lm_only - 0.1  # the regularizer, not the LM loss alone, did it


def test_trainer_logs_both_terms_and_trains_on_their_sum(tiny, tmp_path):
    config = RegularizerConfig(length=24, alpha=0.25, gap_range=(2, 8))
    model = LlamaForCausalLM(tiny.config)
    model.load_state_dict(tiny.state_dict())
    data = [{"input_ids": row} for row in windows(6, 32, seed=5)]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=2,
        logging_steps=1,
        learning_rate=1e-3,
        seed=11,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = MisalignmentTrainer(model=model, args=args, train_dataset=data, regularizer=config)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "lm_loss" in h]
    assert [h["step"] for h in logs] == [1, 2, 3]
    expected_gaps = torch.Generator().manual_seed(11)
    for h in logs:
        assert h["loss"] == pytest.approx(h["lm_loss"] + 0.25 * h["misalign"], rel=1e-4)
        assert h["gap"] == config.draw_gap(expected_gaps)  # gaps come from a generator seeded by args.seed
        assert h["misalign"] > 0 and h["lm_loss"] > 0


# --------------------------------------------------------------------------- bad input


def test_bad_input_fails_before_training(tiny, tmp_path):
    config = RegularizerConfig(length=32, alpha=0.1)  # gaps [1, 16]: windows need 48 tokens
    with pytest.raises(ValueError, match=r"windows have 40 tokens, but L \+ the largest gap 16 .* needs 48"):
        regularized_loss(tiny, windows(1, 40), config)
    with pytest.raises(ValueError, match=r"L \+ gap 12 needs 44"):
        regularized_loss(tiny, windows(1, 40), config, gap=12)
    with pytest.raises(ValueError, match=r"alpha=-0.1 must be a finite number >= 0"):
        RegularizerConfig(length=32, alpha=-0.1)
    with pytest.raises(ValueError, match=r"a gap above 16 leaves no shared position .* use a high gap <= 16"):
        RegularizerConfig(length=32, gap_range=(1, 20))
    with pytest.raises(ValueError, match=r"a gap above 9 leaves no shared position"):
        RegularizerConfig(length=32, min_ratio=0.7, gap_range=(4, 10))  # ceil(0.7*32) = 23, 32 - 23 = 9
    with pytest.raises(ValueError, match=r"gap=17 must lie in \[1, 16\]"):
        regularized_loss(tiny, windows(1, 60), config, gap=17)
    with pytest.raises(ValueError, match=r"divergence='js' must be one of"):
        RegularizerConfig(length=32, divergence="js")
    with pytest.raises(TypeError, match=r"LlamaModel is not a causal language model .* AutoModelForCausalLM"):
        check_model(LlamaModel(tiny.config))
    # Through the Trainer: the short windows are refused before the first step.
    model = LlamaForCausalLM(tiny.config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=1,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = MisalignmentTrainer(
        model=model, args=args, train_dataset=[{"input_ids": r} for r in windows(2, 40)], regularizer=config
    )
    with pytest.raises(ValueError, match=r"windows have 40 tokens"):
        trainer.train()
    assert trainer.state.global_step == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(TypeError, match=r"not a causal language model"):
        MisalignmentTrainer(model=LlamaModel(tiny.config), args=args, train_dataset=[], regularizer=config)


# --------------------------------------------------------------------------- the command


def _cli(*argv: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = offline_env(PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "lm_eval_longshort.cli", "finetune", *argv],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=timeout,
    )


def test_finetune_command_help_and_bad_alpha(assets, tmp_path):
    done = _cli("--help")
    assert done.returncode == 0 and "--alphas" in done.stdout and "--eval-lengths" in done.stdout
    done = _cli("--alphas", "0", "-0.5", "--output-dir", str(tmp_path))
    assert done.returncode == 2 and "alpha=-0.5 must be a finite number >= 0" in done.stderr
    assert not any(tmp_path.iterdir())  # refused before any work


def test_pairs_compared_are_each_alpha_against_zero_and_each_checkpoint_against_base():
    names = ["base", "alpha_0", "alpha_0.1", "alpha_0.3"]
    assert pairs_to_compare(names) == [
        ("alpha_0.1", "alpha_0"),
        ("alpha_0.3", "alpha_0"),
        ("alpha_0", "base"),
        ("alpha_0.1", "base"),
        ("alpha_0.3", "base"),
    ]
    assert pairs_to_compare(["alpha_0", "alpha_0.1"]) == [("alpha_0.1", "alpha_0")]  # --no-base
    assert pairs_to_compare(["alpha_0.1", "alpha_0.2"]) == []  # no alpha 0, no base: nothing to pair


def _document_sums(results_file: Path, task: str, key: str) -> list[list[float]]:
    """[numerator, denominator] of ``key`` per scored document, in document order, from a results JSON."""
    record = json.loads(results_file.read_text(encoding="utf-8"))["configs"][task]["longshort"]
    docs = sorted((d for d in record["documents"] if not d.get("skipped")), key=lambda d: d["doc_index"])
    return [d["sums"][key] for d in docs]


@pytest.mark.slow
def test_finetune_measures_its_checkpoints_as_one_sweep(assets, tmp_path):
    out, runs, lengths = tmp_path / "out", ["alpha_0", "alpha_0.1"], [16, 32]
    done = _cli(
        *("--steps", "2", "--length", "16", "--eval-docs", "2", "--target-tokens", "4", "--no-base"),
        *("--eval-lengths", *map(str, lengths), "--output-dir", str(out)),
        timeout=1500,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    # The sweep: one run per checkpoint, the held-out plays (the corpus's last two of 38), both tasks.
    sweep = yaml.safe_load((out / "eval" / "finetune_sweep.yaml").read_text(encoding="utf-8"))
    assert [r["name"] for r in sweep["runs"]] == runs
    assert [r["model_args"]["pretrained"] for r in sweep["runs"]] == [str((out / n).resolve()) for n in runs]
    assert sweep["samples"] == [36, 37] and sweep["device"] == "cpu"
    assert [t["task"] for t in sweep["tasks"]] == ["longshort_ppl_shakespeare", "longshort_misalign_shakespeare"]
    assert sweep["tasks"][1]["metadata"] == {"mode": "dense", "lengths": lengths, "min_ratio": 0.5, "seed": 1234}
    assert len(list(csv.DictReader((out / "train_log.csv").open()))) == 4  # 2 steps x 2 alphas
    # The report's held-out values are the sweep's (values.csv), at the report's 4 decimals.
    values = {
        (r["run"], r["task"], r["metric"], r["L"]): (r["value"], r["stderr"])
        for r in csv.DictReader((out / "eval" / "report" / "values.csv").open())
    }
    text = (out / "finetune_regularizer.md").read_text(encoding="utf-8")
    # Each cell sits under its own column's name (a header out of step with its cells was a bug).
    header = next(line for line in text.splitlines() if line.startswith("| model | L |"))
    columns = [c.strip().removesuffix("@L") for c in header.strip("|").split("|")][2:]
    assert sorted(columns) == ["ppl", "sce", "symkl"]
    task_of = {"ppl": "longshort_ppl_shakespeare", "sce": "longshort_misalign_shakespeare"}
    for run in runs:
        for n in lengths:
            cells = [
                "{:.4f} ± {:.4f}".format(*map(float, values[(run, task_of.get(m, task_of["sce"]), m, str(n))]))
                for m in columns
            ]
            assert f"| {run} | {n} | " + " | ".join(cells) + " |" in text
    # Paired differences: alpha 0.1 minus alpha 0 on the same documents, from the sums the results hold.
    files = (out / "eval").rglob("results_*.json")
    results = {json.loads(f.read_text(encoding="utf-8"))["longshort_sweep"]["run"]: f for f in files}
    paired = {(r["metric"], int(r["length"])): r for r in csv.DictReader((out / "paired.csv").open())}
    assert {(r["label"], r["versus"]) for r in paired.values()} == {("alpha_0.1", "alpha_0")}
    for metric, task, transform in (
        ("ppl", "longshort_ppl_shakespeare", "exp"),
        ("sce", "longshort_misalign_shakespeare", "identity"),
        ("symkl", "longshort_misalign_shakespeare", "identity"),
    ):
        for n in lengths:
            x, y = (_document_sums(results[run], task, f"{metric}@{n}") for run in ("alpha_0.1", "alpha_0"))
            assert len(x) == len(y) == 2
            want = aggregate.paired_difference(x, y, transform)
            row = paired[(metric, n)]
            assert (float(row["difference"]), float(row["stderr"])) == pytest.approx(want, rel=1e-12, abs=1e-15)
    # The report's differences table: each paired difference under its own column's name.
    header = next(line for line in text.splitlines() if line.startswith("| difference | L |"))
    columns = [c.strip().removeprefix("Δ").removesuffix("@L") for c in header.strip("|").split("|")][2:]
    for n in lengths:
        cells = [
            "{:+.4f} ± {:.4f}".format(*map(float, (paired[(m, n)]["difference"], paired[(m, n)]["stderr"])))
            for m in columns
        ]
        assert f"| alpha_0.1 − alpha_0 | {n} | " + " | ".join(cells) + " |" in text
