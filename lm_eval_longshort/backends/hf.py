"""Exact scoring with a Hugging Face transformers causal LM (what ``--model hf`` loads).

Memory stays bounded on long windows: no [T, V] tensor is ever built. The decoder runs
once per batch and returns hidden states ``[B, T, d]``; the model's own output layer (and
the logit soft-capping or scaling its config declares) is applied only at the positions a
request needs, ``chunk_positions`` rows at a time, and the log-softmax is taken in float32.

Batching: requests are packed into forward batches by the ``batch_tokens`` budget, longest
first; lm-eval's ``--batch_size`` caps the rows of a batch only when it is set above 1
(its default, 1, cannot be told apart from an explicit 1: see ``HFEngine.from_hflm``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from lm_eval_longshort.backends.fingerprint import hf_identity
from lm_eval_longshort.backends.logits import (
    UnsupportedLogitsError,
    checked_log_softmax,
    logit_postprocessing,
)
from lm_eval_longshort.numerics.divergences import METRIC_NAMES, position_values
from lm_eval_longshort.protocols.requests import (
    AlignedWindows,
    Prompt,
    ScoringEngine,
    TargetWindow,
)

log = logging.getLogger(__name__)

# RoPE variants whose frequencies change with the sequence length: a token's logits in a
# 4k pass differ from the same token's in an 8k pass, so truncate needs per-length passes.
LENGTH_DEPENDENT_ROPE = {"dynamic", "longrope"}

# Log-probabilities of one chunk of a request's positions: (slice into the positions, [c, V]).
Chunk = tuple[slice, torch.Tensor]


def rope_type(config) -> str | None:
    for attr in ("rope_parameters", "rope_scaling"):
        params = getattr(config, attr, None)
        if isinstance(params, dict):
            kind = params.get("rope_type") or params.get("type")
            if kind:
                return str(kind)
    return None


class HFEngine(ScoringEngine):
    """Scores requests with ``model`` (a transformers ``*ForCausalLM``).

    ``max_batch_rows``: most sequences per forward (None: only ``batch_tokens`` limits a batch).
    ``split_head``: None checks whether decoder + output layer reproduce the model's logits
    (the fast, bounded path); False forces the fallback (full-model forwards over a KV cache).
    """

    name = "hf"

    def __init__(
        self,
        model,
        tokenizer,
        max_length: int,
        *,
        batch_tokens: int = 32768,
        max_batch_rows: int | None = None,
        chunk_positions: int = 1024,
        progress: bool = True,
        split_head: bool | None = None,
    ):
        self.model = model
        self._tokenizer = tokenizer
        self._max_length = int(max_length)
        self.batch_tokens = batch_tokens
        self.max_batch_rows = max_batch_rows
        # A row joins a batch only if it is at least this share of the batch's longest row:
        # padding is computed like real tokens, so mixing 512 with 2048 would waste work.
        self.min_fill = 0.8
        self.chunk_positions = chunk_positions
        self.progress = progress
        self.device = next(model.parameters()).device
        self._scale, self._softcap = self._postprocessing()
        self._split = self._split_head_available() if split_head is None else bool(split_head)

    @classmethod
    def from_hflm(cls, lm, **kwargs) -> HFEngine:
        """Wrap lm-eval's HFLM (``--model hf``): its model, tokenizer and max_length.

        lm-eval passes ``batch_size=1`` both by default and for an explicit ``--batch_size 1``
        (its CLI default and ``EvaluatorConfig.batch_size`` are 1), so 1 means "not set": rows
        are limited by ``batch_tokens`` only. A larger integer caps the rows per forward;
        ``auto`` leaves batching to the token budget. One row at a time: ``batch_tokens: 1``.
        """
        size = getattr(lm, "batch_size", None)
        rows = size if isinstance(size, int) and size > 1 else None
        return cls(lm.model, lm.tokenizer, lm.max_length, max_batch_rows=rows, **kwargs)

    # -- ScoringEngine properties -------------------------------------------------
    def identity(self) -> dict:
        return hf_identity(self.model)

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def position_dependent(self) -> bool:
        return rope_type(self.model.config) in LENGTH_DEPENDENT_ROPE

    @property
    def length_hint(self) -> str:
        return "pass max_length=N in --model_args (e.g. --model_args pretrained=...,max_length=16384)"

    # -- model plumbing -------------------------------------------------------------
    def _postprocessing(self) -> tuple[float, float | None]:
        """(scale, softcap) the config applies to logits after the head; (1, None) if unknown."""
        try:
            return logit_postprocessing(self.model.config)
        except UnsupportedLogitsError as err:
            log.warning("hf backend: %s; using full-model forwards", err)
            return 1.0, None

    def _split_head_available(self) -> bool:
        """Can we run decoder and output layer separately and get the model's own logits?

        Checked once on a short input: models that post-process logits in a way the config
        does not declare fail the check and fall back to full-model forwards.
        """
        decoder, head = self._decoder(), self.model.get_output_embeddings()
        if decoder is None or head is None:
            return False
        ids = torch.arange(2, 18, device=self.device).unsqueeze(0) % max(2, self.model.config.vocab_size)
        with torch.inference_mode():
            reference = self.model(input_ids=ids, use_cache=False).logits.float()
            split = self._head_logits(decoder(input_ids=ids, use_cache=False).last_hidden_state)
        ok = torch.allclose(split, reference, rtol=1e-4, atol=1e-4)
        if not ok:
            log.warning("hf backend: decoder+head logits differ from the model's; using full-model forwards")
        return ok

    def _decoder(self):
        getter = getattr(self.model, "get_decoder", None)
        try:
            decoder = getter() if getter else None
        except (AttributeError, NotImplementedError):
            decoder = None
        return decoder if decoder is not None and decoder is not self.model else None

    def _head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., d] -> [..., V] float32 logits: the output layer, then the config's post-processing
        in the model's dtype (as the model itself does it)."""
        logits = self.model.get_output_embeddings()(hidden)
        if self._scale != 1.0:
            logits = logits * self._scale
        if self._softcap is not None:
            logits = torch.tanh(logits / self._softcap) * self._softcap
        return logits.float()

    def _log_softmax(self, logits: torch.Tensor, label: str, positions: torch.Tensor) -> torch.Tensor:
        """[k, V] logits -> float32 log-softmax; errors on non-finite logits."""
        return checked_log_softmax(logits, label, positions)

    def _batches(
        self, lengths: Sequence[int], rows_per_item: int = 1, budget: int | None = None
    ) -> Iterator[list[int]]:
        """Group item indices longest first, neighbours in length together, within the token budget.

        An item is ``rows_per_item`` sequences of ``lengths[i]`` tokens (a dense pair is two);
        a batch holds at most ``budget`` padded tokens (None: ``batch_tokens``; at least one item), at most
        ``max_batch_rows`` rows when that is set, and items of at least ``min_fill`` times its
        longest. With length-dependent positions (dynamic RoPE) a padded row would be encoded at
        the batch's length, not its own: such models only batch items of equal length.
        """
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        start = 0
        while start < len(order):
            longest = lengths[order[start]]
            shortest = longest if self.position_dependent else self.min_fill * longest
            items = (budget or self.batch_tokens) // max(1, longest * rows_per_item)
            if self.max_batch_rows is not None:
                items = min(items, self.max_batch_rows // rows_per_item)
            batch = order[start : start + max(1, items)]
            batch = [i for i in batch if lengths[i] >= shortest]  # a prefix: lengths only fall
            yield batch
            start += len(batch)

    def _run(
        self,
        sequences: Sequence[np.ndarray],
        desc: str,
        budget: int | None,
        rows_per_item: int = 1,
    ) -> Iterator[tuple[list[int], _Forward]]:
        """Forward every item once; yield (item indices, the batch's forward) per batch.

        ``sequences`` holds ``rows_per_item`` consecutive rows per item; ``budget`` is the most
        tokens per batch (None: the engine's ``batch_tokens``). Shorter rows are right-padded
        without an attention mask: under causal attention a real token never sees the padding
        after it, and positions still count from 0, so each row's outputs equal its unbatched
        ones (and SDPA keeps its causal fast path).
        """
        lengths = [len(s) for s in sequences]
        item_lengths = [
            max(lengths[i * rows_per_item : (i + 1) * rows_per_item]) for i in range(len(sequences) // rows_per_item)
        ]
        bar = tqdm(total=int(sum(lengths)), desc=desc, unit="tok", disable=not self.progress, leave=False)
        with torch.inference_mode():
            for batch in self._batches(item_lengths, rows_per_item, budget):
                rows = [i * rows_per_item + r for i in batch for r in range(rows_per_item)]
                ids = np.zeros((len(rows), max(lengths[i] for i in rows)), dtype=np.int64)  # [b, T]
                for row, i in enumerate(rows):
                    ids[row, : lengths[i]] = sequences[i]
                yield batch, _Forward(self, torch.as_tensor(ids, device=self.device), [lengths[i] for i in rows])
                bar.update(sum(lengths[i] for i in rows))
        bar.close()

    # -- requests ---------------------------------------------------------------------
    def target_nll(self, windows: Sequence[TargetWindow], *, batch_tokens: int | None = None) -> list[np.ndarray]:
        full = self.prepare(windows)
        out: list[np.ndarray | None] = [None] * len(windows)
        inputs = [w.fed(seq) for seq, w in zip(full, windows, strict=True)]
        for batch, forward in self._run(inputs, "longshort hf: perplexity", batch_tokens):
            for row, i in enumerate(batch):
                w, seq = windows[i], torch.as_tensor(full[i], device=self.device)
                # Target tokens[j] sits at input j + offset and is predicted by input j + offset - 1.
                targets = torch.arange(w.first_target, len(seq), device=self.device)
                nll = [
                    -logp.gather(1, seq[targets[part], None])[:, 0]
                    for part, logp in forward.logprobs(row, targets - 1, w.label)
                ]
                out[i] = torch.cat(nll).double().cpu().numpy() if nll else np.zeros(0)
        return out  # type: ignore[return-value]

    def last_logprobs(self, prompts: Sequence[Prompt], *, batch_tokens: int | None = None) -> torch.Tensor:
        sequences = self.prepare(prompts)
        out = [None] * len(prompts)
        for batch, forward in self._run(sequences, "longshort hf: misalignment", batch_tokens):
            ends = torch.tensor([len(sequences[i]) - 1 for i in batch], device=self.device)
            for part, logp in forward.last_rows(ends, prompts[batch[0]].label):
                for row, values in zip(range(len(batch))[part], logp, strict=True):
                    out[batch[row]] = values.cpu()
        return torch.stack(out)  # type: ignore[arg-type]

    def aligned_divergences(
        self, pairs: Sequence[AlignedWindows], topk: int = 256, *, batch_tokens: int | None = None
    ) -> list[dict[str, np.ndarray]]:
        """Exact full-vocabulary divergences and ``dp`` (``topk`` is ignored: nothing is approximated).

        Pairs are batched across documents (a pair's long and short window share a batch);
        divergences are computed ``chunk_positions`` compared positions at a time.
        """
        sequences = self.prepare(pairs)  # [long_0, short_0, long_1, ...]
        out: list[dict[str, np.ndarray] | None] = [None] * len(pairs)
        for batch, forward in self._run(sequences, "longshort hf: dense misalignment", batch_tokens, rows_per_item=2):
            for item, i in enumerate(batch):
                p = pairs[i]
                long_pos = torch.as_tensor(p.long_positions, device=self.device) + p.offset
                short_pos = torch.as_tensor(p.short_positions, device=self.device) + p.offset
                nexts = None if p.next_tokens is None else torch.as_tensor(p.next_tokens, device=self.device)
                # Both streams cut the compared positions into the same chunks: they stay aligned.
                parts = [
                    position_values(logp, logq, None if nexts is None else nexts[part])
                    for (part, logp), (_, logq) in zip(
                        forward.logprobs(2 * item, long_pos, p.label),
                        forward.logprobs(2 * item + 1, short_pos, p.label),
                        strict=True,
                    )
                ]
                names = parts[0] if parts else METRIC_NAMES
                out[i] = {
                    name: torch.cat([part[name] for part in parts]).double().cpu().numpy() if parts else np.zeros(0)
                    for name in names
                }
        return out  # type: ignore[return-value]


class _Forward:
    """One batch ``ids`` [b, T] through the model; log-probabilities at requested positions.

    Split head (the usual case): the decoder runs once here; the output layer is applied
    ``chunk_positions`` rows at a time. Fallback (the model's logits cannot be split off):
    each request runs the full model over its row with a KV cache, ``chunk_positions`` needed
    positions per step and logits only there (``logits_to_keep``), so no [T, V] tensor either;
    models with length-dependent RoPE take one step (a chunked prefill would encode the early
    chunks at a shorter length) and hold [positions, V] for that request.
    """

    def __init__(self, engine: HFEngine, ids: torch.Tensor, lengths: list[int]):
        self.engine, self.ids, self.lengths = engine, ids, lengths
        # use_cache=False: a decoder's default KV cache would hold K and V of every layer for the
        # whole batch (0.75 GiB for one 16k window of the embedded model) and nothing reads it.
        decoder = engine._decoder() if engine._split else None
        self.hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state if decoder else None  # [b, T, d]

    def logprobs(self, row: int, positions: torch.Tensor, label: str) -> Iterator[Chunk]:
        """Float32 log-softmax after each of ``positions`` (increasing) of ``row``, in chunks."""
        if self.hidden is None:
            yield from self._full_model(row, positions, label)
            return
        step = self.engine.chunk_positions
        for start in range(0, len(positions), step):
            part = slice(start, start + step)
            logits = self.engine._head_logits(self.hidden[row, positions[part]])
            yield part, self.engine._log_softmax(logits, label, positions[part])

    def last_rows(self, ends: torch.Tensor, label: str) -> Iterator[Chunk]:
        """Log-softmax after position ``ends[r]`` of each row r, chunks over rows."""
        if self.hidden is None:
            for row, end in enumerate(ends):
                for _, logp in self._full_model(row, end[None], label):
                    yield slice(row, row + 1), logp
            return
        step = self.engine.chunk_positions
        for start in range(0, len(ends), step):
            part = slice(start, start + step)
            rows = torch.arange(len(ends), device=ends.device)[part]
            logits = self.engine._head_logits(self.hidden[rows, ends[part]])  # [c, d] -> [c, V]
            yield part, self.engine._log_softmax(logits, label, ends[part])

    def _full_model(self, row: int, positions: torch.Tensor, label: str) -> Iterator[Chunk]:
        """The fallback: full-model steps over one row with a KV cache (see the class docstring)."""
        from transformers import DynamicCache

        engine, ids = self.engine, self.ids[row : row + 1, : self.lengths[row]]  # [1, T]
        step = max(1, len(positions)) if engine.position_dependent else engine.chunk_positions
        cache, fed = DynamicCache(config=engine.model.config), 0
        for start in range(0, len(positions), step):
            part = slice(start, start + step)
            end = int(positions[part][-1]) + 1  # feed tokens up to the chunk's last position
            out = engine.model(
                input_ids=ids[:, fed:end], past_key_values=cache, use_cache=True, logits_to_keep=positions[part] - fed
            )
            fed = end
            yield part, engine._log_softmax(out.logits[0], label, positions[part])
