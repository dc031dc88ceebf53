"""Exact scoring with a Hugging Face transformers causal LM (what ``--model hf`` loads).

Memory stays bounded on long windows: the decoder runs once per batch and returns
hidden states ``[B, T, d]``; vocabulary logits are computed only at the positions a
request needs, in chunks of ``chunk_positions`` rows, in float32.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from lm_eval_longshort.backends.base import (
    AlignedPair,
    NonFiniteLogitsError,
    Prompt,
    ScoringEngine,
    TargetWindow,
)
from lm_eval_longshort.numerics.divergences import METRIC_NAMES, all_divergences

log = logging.getLogger(__name__)

# RoPE variants whose frequencies change with the sequence length: a token's logits in a
# 4k pass differ from the same token's in an 8k pass, so truncate needs per-length passes.
LENGTH_DEPENDENT_ROPE = {"dynamic", "longrope"}


def rope_type(config) -> str | None:
    for attr in ("rope_parameters", "rope_scaling"):
        params = getattr(config, attr, None)
        if isinstance(params, dict):
            kind = params.get("rope_type") or params.get("type")
            if kind:
                return str(kind)
    return None


class HFEngine(ScoringEngine):
    """Scores requests with ``model`` (a transformers ``*ForCausalLM``)."""

    name = "hf"

    def __init__(self, model, tokenizer, max_length: int, *, batch_tokens: int = 32768,
                 max_batch_rows: int = 64, chunk_positions: int = 1024, progress: bool = True):
        self.model = model
        self._tokenizer = tokenizer
        self._max_length = int(max_length)
        self.batch_tokens = batch_tokens
        self.max_batch_rows = max_batch_rows
        self.chunk_positions = chunk_positions
        self.progress = progress
        self.device = next(model.parameters()).device
        self._split = self._split_head_available()

    @classmethod
    def from_hflm(cls, lm, **kwargs) -> HFEngine:
        """Wrap lm-eval's HFLM (``--model hf``): its model, tokenizer and max_length."""
        rows = lm.batch_size if isinstance(getattr(lm, "batch_size", None), int) else 64
        return cls(lm.model, lm.tokenizer, lm.max_length, max_batch_rows=max(1, rows), **kwargs)

    # -- ScoringEngine properties -------------------------------------------------
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
    def _split_head_available(self) -> bool:
        """Can we run decoder and LM head separately and get the model's own logits?

        Checked once on a short input: models that post-process logits (soft-capping,
        scaling) would fail the check and fall back to full forwards.
        """
        decoder, head = self._decoder(), self.model.get_output_embeddings()
        if decoder is None or head is None:
            return False
        ids = torch.arange(2, 18, device=self.device).unsqueeze(0) % max(2, self.model.config.vocab_size)
        with torch.inference_mode():
            reference = self.model(input_ids=ids).logits.float()
            split = head(decoder(input_ids=ids).last_hidden_state).float()
        ok = torch.allclose(split, reference, rtol=1e-4, atol=1e-4)
        if not ok:
            log.warning("hf backend: decoder+head logits differ from the model's; using full forwards")
        return ok

    def _decoder(self):
        getter = getattr(self.model, "get_decoder", None)
        try:
            decoder = getter() if getter else None
        except (AttributeError, NotImplementedError):
            decoder = None
        return decoder if decoder is not None and decoder is not self.model else None

    def _hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """[B, T] ids -> [B, T, d] final hidden states (or [B, T, V] logits without a split head)."""
        if self._split:
            return self._decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def _logprobs(self, hidden: torch.Tensor, label: str, positions: torch.Tensor) -> torch.Tensor:
        """[k, d] hidden rows -> [k, V] float32 log-softmax; errors on non-finite logits."""
        logits = (self.model.get_output_embeddings()(hidden) if self._split else hidden).float()
        finite = torch.isfinite(logits).all(-1)
        if not bool(finite.all()):
            bad = int(positions[~finite][0])
            raise NonFiniteLogitsError(
                f"{label}: non-finite logits at input position {bad}; check the model's dtype "
                "(try dtype=float32) and weights"
            )
        return torch.log_softmax(logits, dim=-1)

    def _batches(self, lengths: Sequence[int]) -> Iterator[list[int]]:
        """Group request indices longest first, neighbours in length together, within the token budget.

        With length-dependent positions (dynamic RoPE) a padded row would be encoded at the
        batch's length, not its own: such models only batch rows of equal length.
        """
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        exact = self.position_dependent
        start = 0
        while start < len(order):
            longest = lengths[order[start]]
            rows = max(1, min(self.max_batch_rows, self.batch_tokens // max(1, longest)))
            batch = order[start : start + rows]
            if exact:
                batch = [i for i in batch if lengths[i] == longest]
            yield batch
            start += len(batch)

    def _run(self, sequences: Sequence[np.ndarray], desc: str) -> Iterator[tuple[list[int], torch.Tensor]]:
        """Forward every sequence once; yield (indices, hidden [b, T, d]) per batch.

        Shorter rows are right-padded without an attention mask: under causal attention a
        real token never sees the padding after it, and positions still count from 0, so
        each row's outputs equal its unbatched ones (and SDPA keeps its causal fast path).
        """
        lengths = [len(s) for s in sequences]
        bar = tqdm(total=int(sum(lengths)), desc=desc, unit="tok", disable=not self.progress, leave=False)
        with torch.inference_mode():
            for batch in self._batches(lengths):
                width = max(lengths[i] for i in batch)
                ids = np.zeros((len(batch), width), dtype=np.int64)
                for row, i in enumerate(batch):
                    ids[row, : lengths[i]] = sequences[i]
                yield batch, self._hidden(torch.as_tensor(ids, device=self.device), None)
                bar.update(sum(lengths[i] for i in batch))
        bar.close()

    @staticmethod
    def _with_bos(tokens: np.ndarray, bos: int | None) -> np.ndarray:
        tokens = np.asarray(tokens, dtype=np.int64)
        return tokens if bos is None else np.concatenate([[bos], tokens]).astype(np.int64)

    # -- requests ---------------------------------------------------------------------
    def target_nll(self, windows: Sequence[TargetWindow]) -> list[np.ndarray]:
        for w in windows:
            self.check_lengths(w.n_inputs, w.label)
        full = [self._with_bos(w.tokens, w.bos) for w in windows]
        out: list[np.ndarray | None] = [None] * len(windows)
        inputs = [seq if w.feed_last else seq[:-1] for seq, w in zip(full, windows, strict=True)]
        for batch, hidden in self._run(inputs, "longshort hf: perplexity"):
            for row, i in enumerate(batch):
                w, seq = windows[i], torch.as_tensor(full[i], device=self.device)
                offset = 1 if w.bos is not None else 0
                # Target tokens[j] sits at input j + offset and is predicted by input j + offset - 1.
                targets = torch.arange(w.score_from + offset, len(seq), device=self.device)
                nll = []
                for chunk in targets.split(self.chunk_positions):
                    logp = self._logprobs(hidden[row, chunk - 1], w.label, chunk - 1)
                    nll.append(-logp.gather(1, seq[chunk][:, None])[:, 0])
                out[i] = torch.cat(nll).double().cpu().numpy() if nll else np.zeros(0)
        return out  # type: ignore[return-value]

    def last_logprobs(self, prompts: Sequence[Prompt]) -> torch.Tensor:
        for p in prompts:
            self.check_lengths(p.n_inputs, p.label)
        sequences = [self._with_bos(p.tokens, p.bos) for p in prompts]
        out = [None] * len(prompts)
        for batch, hidden in self._run(sequences, "longshort hf: misalignment"):
            ends = torch.tensor([len(sequences[i]) - 1 for i in batch], device=self.device)
            last = hidden[torch.arange(len(batch), device=self.device), ends]  # [b, d]
            logp = self._logprobs(last, prompts[batch[0]].label, ends)
            for row, i in enumerate(batch):
                out[i] = logp[row].cpu()
        return torch.stack(out)  # type: ignore[arg-type]

    def aligned_divergences(self, pairs: Sequence[AlignedPair], topk: int = 256) -> list[dict[str, np.ndarray]]:
        """Exact full-vocabulary divergences (``topk`` is ignored: nothing is approximated)."""
        for p in pairs:
            self.check_lengths(p.n_inputs, p.label)
        out = []
        bar = tqdm(total=len(pairs), desc="longshort hf: dense misalignment", disable=not self.progress, leave=False)
        with torch.inference_mode():
            for p in pairs:
                offset = 1 if p.bos is not None else 0
                seqs = [self._with_bos(p.long_tokens, p.bos), self._with_bos(p.short_tokens, p.bos)]
                if len(seqs[0]) == len(seqs[1]):
                    h = self._hidden(torch.as_tensor(np.stack(seqs), device=self.device), None)
                    h_long, h_short = h[0], h[1]
                else:
                    h_long = self._hidden(torch.as_tensor(seqs[0][None], device=self.device), None)[0]
                    h_short = self._hidden(torch.as_tensor(seqs[1][None], device=self.device), None)[0]
                long_pos = torch.as_tensor(p.long_positions, device=self.device) + offset
                short_pos = torch.as_tensor(p.short_positions, device=self.device) + offset
                parts = defaultdict(list)
                for lp, sp in zip(long_pos.split(self.chunk_positions), short_pos.split(self.chunk_positions)):
                    values = all_divergences(self._logprobs(h_long[lp], p.label, lp),
                                             self._logprobs(h_short[sp], p.label, sp))
                    for name in METRIC_NAMES:
                        parts[name].append(values[name].double().cpu())
                out.append({name: torch.cat(parts[name]).numpy() if parts[name] else np.zeros(0)
                            for name in METRIC_NAMES})
                bar.update(1)
        bar.close()
        return out
