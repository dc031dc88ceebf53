"""What a scoring backend is asked to do, and the interface every backend implements.

The protocols make these requests and the runner hands them to an engine, so they live here,
below the backends: ``backends/`` implements ``ScoringEngine`` and imports this module, never
the other way round.

Requests hold document token ids WITHOUT the BOS token; ``bos`` says which id (if
any) the backend must prepend. A prepended BOS is never a scored target and never
counts as context (docs/metrics.md).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

T = TypeVar("T")
R = TypeVar("R")


class NonFiniteLogitsError(RuntimeError):
    """The model produced NaN/inf logits: a number computed from them would be meaningless."""


class LengthLimitError(ValueError):
    """A request is longer than the backend was started for."""


def with_bos(tokens, bos: int | None):
    """``tokens`` [..., n] with ``bos`` in front along the last axis: [..., n + 1] (unchanged
    when ``bos`` is None). numpy in, int64 numpy out; a torch tensor stays on its device."""
    if isinstance(tokens, torch.Tensor):
        return tokens if bos is None else torch.cat([tokens.new_full((*tokens.shape[:-1], 1), bos), tokens], dim=-1)
    tokens = np.asarray(tokens, dtype=np.int64)
    if bos is None:
        return tokens
    return np.concatenate([np.full((*tokens.shape[:-1], 1), bos, dtype=np.int64), tokens], axis=-1)


class _Request:
    """What every request shares: document ids and the BOS id (or None) the backend puts first."""

    bos: int | None
    label: str  # where the request comes from, for error messages

    @property
    def offset(self) -> int:
        """Where document token 0 sits in the model's input: 1 after a BOS, else 0."""
        return 0 if self.bos is None else 1

    def sequences(self) -> list[np.ndarray]:
        """The token sequences of this request, BOS first (``ScoringEngine.prepare``)."""
        raise NotImplementedError


@dataclass(frozen=True)
class TargetWindow(_Request):
    """Score ``tokens[score_from:]``, each token given every earlier token of the window.

    The model is fed ``tokens[:-1]`` (the last token is only a target) unless ``feed_last``:
    protocols defined as "the model reads ids[0:L]" feed all L tokens, which matters for
    models whose positions depend on the sequence length.
    """

    tokens: np.ndarray  # [n] int64 document ids
    score_from: int  # first scored index (>= 1, or 0 when a BOS is prepended)
    bos: int | None
    label: str  # where the window comes from, for error messages
    feed_last: bool = False

    def __post_init__(self) -> None:
        first = 0 if self.bos is not None else 1
        if not first <= self.score_from <= len(self.tokens):
            raise ValueError(f"{self.label}: score_from={self.score_from} outside [{first}, {len(self.tokens)}]")

    @property
    def n_inputs(self) -> int:
        """Tokens fed to the model (BOS included)."""
        return len(self.tokens) - (0 if self.feed_last else 1) + self.offset

    @property
    def first_target(self) -> int:
        """Index of the first scored token in the sequence with the BOS (predicted by the one before it)."""
        return self.score_from + self.offset

    def sequences(self) -> list[np.ndarray]:
        """[the window with the BOS]: the targets are read from it, ``fed`` is what the model reads."""
        return [with_bos(self.tokens, self.bos)]

    def fed(self, sequence: np.ndarray) -> np.ndarray:
        """The model's input from ``sequence`` (this window with the BOS): without the last token,
        which is only a target, unless ``feed_last``."""
        return sequence if self.feed_last else sequence[:-1]


@dataclass(frozen=True)
class Prompt(_Request):
    """Ask for the full next-token distribution after the last token."""

    tokens: np.ndarray  # [n] int64
    bos: int | None
    label: str

    @property
    def n_inputs(self) -> int:
        return len(self.tokens) + self.offset

    def sequences(self) -> list[np.ndarray]:
        return [with_bos(self.tokens, self.bos)]


@dataclass(frozen=True)
class AlignedWindows(_Request):
    """Two windows whose positions are compared one to one (misalignment ``dense`` mode).

    Position ``long_positions[i]`` of ``long_tokens`` and ``short_positions[i]`` of
    ``short_tokens`` end at the same document token; the distributions after them are compared.
    ``next_tokens[i]``, when given, is the document token that follows it (``dp`` reads its
    probability under both contexts).
    """

    long_tokens: np.ndarray  # [L]
    short_tokens: np.ndarray  # [L]
    long_positions: np.ndarray  # [k] indices into long_tokens
    short_positions: np.ndarray  # [k] indices into short_tokens
    bos: int | None
    label: str
    next_tokens: np.ndarray | None = None  # [k] the token after each compared position

    @property
    def n_inputs(self) -> int:
        return max(len(self.long_tokens), len(self.short_tokens)) + self.offset

    def sequences(self) -> list[np.ndarray]:
        """[long window, short window], each with the BOS."""
        return [with_bos(self.long_tokens, self.bos), with_bos(self.short_tokens, self.bos)]


Request = TargetWindow | Prompt | AlignedWindows


class ScoringEngine(abc.ABC):
    """A model that scores token windows exactly. Implementations: ``hf``, ``vllm``."""

    name: str = "base"
    # Most input tokens per forward batch / engine call. Each request method also takes
    # ``batch_tokens=`` for that call alone (a task's own budget; None: this default).
    batch_tokens: int = 32768

    @property
    @abc.abstractmethod
    def max_length(self) -> int:
        """Most input tokens (BOS included) one sequence may have."""

    @property
    @abc.abstractmethod
    def tokenizer(self):
        """The model's Hugging Face tokenizer."""

    @property
    def position_dependent(self) -> bool:
        """True when a token's logits depend on the total sequence length (e.g. dynamic RoPE)."""
        return False

    @property
    def length_hint(self) -> str:
        """How a user raises ``max_length`` on this backend (for error messages)."""
        return "raise the backend's max_length"

    @abc.abstractmethod
    def identity(self) -> dict:
        """What the scores depend on besides the requests: ``{"model", "dtype", "config",
        "weights", ...}`` JSON values, ``weights`` a digest of every weight byte (the resume
        cache's key and the results JSON's engine record are built from it)."""

    @abc.abstractmethod
    def target_nll(self, windows: Sequence[TargetWindow], *, batch_tokens: int | None = None) -> list[np.ndarray]:
        """Per window, float64 NLL of each scored token, in order."""

    @abc.abstractmethod
    def last_logprobs(self, prompts: Sequence[Prompt], *, batch_tokens: int | None = None) -> torch.Tensor:
        """[n, V] float32 log-softmax of the next-token logits after each prompt."""

    @abc.abstractmethod
    def aligned_divergences(
        self, pairs: Sequence[AlignedWindows], topk: int = 256, *, batch_tokens: int | None = None
    ) -> list[dict[str, np.ndarray]]:
        """Per pair, {metric: float64 [k]} divergences between the compared positions, and the
        next-token metrics (``dp``) when the pair carries ``next_tokens``.

        ``topk``: the list size of backends that approximate from top-K lists (vllm; exact
        backends ignore it). Approximate backends add per-position error bounds
        (``tv_err_bound``, ``js_err_bound``) to each dict.
        """

    @property
    def approximate_dense(self) -> bool:
        """True when ``aligned_divergences`` is an approximation (reported as the ``approximate`` metric)."""
        return False

    def map_chunks(
        self, score: Callable[[ScoringEngine, T], R], chunks: Sequence[T], costs: Sequence[int]
    ) -> Iterator[tuple[int, R]]:
        """``(k, score(engine, chunks[k]))`` for every chunk, in the order they finish.

        Here one after another on this engine. A data-parallel engine (``backends/vllm_parallel.py``)
        runs them on its replicas at once, each ``score(replica's engine, chunk)``, balanced by
        ``costs`` (input tokens per chunk); ``score`` is then a module-level function, pickled.
        """
        for k, chunk in enumerate(chunks):
            yield k, score(self, chunk)

    def prepare(self, requests: Sequence[Request]) -> list[np.ndarray]:
        """Every request's token sequences with the BOS first, in order (an ``AlignedWindows``
        gives two: long, short), after checking that each request fits ``max_length``.

        The one place a backend applies the BOS and checks lengths: every request method starts here.
        """
        for request in requests:
            self.check_lengths(request.n_inputs, request.label)
        return [sequence for request in requests for sequence in request.sequences()]

    def check_lengths(self, n_inputs: int, what: str) -> None:
        if n_inputs > self.max_length:
            raise LengthLimitError(
                f"{what} needs {n_inputs} input tokens per sequence, but the {self.name} backend was "
                f"started with max_length={self.max_length}; {self.length_hint} (at least {n_inputs})"
            )
