"""vLLM's prompt log-probability route (``VLLMEngine``: a generate-mode engine).

Every request is a greedy one-token generation whose log-probabilities hold the scores.

What vLLM 0.32 (V1 engine; checked on the CPU build) returns on the generate route:

- ``logprobs_mode`` defaults to ``raw_logprobs``: sample and prompt log-probabilities are
  ``log_softmax(logits, dtype=float32)`` of the model's own logits, taken BEFORE logits
  processors, penalties, temperature and top-k/top-p (``v1/sample/sampler.py``); prompt
  log-probabilities never pass through sampling processors in any mode. We also sample
  greedily (temperature 0), which makes ``processed_logprobs`` equal too; the ``*_logits``
  modes return logits, not log-probabilities, and are refused.
- ``prompt_logprobs=k``: position j (j >= 1; position 0 is empty) holds the log-probability of
  prompt token j given the tokens before it, then the top k ids; ``logprobs=k`` does the same
  for the generated position (the distribution after the last prompt token). With
  ``flat_logprobs=True`` these arrive as flat lists (``FlatLogprobs``), not one object per entry.
- ``logprobs=-1`` with the engine argument ``max_logprobs=-1``: all V ids (plus the sampled id
  again, first). ``logprob_token_ids=[id]``: the log-probability of one chosen id there.
- A prompt holds at most ``max_model_len - 1`` tokens: vLLM keeps a slot for the token it
  generates (``v1/engine/input_processor.py``).
- The V1 runner (the CPU build's) has no dense prompt-logprob token-id API, so the dense
  misalignment mode uses top-K lists and is labelled approximate (``numerics/topk.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from vllm import SamplingParams

from lm_eval_longshort.backends.vllm_common import VLLMBase, chunks, tokens_prompts
from lm_eval_longshort.numerics.divergences import next_token_values
from lm_eval_longshort.numerics.topk import coarse_topk_divergences
from lm_eval_longshort.protocols.requests import (
    AlignedWindows,
    LengthLimitError,
    NonFiniteLogitsError,
    Prompt,
    TargetWindow,
)

LOGPROB_MODES = ("raw_logprobs", "processed_logprobs")
NORMALISATION_TOL = 1e-3
MAX_LOGPROBS_FIX = "add max_logprobs=-1 to --model_args (e.g. --model_args pretrained=...,max_logprobs=-1)"


class VLLMEngine(VLLMBase):
    """Scores requests with ``llm`` (a ``vllm.LLM``), greedy one-token generations with log-probabilities."""

    name = "vllm"

    def __init__(
        self,
        llm,
        tokenizer,
        *,
        batch_tokens: int = 262144,
        full_vocab_rows: int = 32,
        topk_entries: int = 4_000_000,
        progress: bool = True,
    ):
        """``batch_tokens``: prompt tokens per ``generate`` call; ``full_vocab_rows``: prompts per
        call when each returns the whole vocabulary (~6 MB of Python objects each);
        ``topk_entries``: returned top-K entries per call in dense mode (~100 B each)."""
        super().__init__(llm, tokenizer, batch_tokens=batch_tokens, progress=progress)
        self.full_vocab_rows = full_vocab_rows
        self.topk_entries = topk_entries
        self.vocab_size = int(self.model_config.get_vocab_size())
        mode = str(getattr(self.model_config, "logprobs_mode", "raw_logprobs"))
        if mode not in LOGPROB_MODES:
            raise ValueError(
                f"the vLLM engine was started with logprobs_mode={mode!r}, which returns logits, not "
                f"log-probabilities; drop logprobs_mode from --model_args (default raw_logprobs)"
            )

    @classmethod
    def from_lm_eval(cls, lm, **kwargs) -> VLLMBase:
        """Wrap lm-eval's VLLM (``--model vllm``) on the route its engine was started for
        (``backends.vllm.from_lm_eval``: a pooling engine gets ``VLLMHiddenStateEngine``)."""
        from lm_eval_longshort.backends.vllm import from_lm_eval  # the entry imports this module

        return from_lm_eval(lm, **kwargs)

    # -- ScoringEngine properties -------------------------------------------------
    @property
    def max_length(self) -> int:
        # vLLM rejects a prompt of exactly max_model_len tokens: one slot is for the generated token.
        return self.max_model_len - 1

    @property
    def length_hint(self) -> str:
        return (
            "pass max_model_len=N in --model_args (e.g. --model_args pretrained=...,max_model_len=16384,"
            f"max_logprobs=-1); {self._beyond_native()}"
        )

    def check_lengths(self, n_inputs: int, what: str) -> None:
        if n_inputs > self.max_length:
            raise LengthLimitError(
                f"{what} needs {n_inputs} input tokens per sequence, but the vllm backend was started "
                f"with max_model_len={self.max_model_len}, which holds prompts of at most {self.max_length} "
                f"tokens (vLLM keeps one slot for the token it generates); use max_model_len="
                f"{n_inputs + 1} or more: {self.length_hint}"
            )

    @property
    def approximate_dense(self) -> bool:
        return True

    # -- plumbing --------------------------------------------------------------------
    def _require_logprobs(self, count: int, what: str) -> None:
        """Error unless the engine's max_logprobs lets a request return ``count`` log-probabilities."""
        limit = int(self.model_config.max_logprobs)
        if limit != -1 and limit < count:
            raise ValueError(
                f"{what} needs {count} log-probabilities per position, but the vLLM engine was started "
                f"with max_logprobs={limit}; {MAX_LOGPROBS_FIX}"
            )

    def _generate(self, prompts: list[np.ndarray], params) -> list:
        """One ``LLM.generate`` over all ``prompts`` (``params``: one SamplingParams or one per prompt)."""
        outputs = self.llm.generate(tokens_prompts(prompts), params, use_tqdm=self.progress)
        if len(outputs) != len(prompts) or any(len(o.prompt_token_ids) != len(p) for o, p in zip(outputs, prompts)):
            raise RuntimeError("vLLM returned outputs that do not match the submitted prompts one to one")
        return outputs

    @staticmethod
    def _check_finite(values: np.ndarray, label: str, positions: np.ndarray, unit: str) -> None:
        """Error naming the first of ``positions`` (one per row of ``values``) with a non-finite value."""
        bad = np.flatnonzero(~np.isfinite(values.reshape(len(values), -1)).all(1))
        if bad.size:
            raise NonFiniteLogitsError(
                f"{label}: non-finite log-probability at {unit} {int(positions[bad[0]])}; check the model's "
                "dtype (try dtype=float32) and weights"
            )

    # -- requests ---------------------------------------------------------------------
    def target_nll(self, windows: Sequence[TargetWindow], *, batch_tokens: int | None = None) -> list[np.ndarray]:
        prompts, params = [], []
        for w, full in zip(windows, self.prepare(windows), strict=True):
            # A window's last token is only a target unless feed_last: it is not fed (exactly
            # what hf feeds); its log-probability comes from the generated position through
            # logprob_token_ids, so the prompt stays within max_length like hf's input.
            prompts.append(w.fed(full))
            extra = {} if w.feed_last else {"logprob_token_ids": [int(full[-1])]}
            params.append(
                SamplingParams(
                    max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False, flat_logprobs=True, **extra
                )
            )
        out: list[np.ndarray] = []
        for chunk in chunks([len(p) for p in prompts], batch_tokens or self.batch_tokens):
            outputs = self._generate([prompts[i] for i in chunk], [params[i] for i in chunk])
            out.extend(self._window_nll(windows[i], prompts[i], o) for i, o in zip(chunk, outputs, strict=True))
        return out

    def _window_nll(self, w: TargetWindow, prompt: np.ndarray, output) -> np.ndarray:
        """float64 NLL of ``w.tokens[score_from:]`` from one request's log-probabilities."""
        starts, _, ids, logprobs = _flat(output.prompt_logprobs, "prompt", w.label)
        # chosen[j - 1] = log p(prompt[j] | prompt[:j]): the first entry of prompt position j.
        chosen, chosen_ids = logprobs[starts[1:]], ids[starts[1:]]
        if not np.array_equal(chosen_ids, prompt[1:]):
            raise RuntimeError(f"{w.label}: vLLM's prompt log-probabilities are not those of the prompt tokens")
        if not w.feed_last:
            chosen = np.append(chosen, _logprob_of(output, int(w.tokens[-1]), w.label))
        # Document token i sits at prompt position i + offset, its log-probability at chosen[i + offset - 1].
        nll = -chosen[w.first_target - 1 :]
        self._check_finite(nll, w.label, np.arange(w.score_from, len(w.tokens)), "document token")
        return nll.astype(np.float64)

    def last_logprobs(self, prompts: Sequence[Prompt], *, batch_tokens: int | None = None) -> torch.Tensor:
        sequences = self.prepare(prompts)
        self._require_logprobs(self.vocab_size, "misalignment (mode last) compares full next-token distributions: it")
        params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=-1, detokenize=False, flat_logprobs=True)
        rows = torch.empty(len(prompts), self.vocab_size, dtype=torch.float32)
        for chunk in chunks([len(s) for s in sequences], batch_tokens or self.batch_tokens, self.full_vocab_rows):
            outputs = self._generate([sequences[i] for i in chunk], params)
            for i, output in zip(chunk, outputs, strict=True):
                rows[i] = torch.from_numpy(self._dense_row(output, prompts[i].label))
        return rows

    def _dense_row(self, output, label: str) -> np.ndarray:
        """[V] float32 log-probabilities of the generated position, checked for coverage and sum."""
        starts, ends, ids, logprobs = _flat(output.outputs[0].logprobs, "sample", label)
        ids, logprobs = ids[starts[0] : ends[0]], logprobs[starts[0] : ends[0]]
        v = self.vocab_size
        if ids.size == 0 or ids.min() < 0 or ids.max() >= v:
            raise RuntimeError(f"{label}: vLLM returned token ids outside the vocabulary [0, {v})")
        row = np.empty(v, dtype=np.float64)
        covered = np.zeros(v, dtype=bool)
        row[ids], covered[ids] = logprobs, True  # the sampled id comes twice, with the same value
        if not covered.all():
            raise RuntimeError(
                f"{label}: vLLM returned log-probabilities for {int(covered.sum())} of the {v} vocabulary "
                f"ids, not the full distribution; {MAX_LOGPROBS_FIX}"
            )
        self._check_finite(row, label, np.arange(v), "vocabulary id")
        total = float(np.exp(row - row.max()).sum() * np.exp(row.max()))
        if abs(total - 1.0) > NORMALISATION_TOL:
            raise RuntimeError(
                f"{label}: vLLM's next-token probabilities sum to {total:.6f}, not 1: they are not raw "
                "log-probabilities; drop logprobs_mode (default raw_logprobs) and logits processors from "
                "--model_args"
            )
        return row.astype(np.float32)

    def aligned_divergences(
        self, pairs: Sequence[AlignedWindows], topk: int = 256, *, batch_tokens: int | None = None
    ) -> list[dict[str, np.ndarray]]:
        """Top-K approximation (vLLM's V1 runner returns no dense per-position distributions).

        Per compared position, both windows' top-``topk`` lists give coarse-grained divergences
        that are lower bounds of the exact ones, and ``tv_err_bound`` / ``js_err_bound`` bound
        how far below they can be (numerics/topk.py). top1 is exact. ``dp`` is exact except where
        the next token is not in the prompt (``_next_token_logprobs``).
        """
        flat = self.prepare(pairs)
        sequences = list(zip(flat[0::2], flat[1::2]))  # per pair: (long window, short window)
        k = min(int(topk), self.vocab_size)
        if k < 1:
            raise ValueError(f"metadata topk={topk} must be >= 1")
        self._require_logprobs(k, f"misalignment (mode dense) on vLLM keeps the top topk={k} ids: it")
        params = SamplingParams(
            max_tokens=1, temperature=0.0, prompt_logprobs=k, logprobs=k, detokenize=False, flat_logprobs=True
        )
        sizes = [(len(a) + len(b)) * (k + 1) for a, b in sequences]
        out: list[dict[str, np.ndarray]] = []
        for chunk in chunks(sizes, self.topk_entries):
            outputs = self._generate([s for i in chunk for s in sequences[i]], params)
            for j, i in enumerate(chunk):
                pair = pairs[i]
                ids_p, lp_p = _topk_rows(outputs[2 * j], np.asarray(pair.long_positions) + pair.offset, k, pair.label)
                ids_q, lp_q = _topk_rows(
                    outputs[2 * j + 1], np.asarray(pair.short_positions) + pair.offset, k, pair.label
                )
                self._check_finite(lp_p, pair.label, pair.long_positions, "long-window position")
                self._check_finite(lp_q, pair.label, pair.short_positions, "short-window position")
                values = coarse_topk_divergences(ids_p, lp_p, ids_q, lp_q)
                if pair.next_tokens is not None:
                    values |= _next_token_values(outputs[2 * j], outputs[2 * j + 1], pair)
                out.append(values)
        return out


# -- output parsing (module functions: no engine state) ---------------------------------
def _flat(container, what: str, label: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(starts, ends, token_ids, logprobs) arrays of a FlatLogprobs container."""
    if container is None or not hasattr(container, "start_indices"):
        raise RuntimeError(
            f"{label}: vLLM returned {type(container).__name__} {what} log-probabilities, expected FlatLogprobs "
            "(SamplingParams(flat_logprobs=True), vLLM >= 0.32)"
        )
    return (
        np.asarray(container.start_indices, dtype=np.int64),
        np.asarray(container.end_indices, dtype=np.int64),
        np.asarray(container.token_ids, dtype=np.int64),
        np.asarray(container.logprobs, dtype=np.float64),
    )


def _logprob_of(output, token: int, label: str) -> float:
    """The generated position's log-probability of ``token`` (asked for via logprob_token_ids)."""
    starts, ends, ids, logprobs = _flat(output.outputs[0].logprobs, "sample", label)
    hits = np.flatnonzero(ids[starts[0] : ends[0]] == token)
    if hits.size == 0:
        raise RuntimeError(f"{label}: vLLM did not return the log-probability of token {token}")
    return float(logprobs[starts[0] + hits[0]])


def _next_token_values(long_output, short_output, pair: AlignedWindows) -> dict[str, np.ndarray]:
    """The next-token metrics (``dp``) of a pair from its two windows' outputs."""
    rows_p, rows_q = (np.asarray(r) + pair.offset for r in (pair.long_positions, pair.short_positions))
    nexts = np.asarray(pair.next_tokens)
    lp_p = torch.from_numpy(_next_token_logprobs(long_output, rows_p, nexts, pair.label))
    lp_q = torch.from_numpy(_next_token_logprobs(short_output, rows_q, nexts, pair.label))
    return {name: value.numpy() for name, value in next_token_values(lp_p, lp_q).items()}


def _next_token_logprobs(output, rows: np.ndarray, nexts: np.ndarray, label: str) -> np.ndarray:
    """float64 log-probability of ``nexts[i]`` after prompt position ``rows[i]``.

    Inside the prompt the next token is prompt token r + 1, whose exact log-probability is the
    first entry of its prompt list. After the last prompt token (the long window's last compared
    position: the document's next token is not in that prompt) it is read from the generated
    position's top-K list, -inf (probability 0) when outside it: off by at most the K-th
    probability there, one position per document and length (docs/metrics.md).
    """
    n_prompt = len(output.prompt_token_ids)
    out = np.full(len(rows), -np.inf)
    in_prompt = rows + 1 < n_prompt
    if in_prompt.any():
        starts, _, ids, logprobs = _flat(output.prompt_logprobs, "prompt", label)
        first = starts[rows[in_prompt] + 1]
        if not np.array_equal(ids[first], nexts[in_prompt]):
            raise RuntimeError(f"{label}: the compared positions' next tokens are not the prompt's")
        out[in_prompt] = logprobs[first]
    if (~in_prompt).any():
        starts, ends, ids, logprobs = _flat(output.outputs[0].logprobs, "sample", label)
        listed = dict(zip(ids[starts[0] + 1 : ends[0]].tolist(), logprobs[starts[0] + 1 : ends[0]].tolist()))
        out[~in_prompt] = [listed.get(int(token), -np.inf) for token in nexts[~in_prompt]]
    return out


def _topk_rows(output, rows: np.ndarray, k: int, label: str) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (ids, log-probs) [len(rows), k] of the distributions after prompt positions ``rows``.

    The distribution after position r predicts prompt token r + 1 (prompt log-probabilities at
    r + 1); after the last prompt token it is the generated position's. Each position's entries
    are the chosen/sampled id first, then the top k in order: the last k are the list.
    """
    n_prompt = len(output.prompt_token_ids)
    if rows.size and (rows.min() < 0 or rows.max() >= n_prompt):
        raise ValueError(f"{label}: compared positions outside the {n_prompt}-token prompt")
    ids_out, lps_out = np.zeros((len(rows), k), dtype=np.int64), np.zeros((len(rows), k))
    in_prompt = rows + 1 < n_prompt
    parts = [
        (in_prompt, output.prompt_logprobs, "prompt", rows[in_prompt] + 1),
        (~in_prompt, output.outputs[0].logprobs, "sample", np.zeros(int((~in_prompt).sum()), dtype=np.int64)),
    ]
    for mask, container, what, positions in parts:
        if not mask.any():
            continue
        starts, ends, ids, logprobs = _flat(container, what, label)
        if not np.all(ends[positions] - starts[positions] == k + 1):
            raise RuntimeError(f"{label}: vLLM returned {what} lists of another length than topk + 1 = {k + 1}")
        index = (ends[positions] - k)[:, None] + np.arange(k)
        ids_out[mask], lps_out[mask] = ids[index], logprobs[index]
    return ids_out, lps_out
