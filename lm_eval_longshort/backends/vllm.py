"""Scoring with a vLLM engine (what ``--model vllm`` loads). The only module that imports vllm.

Two routes, picked from how lm-eval's ``VLLM`` started the engine (``VLLMEngine.from_lm_eval``):

- hidden states (``VLLMHiddenStateEngine``, engine args ``runner=pooling, convert=embed,
  pooler_config={"task": "token_embed"}``): ``LLM.encode`` returns the final hidden state of
  every prompt position ([T, d], float32 on the CPU build); the plugin applies the checkpoint's
  LM head itself, in float32 and in chunks (``backends/logits.py``). Exact for every metric.
  vLLM 0.32's converted model drops its LM head; a pooling prompt may fill ``max_model_len``.
- prompt log-probabilities (``VLLMEngine``, a generate-mode engine), described below.

Every request of a call becomes a ``TokensPrompt``; prompts go to ``LLM.generate`` /
``LLM.encode`` in large chunks (one call per chunk, bounded by a token budget) so vLLM
batches and schedules them.

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

import logging
import os
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from vllm import SamplingParams, TokensPrompt

from lm_eval_longshort.backends.fingerprint import vllm_identity
from lm_eval_longshort.backends.hf import LENGTH_DEPENDENT_ROPE, rope_type
from lm_eval_longshort.backends.logits import OutputHead, load_output_head
from lm_eval_longshort.numerics.divergences import METRIC_NAMES, all_divergences
from lm_eval_longshort.numerics.topk import coarse_topk_divergences
from lm_eval_longshort.protocols.requests import (
    AlignedWindows,
    LengthLimitError,
    NonFiniteLogitsError,
    Prompt,
    ScoringEngine,
    TargetWindow,
)

log = logging.getLogger(__name__)

LOGPROB_MODES = ("raw_logprobs", "processed_logprobs")
NORMALISATION_TOL = 1e-3
MAX_LOGPROBS_FIX = "add max_logprobs=-1 to --model_args (e.g. --model_args pretrained=...,max_logprobs=-1)"
POOLING_ARGS = '"runner": "pooling", "convert": "embed", "pooler_config": {"task": "token_embed"}'
POOLING_EXAMPLE = f'--model_args \'{{"pretrained": "DIR", {POOLING_ARGS}}}\''
_route_hint_logged = False


class _VLLMBase(ScoringEngine):
    """What both routes share: the ``vllm.LLM``, its model config, lengths and RoPE facts."""

    def __init__(self, llm, tokenizer, *, batch_tokens: int, progress: bool = True):
        self.llm = llm
        self._tokenizer = tokenizer
        self.batch_tokens = batch_tokens
        self.progress = progress
        self.model_config = llm.llm_engine.model_config
        self._identity: dict | None = None

    @property
    def max_model_len(self) -> int:
        return int(self.model_config.max_model_len)

    def identity(self) -> dict:
        # Once, close to when the engine read its weights: later edits of the files are not in it.
        if self._identity is None:
            self._identity = vllm_identity(self.model_config, _checkpoint_folder(self.model_config))
        return dict(self._identity)

    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def position_dependent(self) -> bool:
        """As for hf: true for ``dynamic``/``longrope`` RoPE in the model's config.

        vLLM itself fixes such scalings per engine (dynamic NTK is precomputed for the longest
        position, LongRoPE picks its factors from max_model_len), so per-length passes give
        the same numbers as one pass here; they differ from HF's per-length scaling by design.
        """
        return rope_type(self.model_config.hf_config) in LENGTH_DEPENDENT_ROPE

    @property
    def native_context(self) -> int | None:
        """The context length the model's config declares (max_position_embeddings)."""
        value = getattr(self.model_config.hf_text_config, "max_position_embeddings", None)
        return int(value) if value else None

    def _beyond_native(self) -> str:
        native = self.native_context
        beyond = f" ({native} tokens)" if native else ""
        return (
            f"beyond the model's configured context{beyond} vLLM also needs the environment variable "
            "VLLM_ALLOW_LONG_MAX_MODEL_LEN=1 (or a RoPE scaling override via hf_overrides in --model_args)"
        )

    @staticmethod
    def _with_bos(tokens: np.ndarray, bos: int | None) -> np.ndarray:
        tokens = np.asarray(tokens, dtype=np.int64)
        return tokens if bos is None else np.concatenate([[bos], tokens]).astype(np.int64)


class VLLMEngine(_VLLMBase):
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
    def from_lm_eval(cls, lm, **kwargs) -> VLLMEngine | VLLMHiddenStateEngine:
        """Wrap lm-eval's VLLM (``--model vllm``): its ``vllm.LLM`` and HF tokenizer.

        A pooling engine (``runner=pooling``) gets the hidden-state route, any other the
        prompt log-probability route.
        """
        dp = int(getattr(lm, "data_parallel_size", 1) or 1)
        llm = getattr(lm, "model", None)
        if dp > 1 or llm is None:
            raise ValueError(
                f"longshort tasks need data_parallel_size=1 with --model vllm (got data_parallel_size={dp}): "
                "with data parallelism lm-eval runs vLLM inside Ray workers and keeps no engine in this "
                "process to ask for log-probabilities or hidden states. Use tensor_parallel_size=N to "
                "spread one model over N GPUs, or run one lm_eval process per GPU (CUDA_VISIBLE_DEVICES), "
                "each on a shard of the documents (--limit / --samples)"
            )
        if str(getattr(llm.llm_engine.model_config, "runner_type", "generate")) == "pooling":
            return VLLMHiddenStateEngine(llm, lm.tokenizer, **kwargs)
        _log_route_hint()
        return cls(llm, lm.tokenizer, **kwargs)

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
        requests = [TokensPrompt(prompt_token_ids=np.asarray(p).tolist()) for p in prompts]
        outputs = self.llm.generate(requests, params, use_tqdm=self.progress)
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
        for w in windows:
            self.check_lengths(w.n_inputs, w.label)
        prompts, params = [], []
        for w in windows:
            full = self._with_bos(w.tokens, w.bos)
            # A window's last token is only a target unless feed_last: it is not fed (exactly
            # what hf feeds); its log-probability comes from the generated position through
            # logprob_token_ids, so the prompt stays within max_length like hf's input.
            prompts.append(full if w.feed_last else full[:-1])
            extra = {} if w.feed_last else {"logprob_token_ids": [int(full[-1])]}
            params.append(
                SamplingParams(
                    max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False, flat_logprobs=True, **extra
                )
            )
        out: list[np.ndarray] = []
        for chunk in _chunks([len(p) for p in prompts], batch_tokens or self.batch_tokens):
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
        # Document token i sits at prompt position i + offset.
        offset = 1 if w.bos is not None else 0
        nll = -chosen[w.score_from + offset - 1 :]
        self._check_finite(nll, w.label, np.arange(w.score_from, len(w.tokens)), "document token")
        return nll.astype(np.float64)

    def last_logprobs(self, prompts: Sequence[Prompt], *, batch_tokens: int | None = None) -> torch.Tensor:
        for p in prompts:
            self.check_lengths(p.n_inputs, p.label)
        self._require_logprobs(self.vocab_size, "misalignment (mode last) compares full next-token distributions: it")
        params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=-1, detokenize=False, flat_logprobs=True)
        sequences = [self._with_bos(p.tokens, p.bos) for p in prompts]
        rows = torch.empty(len(prompts), self.vocab_size, dtype=torch.float32)
        for chunk in _chunks([len(s) for s in sequences], batch_tokens or self.batch_tokens, self.full_vocab_rows):
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
        how far below they can be (numerics/topk.py). top1 is exact.
        """
        for p in pairs:
            self.check_lengths(p.n_inputs, p.label)
        k = min(int(topk), self.vocab_size)
        if k < 1:
            raise ValueError(f"metadata topk={topk} must be >= 1")
        self._require_logprobs(k, f"misalignment (mode dense) on vLLM keeps the top topk={k} ids: it")
        params = SamplingParams(
            max_tokens=1, temperature=0.0, prompt_logprobs=k, logprobs=k, detokenize=False, flat_logprobs=True
        )
        sequences = [(self._with_bos(p.long_tokens, p.bos), self._with_bos(p.short_tokens, p.bos)) for p in pairs]
        sizes = [(len(a) + len(b)) * (k + 1) for a, b in sequences]
        out: list[dict[str, np.ndarray]] = []
        for chunk in _chunks(sizes, self.topk_entries):
            outputs = self._generate([s for i in chunk for s in sequences[i]], params)
            for j, i in enumerate(chunk):
                pair, offset = pairs[i], 1 if pairs[i].bos is not None else 0
                ids_p, lp_p = _topk_rows(outputs[2 * j], np.asarray(pair.long_positions) + offset, k, pair.label)
                ids_q, lp_q = _topk_rows(outputs[2 * j + 1], np.asarray(pair.short_positions) + offset, k, pair.label)
                self._check_finite(lp_p, pair.label, pair.long_positions, "long-window position")
                self._check_finite(lp_q, pair.label, pair.short_positions, "short-window position")
                out.append(coarse_topk_divergences(ids_p, lp_p, ids_q, lp_q))
        return out


class VLLMHiddenStateEngine(_VLLMBase):
    """Exact scoring from a pooling engine's final hidden states, with the LM head applied here.

    ``llm`` was started with ``runner=pooling, convert=embed, pooler_config={"task":
    "token_embed"}``; every request is one ``TokensPrompt`` to ``LLM.encode``, which returns the
    hidden state of every position. Only the rows a request scores go through the head
    (``backends/logits.py``: float32, ``chunk_positions`` rows at a time).
    """

    name = "vllm-hidden"

    def __init__(
        self,
        llm,
        tokenizer,
        *,
        batch_tokens: int = 65536,
        chunk_positions: int = 1024,
        progress: bool = True,
        head: OutputHead | None = None,
    ):
        """``batch_tokens``: prompt tokens per ``encode`` call (its hidden states, ``4·d`` bytes a
        token, are held until the call's requests are scored); ``head``: the output layer
        (default: read from the checkpoint, on the GPU when there is one)."""
        super().__init__(llm, tokenizer, batch_tokens=batch_tokens, progress=progress)
        check_pooling_engine(llm)
        if head is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
            head = load_output_head(
                _checkpoint_folder(self.model_config),
                self.model_config.hf_config,
                device=device,
                chunk_positions=chunk_positions,
            )
        self.head = head
        self.vocab_size = head.vocab_size
        from vllm.pooling_params import PoolingParams

        # use_activation=False: the raw hidden states (token_embed would otherwise L2-normalise them).
        self._pooling_params = PoolingParams(use_activation=False)

    # -- ScoringEngine properties -------------------------------------------------
    @property
    def max_length(self) -> int:
        return self.max_model_len  # a pooling prompt generates nothing: it may fill max_model_len

    @property
    def length_hint(self) -> str:
        return (
            'pass "max_model_len": N in the JSON --model_args (e.g. --model_args \'{"pretrained": "DIR", '
            f'"max_model_len": 16384, {POOLING_ARGS}}}\'); {self._beyond_native()}'
        )

    # -- plumbing --------------------------------------------------------------------
    def _encode(self, sequences: list[np.ndarray]) -> list[torch.Tensor]:
        """One ``LLM.encode`` over ``sequences``: per sequence its [T, d] final hidden states."""
        requests = [TokensPrompt(prompt_token_ids=np.asarray(s).tolist()) for s in sequences]
        outputs = self.llm.encode(
            requests, pooling_task="token_embed", pooling_params=self._pooling_params, use_tqdm=self.progress
        )
        hidden = [o.outputs.data for o in outputs]
        d = self.head.hidden_size
        if len(hidden) != len(sequences) or any(tuple(h.shape) != (len(s), d) for h, s in zip(hidden, sequences)):
            got = tuple(hidden[0].shape) if hidden else ()
            raise RuntimeError(
                f"vLLM returned token embeddings of shape {got} for a {len(sequences[0])}-token prompt; expected "
                f"[{len(sequences[0])}, {d}] final hidden states, one row per prompt token (a pooler with a "
                "projection, such as a sentence-transformers Dense module, is not supported)"
            )
        return hidden

    def _encoded(self, sequences: Sequence[np.ndarray], budget: int | None) -> Iterator[tuple[int, torch.Tensor]]:
        """(index, [T, d] hidden states) of every sequence, ``budget`` tokens (None: ``batch_tokens``)
        per ``encode`` call."""
        for chunk in _chunks([len(s) for s in sequences], budget or self.batch_tokens):
            hidden = self._encode([sequences[i] for i in chunk])
            yield from zip(chunk, hidden, strict=True)

    # -- requests ---------------------------------------------------------------------
    def target_nll(self, windows: Sequence[TargetWindow], *, batch_tokens: int | None = None) -> list[np.ndarray]:
        for w in windows:
            self.check_lengths(w.n_inputs, w.label)
        full = [self._with_bos(w.tokens, w.bos) for w in windows]
        inputs = [seq if w.feed_last else seq[:-1] for seq, w in zip(full, windows, strict=True)]
        out: list[np.ndarray | None] = [None] * len(windows)
        for i, hidden in self._encoded(inputs, batch_tokens):
            w, seq = windows[i], full[i]
            # Target tokens[j] sits at input j + offset and is predicted by the row before it.
            targets = np.arange(w.score_from + (w.bos is not None), len(seq))
            rows = torch.as_tensor(targets - 1)
            out[i] = self.head.token_nll(hidden[rows], torch.as_tensor(seq[targets]), w.label, rows).numpy()
        return out  # type: ignore[return-value]

    def last_logprobs(self, prompts: Sequence[Prompt], *, batch_tokens: int | None = None) -> torch.Tensor:
        for p in prompts:
            self.check_lengths(p.n_inputs, p.label)
        sequences = [self._with_bos(p.tokens, p.bos) for p in prompts]
        last = torch.empty(len(prompts), self.head.hidden_size, dtype=torch.float32)  # [n, d]
        for i, hidden in self._encoded(sequences, batch_tokens):
            last[i] = hidden[-1]
        ends = torch.tensor([len(s) - 1 for s in sequences])
        label = prompts[0].label if prompts else ""
        parts = [logp.cpu() for _, logp in self.head.chunks(last, label, ends)]
        return torch.cat(parts) if parts else torch.empty(0, self.vocab_size)

    def aligned_divergences(
        self, pairs: Sequence[AlignedWindows], topk: int = 256, *, batch_tokens: int | None = None
    ) -> list[dict[str, np.ndarray]]:
        """Exact full-vocabulary divergences (``topk`` is ignored: nothing is approximated)."""
        for p in pairs:
            self.check_lengths(p.n_inputs, p.label)
        sequences = [
            s for p in pairs for s in (self._with_bos(p.long_tokens, p.bos), self._with_bos(p.short_tokens, p.bos))
        ]
        out: list[dict[str, np.ndarray] | None] = [None] * len(pairs)
        held: dict[int, torch.Tensor] = {}
        for j, hidden in self._encoded(sequences, batch_tokens):
            held[j] = hidden
            if j % 2 == 1:  # both windows of pair j // 2 are in
                out[j // 2] = self._pair_divergences(pairs[j // 2], held.pop(j - 1), held.pop(j))
        return out  # type: ignore[return-value]

    def _pair_divergences(
        self, pair: AlignedWindows, h_long: torch.Tensor, h_short: torch.Tensor
    ) -> dict[str, np.ndarray]:
        """{metric: float64 [k]} between the pair's compared rows, ``chunk_positions`` at a time."""
        offset = 1 if pair.bos is not None else 0
        long_pos = torch.as_tensor(np.asarray(pair.long_positions) + offset)
        short_pos = torch.as_tensor(np.asarray(pair.short_positions) + offset)
        parts: dict[str, list[torch.Tensor]] = {name: [] for name in METRIC_NAMES}
        for rows, logp in self.head.chunks(h_long[long_pos], pair.label, long_pos):
            logq = self.head.log_softmax(h_short[short_pos[rows]], pair.label, short_pos[rows])
            for name, value in all_divergences(logp, logq).items():
                parts[name].append(value.double().cpu())
        return {name: torch.cat(v).numpy() if v else np.zeros(0) for name, v in parts.items()}


def check_pooling_engine(llm) -> None:
    """Error unless a pooling engine returns every position's raw final hidden state (token_embed).

    vLLM fixes an engine's pooling task at start-up from ``pooler_config`` (``LLM.pooling_task``)
    and refuses ``encode(pooling_task="token_embed")`` on any other: we say so before scoring.
    """
    config = llm.llm_engine.model_config
    pooler = getattr(config, "pooler_config", None)
    task = getattr(llm, "pooling_task", getattr(pooler, "task", None))
    convert = str(getattr(config, "convert_type", "embed"))
    if task != "token_embed" or convert != "embed":
        raise ValueError(
            f"the vLLM engine is a pooling engine (runner=pooling) with pooling task {task!r} and "
            f"convert={convert!r}; longshort tasks read the final hidden state of every position: add "
            f"{POOLING_ARGS} to the JSON --model_args, e.g. {POOLING_EXAMPLE}, or drop runner=pooling to "
            "score through prompt log-probabilities"
        )
    tok_pooling = getattr(pooler, "tok_pooling_type", None)
    dimensions = getattr(pooler, "dimensions", None)
    if tok_pooling not in (None, "ALL") or dimensions is not None:
        raise ValueError(
            f"the vLLM pooling engine was started with pooler_config tok_pooling_type={tok_pooling!r}, "
            f"dimensions={dimensions!r}; the hidden-state route needs every position's full hidden state: "
            'use "pooler_config": {"task": "token_embed"} without other keys'
        )


def _checkpoint_folder(model_config) -> str:
    """The local folder of the engine's checkpoint (a Hub id resolves to vLLM's download)."""
    model = str(model_config.model)
    if os.path.isdir(model):
        return model
    from huggingface_hub import snapshot_download

    return snapshot_download(
        model,
        revision=getattr(model_config, "revision", None),
        allow_patterns=["*.safetensors", "*.safetensors.index.json", "*.json"],
    )


def _log_route_hint() -> None:
    """Say once per process that the hidden-state route is faster and exact."""
    global _route_hint_logged
    if not _route_hint_logged:
        _route_hint_logged = True
        log.warning(
            "vllm backend: scoring through prompt log-probabilities (dense misalignment approximated from "
            "top-K lists). The hidden-state route is exact for every metric and faster: start the engine "
            "as a pooling model, %s",
            POOLING_EXAMPLE,
        )


# -- output parsing (module functions: no engine state) ---------------------------------
def _chunks(sizes: Sequence[int], budget: int, max_items: int | None = None) -> Iterator[list[int]]:
    """Consecutive index lists whose sizes sum to at most ``budget`` (an oversized item goes alone)."""
    chunk, used = [], 0
    for i, size in enumerate(sizes):
        if chunk and (used + size > budget or (max_items is not None and len(chunk) >= max_items)):
            yield chunk
            chunk, used = [], 0
        chunk.append(i)
        used += size
    if chunk:
        yield chunk


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
