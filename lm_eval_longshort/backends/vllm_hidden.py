"""vLLM's hidden-state route (``VLLMHiddenStateEngine``: a pooling engine), exact for every metric.

The engine is started with ``runner=pooling, convert=embed, pooler_config={"task": "token_embed"}``;
``LLM.encode`` returns the final hidden state of every prompt position ([T, d], float32 on the
CPU build), and the plugin applies the checkpoint's LM head itself, in float32 and in chunks
(``backends/logits.py``). vLLM 0.32's converted model drops its LM head; a pooling prompt may
fill ``max_model_len``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from lm_eval_longshort.backends.logits import OutputHead, load_output_head
from lm_eval_longshort.backends.vllm_common import VLLMBase, checkpoint_folder, chunks, tokens_prompts
from lm_eval_longshort.numerics.divergences import METRIC_NAMES, position_values
from lm_eval_longshort.protocols.requests import AlignedWindows, Prompt, TargetWindow

POOLING_ARGS = '"runner": "pooling", "convert": "embed", "pooler_config": {"task": "token_embed"}'
POOLING_EXAMPLE = f'--model_args \'{{"pretrained": "DIR", {POOLING_ARGS}}}\''


class VLLMHiddenStateEngine(VLLMBase):
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
                checkpoint_folder(self.model_config),
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
        outputs = self.llm.encode(
            tokens_prompts(sequences),
            pooling_task="token_embed",
            pooling_params=self._pooling_params,
            use_tqdm=self.progress,
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
        for chunk in chunks([len(s) for s in sequences], budget or self.batch_tokens):
            hidden = self._encode([sequences[i] for i in chunk])
            yield from zip(chunk, hidden, strict=True)

    # -- requests ---------------------------------------------------------------------
    def target_nll(self, windows: Sequence[TargetWindow], *, batch_tokens: int | None = None) -> list[np.ndarray]:
        full = self.prepare(windows)
        inputs = [w.fed(seq) for seq, w in zip(full, windows, strict=True)]
        out: list[np.ndarray | None] = [None] * len(windows)
        for i, hidden in self._encoded(inputs, batch_tokens):
            w, seq = windows[i], full[i]
            # Target tokens[j] sits at input j + offset and is predicted by the row before it.
            targets = np.arange(w.first_target, len(seq))
            rows = torch.as_tensor(targets - 1)
            out[i] = self.head.token_nll(hidden[rows], torch.as_tensor(seq[targets]), w.label, rows).numpy()
        return out  # type: ignore[return-value]

    def last_logprobs(self, prompts: Sequence[Prompt], *, batch_tokens: int | None = None) -> torch.Tensor:
        sequences = self.prepare(prompts)
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
        """Exact full-vocabulary divergences and ``dp`` (``topk`` is ignored: nothing is approximated)."""
        sequences = self.prepare(pairs)  # [long_0, short_0, long_1, ...]
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
        """{metric: float64 [k]} between the pair's compared rows (``dp`` too when the pair carries
        its next tokens), ``chunk_positions`` at a time."""
        long_pos = torch.as_tensor(np.asarray(pair.long_positions) + pair.offset)
        short_pos = torch.as_tensor(np.asarray(pair.short_positions) + pair.offset)
        nexts = None if pair.next_tokens is None else torch.as_tensor(np.asarray(pair.next_tokens))
        parts: dict[str, list[torch.Tensor]] = {name: [] for name in METRIC_NAMES}
        for rows, logp in self.head.chunks(h_long[long_pos], pair.label, long_pos):
            logq = self.head.log_softmax(h_short[short_pos[rows]], pair.label, short_pos[rows])
            for name, value in position_values(logp, logq, None if nexts is None else nexts[rows]).items():
                parts.setdefault(name, []).append(value.double().cpu())
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
