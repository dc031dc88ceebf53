"""What both vLLM routes share: the engine base (the ``vllm.LLM``, its lengths, RoPE facts and
identity), the checkpoint folder, and how token sequences become ``TokensPrompt`` calls in chunks.

Every request of a call becomes a ``TokensPrompt``; prompts go to ``LLM.generate`` /
``LLM.encode`` in large chunks (one call per chunk, bounded by a token budget) so vLLM
batches and schedules them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import numpy as np
from more_itertools import constrained_batches
from vllm import TokensPrompt

from lm_eval_longshort.backends.fingerprint import vllm_identity
from lm_eval_longshort.backends.hf import LENGTH_DEPENDENT_ROPE, rope_type
from lm_eval_longshort.protocols.requests import ScoringEngine


class VLLMBase(ScoringEngine):
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
            self._identity = vllm_identity(self.model_config, checkpoint_folder(self.model_config))
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


def tokens_prompts(sequences: Sequence[np.ndarray]) -> list[TokensPrompt]:
    """One ``TokensPrompt`` per token sequence (vLLM takes lists of Python ints)."""
    return [TokensPrompt(prompt_token_ids=np.asarray(s).tolist()) for s in sequences]


def chunks(sizes: Sequence[int], budget: int, max_items: int | None = None) -> Iterator[tuple[int, ...]]:
    """Consecutive index groups whose sizes sum to at most ``budget`` (an oversized item goes
    alone) and of at most ``max_items`` indices: one vLLM call each."""
    return constrained_batches(range(len(sizes)), budget, max_count=max_items, get_len=sizes.__getitem__, strict=False)


def checkpoint_folder(model_config) -> str:
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
