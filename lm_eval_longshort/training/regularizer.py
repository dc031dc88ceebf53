"""The paper's training regularizer: language-modeling loss + alpha · misalignment.

Du, Huang, Wang & Wang (ICML 2025) fine-tune with ``L_LM + alpha · L_misalign``. The
misalignment term here is *the same quantity* the ``dense`` mode of our misalignment tasks
measures (docs/metrics.md, "dense"), computed by the same divergence functions
(:mod:`lm_eval_longshort.numerics.divergences`):

* a window of ``L + e`` document tokens, gap ``e`` drawn from the gap range
  (default ``[1, min(L//2, L - ceil(min_ratio·L))]``, the task's draw rule);
* input A = its first L tokens, input B = its last L tokens;
* at every position t of A with ``t >= e`` and short context ``t+1-e >= ceil(min_ratio·L)``,
  compare A's next-token distribution after ``ids[t]`` with B's after the same token;
* the term is the mean divergence (``sce``, the paper's, or ``symkl``) over those positions.

The LM loss is the model's own causal LM loss on input A (``model(A, labels=A).loss``), so
alpha = 0 is exactly plain fine-tuning on L-token windows. Gradients of the term flow through
both inputs (``detach`` can cut one side, e.g. to treat the long context as a fixed teacher).

Public pieces: :class:`RegularizerConfig` (validated settings), :func:`regularized_loss` (one
batch -> :class:`LossTerms`), :class:`MisalignmentTrainer` (a ``transformers.Trainer`` that
trains on the weighted sum and logs both terms), :func:`check_model`, :func:`check_windows`.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import Trainer

from lm_eval_longshort.numerics import catalogue, divergences
from lm_eval_longshort.protocols.misalignment import dense_positions as mis_dense_positions
from lm_eval_longshort.protocols.misalignment import max_gap
from lm_eval_longshort.protocols.requests import with_bos as _with_bos
from lm_eval_longshort.protocols.settings import MisalignSettings

# The divergences the term may use: the very functions the misalignment tasks report.
DIVERGENCES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    name: getattr(divergences, name) for name in catalogue.names("misalign", regularizer=True)
}
DETACH_SIDES = (None, "long", "short")


def _settings(length: int, min_ratio: float) -> MisalignSettings:
    return MisalignSettings(lengths=(length,), mode="dense", min_ratio=min_ratio)


def min_short(length: int, min_ratio: float) -> int:
    """ceil(min_ratio · L): the shortest context B may have at a compared position (the task's rule)."""
    return _settings(length, min_ratio).min_short(length)


def default_gap_range(length: int, min_ratio: float) -> tuple[int, int]:
    """[1, min(L//2, L - ceil(min_ratio·L))]: the dense task's gap draw (its ``max_gap``), always leaving a position."""
    return 1, max_gap(_settings(length, min_ratio), length)


def dense_positions(length: int, gap: int, min_ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions in A, positions in B) compared for gap e; both [k] int64, B's = A's - e.

    The task's own selection (``protocols.misalignment.dense_positions``): t >= e and t + 1 - e >= ceil(min_ratio·L).
    Both are contiguous runs: A's end at L - 1, B's at L - 1 - e.
    """
    t = torch.from_numpy(mis_dense_positions(_settings(length, min_ratio), length, gap))
    return t, t - gap


@dataclass(frozen=True)
class RegularizerConfig:
    """Settings of the regularized loss; every value is checked when the config is made.

    ``gap_range`` is inclusive; ``None`` means the dense task's rule (see ``default_gap_range``).
    """

    length: int
    """L: tokens per input (A and B)."""
    alpha: float = 0.1
    """Weight of the misalignment term (the paper: 0.1-0.3 helps, larger over-regularises)."""
    gap_range: tuple[int, int] | None = None
    """Inclusive [low, high] for the gap e; one gap is drawn per batch."""
    min_ratio: float = 0.5
    """B's context at a compared position is at least ceil(min_ratio · L) tokens."""
    divergence: str = "sce"
    """``sce`` (symmetric cross-entropy, the paper's) or ``symkl``."""
    bos_token_id: int | None = None
    """Prepended to A and B when set (never a target, never counted in L), as the tasks' add_bos does."""

    def __post_init__(self) -> None:
        if isinstance(self.length, bool) or not isinstance(self.length, int) or self.length < 2:
            raise ValueError(f"length={self.length!r} must be an integer >= 2 (tokens per input)")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha)) or self.alpha < 0:
            raise ValueError(f"alpha={self.alpha!r} must be a finite number >= 0 (0 = plain LM fine-tuning)")
        if not 0.0 < self.min_ratio < 1.0:
            raise ValueError(f"min_ratio={self.min_ratio!r} must lie strictly between 0 and 1")
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"divergence={self.divergence!r} must be one of {sorted(DIVERGENCES)}")
        low, high = self.gaps
        largest = self.length - min_short(self.length, self.min_ratio)
        if not 1 <= low <= high:
            raise ValueError(f"gap_range={self.gap_range!r} must be [low, high] with 1 <= low <= high")
        if high > largest:
            raise ValueError(
                f"gap_range={self.gap_range!r}: a gap above {largest} leaves no shared position with short "
                f"context >= ceil({self.min_ratio}·{self.length}) = {min_short(self.length, self.min_ratio)}; "
                f"use a high gap <= {largest} or lower min_ratio"
            )

    @property
    def gaps(self) -> tuple[int, int]:
        """The inclusive gap range in use."""
        if self.gap_range is None:
            return default_gap_range(self.length, self.min_ratio)
        low, high = self.gap_range
        return int(low), int(high)

    @property
    def window_tokens(self) -> int:
        """Tokens every training window needs: L + the largest gap."""
        return self.length + self.gaps[1]

    def draw_gap(self, generator: torch.Generator | None = None) -> int:
        """One gap, uniform over the inclusive range."""
        low, high = self.gaps
        return int(torch.randint(low, high + 1, (1,), generator=generator))


@dataclass(frozen=True)
class LossTerms:
    """One batch's loss: ``total = lm_loss + alpha · misalign`` (scalars; ``total`` carries the gradient)."""

    lm_loss: torch.Tensor
    misalign: torch.Tensor
    total: torch.Tensor
    gap: int
    n_positions: int  # compared positions per window


def check_model(model: torch.nn.Module) -> None:
    """Raise unless ``model`` is a causal LM with a vocabulary head (a ``*ForCausalLM``)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    base = getattr(model, "base_model", None)  # peft wrappers: look at the wrapped model too
    names = {type(model).__name__, type(getattr(base, "model", base)).__name__}
    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    has_head = callable(getattr(model, "get_output_embeddings", None)) and model.get_output_embeddings() is not None
    if not (names & causal or any(n.endswith(("ForCausalLM", "LMHeadModel")) for n in names)) or not has_head:
        raise TypeError(
            f"{type(model).__name__} is not a causal language model with a vocabulary head; the misalignment "
            "term needs next-token logits: load it with AutoModelForCausalLM (a *ForCausalLM class)"
        )


def check_windows(n_tokens: int, config: RegularizerConfig, gap: int | None = None) -> None:
    """Raise unless windows of ``n_tokens`` tokens hold L + (gap or the largest gap) tokens."""
    need = config.length + (config.gaps[1] if gap is None else gap)
    if n_tokens < need:
        what = f"gap {gap}" if gap is not None else f"the largest gap {config.gaps[1]} of gap_range {config.gaps}"
        raise ValueError(
            f"training windows have {n_tokens} tokens, but L + {what} needs {need}: make windows of "
            f"{need} tokens (RegularizerConfig.window_tokens) or lower length / the gap range"
        )


def _accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def _short_logits(model: torch.nn.Module, b_in: torch.Tensor, first: int, k: int) -> torch.Tensor:
    """[B, k, V] logits at input positions first .. first+k-1 of B, without the full-width head when possible."""
    keep = b_in.shape[1] - first  # the head runs on positions first .. end only
    if _accepts_logits_to_keep(model):
        return model(input_ids=b_in, logits_to_keep=keep).logits[:, -keep:][:, :k]
    return model(input_ids=b_in).logits[:, first : first + k]


def _validate_batch(windows: torch.Tensor, config: RegularizerConfig, gap: int | None) -> None:
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.dtype.is_floating_point:
        raise ValueError(
            f"windows must be an integer token tensor [batch, tokens], got "
            f"{getattr(windows, 'shape', type(windows))} {getattr(windows, 'dtype', '')}"
        )
    if gap is not None:
        largest = config.length - min_short(config.length, config.min_ratio)
        if not 1 <= gap <= largest:
            raise ValueError(
                f"gap={gap} must lie in [1, {largest}] for L={config.length} and "
                f"min_ratio={config.min_ratio}, else no position is shared"
            )
    check_windows(windows.shape[1], config, gap)


def regularized_loss(
    model: torch.nn.Module,
    windows: torch.Tensor,
    config: RegularizerConfig,
    *,
    gap: int | None = None,
    generator: torch.Generator | None = None,
    detach: str | None = None,
) -> LossTerms:
    """LM loss, misalignment term and their weighted sum for one batch of token windows.

    ``windows``: [B, T] document token ids without BOS, T >= L + gap (T >= L + max gap when
    ``gap`` is drawn here from ``config.gaps`` with ``generator``). ``detach``: ``"long"`` or
    ``"short"`` stops the term's gradient through A or B (``None``: both, the paper's form).
    With alpha = 0 the term is still computed for logging, without a graph, and ``total`` is
    exactly the LM loss.
    """
    check_model(model)
    if detach not in DETACH_SIDES:
        raise ValueError(f"detach={detach!r} must be one of {DETACH_SIDES}")
    _validate_batch(windows, config, gap)
    gap = config.draw_gap(generator) if gap is None else int(gap)
    L, bos = config.length, config.bos_token_id
    offset = 0 if bos is None else 1
    a_in = _with_bos(windows[:, :L], bos)  # [B, L(+1)]
    b_in = _with_bos(windows[:, gap : gap + L], bos)  # [B, L(+1)]
    long_pos, short_pos = dense_positions(L, gap, config.min_ratio)  # [k] into A's / B's tokens
    k, b_first = long_pos.numel(), int(short_pos[0]) + offset

    out_a = model(input_ids=a_in, labels=a_in)  # HF shifts labels: A's own next-token loss
    grad_term = config.alpha > 0
    with torch.set_grad_enabled(grad_term and torch.is_grad_enabled()):
        logits_a = out_a.logits[:, long_pos.to(a_in.device) + offset]  # [B, k, V]
        if not grad_term or detach == "long":
            logits_a = logits_a.detach()
        if not grad_term or detach == "short":
            with torch.no_grad():
                logits_b = _short_logits(model, b_in, b_first, k)  # [B, k, V]
        else:
            logits_b = _short_logits(model, b_in, b_first, k)
        logp = torch.log_softmax(logits_a.float(), dim=-1)
        logq = torch.log_softmax(logits_b.float(), dim=-1)
        misalign = DIVERGENCES[config.divergence](logp, logq).mean()  # mean over windows and positions
    total = out_a.loss + config.alpha * misalign if grad_term else out_a.loss
    return LossTerms(lm_loss=out_a.loss, misalign=misalign, total=total, gap=gap, n_positions=k)


class MisalignmentTrainer(Trainer):
    """``transformers.Trainer`` that minimises ``lm_loss + alpha · misalign`` and logs both terms.

    Drop-in: pass ``regularizer=RegularizerConfig(...)`` next to the usual arguments; the
    training set yields ``{"input_ids": [T]}`` windows with T >= ``regularizer.window_tokens``
    (no padding). Gaps come from a generator seeded with ``args.seed``, so two runs with the
    same seed see the same gaps whatever alpha is. The logs gain ``lm_loss``, ``misalign``
    (means over the steps since the last log) and ``gap``.
    """

    def __init__(self, *args, regularizer: RegularizerConfig, **kwargs) -> None:
        if not isinstance(regularizer, RegularizerConfig):
            raise TypeError("regularizer must be a RegularizerConfig")
        check_model(kwargs["model"] if "model" in kwargs else args[0])  # before the Trainer sets anything up
        super().__init__(*args, **kwargs)
        self.regularizer = regularizer
        self.loss_is_scaled_for_ga = False  # our loss is a per-batch mean
        self._gaps = torch.Generator().manual_seed(self.args.seed)
        self._sums = {"lm_loss": 0.0, "misalign": 0.0, "gap": 0.0}
        self._count = 0

    def train(self, *args, **kwargs):
        """Check the first training window's length before any step runs."""
        dataset = self.train_dataset
        if dataset is not None and hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__") and len(dataset):
            first = dataset[0]["input_ids"]
            check_windows(len(first), self.regularizer)
        return super().train(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The regularized loss of one batch (``num_items_in_batch`` unused: windows have no padding)."""
        mask = inputs.get("attention_mask")
        if mask is not None and not bool(mask.all()):
            raise ValueError("training windows must be unpadded runs of document tokens (attention_mask has zeros)")
        terms = regularized_loss(model, inputs["input_ids"], self.regularizer, generator=self._gaps)
        if model.training:
            self._sums["lm_loss"] += float(terms.lm_loss.detach())
            self._sums["misalign"] += float(terms.misalign.detach())
            self._sums["gap"] += terms.gap
            self._count += 1
        if return_outputs:
            return terms.total, {"lm_loss": terms.lm_loss.detach(), "misalign": terms.misalign.detach()}
        return terms.total

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the mean LM loss, misalignment term and gap since the last training log."""
        if self._count and "loss" in logs:
            logs.update({name: total / self._count for name, total in self._sums.items()})
            self._sums = dict.fromkeys(self._sums, 0.0)
            self._count = 0
        super().log(logs, start_time)
