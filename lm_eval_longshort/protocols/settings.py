"""Task settings parsed from lm-eval metadata (YAML defaults merged with ``--metadata``).

Two dataclasses, one per task family, each field documented with its default.
``parse_settings`` validates every value and names the bad one; it knows nothing of
lm-eval beyond the shape of the metadata dict.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

PPL_PROTOCOLS = ("ladder", "truncate", "sliding")
# Loss-against-position bins per doubling of the position when metadata gives none: 4 bins per
# octave resolve the curve around a trained context without bins of a handful of tokens past 64.
POSITION_BINS_PER_DOUBLING = 4
MISALIGN_MODES = ("last", "dense")


def _setting(default, *, minimum: int | None = None, choices: tuple[str, ...] | None = None):
    """A dataclass field whose parsing constraints travel with it (read by ``parse_settings``)."""
    return dataclasses.field(default=default, metadata={"minimum": minimum, "choices": choices})


@dataclass(frozen=True)
class PerplexitySettings:
    """How a ``longshort_ppl_*`` task scores documents (docs/metrics.md, "Long-context perplexity")."""

    lengths: tuple[int, ...] = _setting((1024, 2048, 4096, 8192), minimum=2)
    """Context lengths L to evaluate, in document tokens (BOS never counts)."""
    protocol: str = _setting("ladder", choices=PPL_PROTOCOLS)
    """``ladder`` (fixed targets, growing context), ``truncate`` (YaRN/LongRoPE), ``sliding`` (strided)."""
    target_tokens: int = _setting(256, minimum=1)
    """ladder: W, the number of fixed target tokens after the longest context."""
    stride: int | None = _setting(None, minimum=1)
    """sliding: window stride S; default L // 2."""
    max_doc_tokens: int | None = _setting(None, minimum=1)
    """sliding: score at most this many tokens of each document; default 4 · max(lengths)."""
    single_pass: bool | None = _setting(None)
    """truncate: one pass for all lengths; None (``auto``): yes unless positions depend on sequence length."""
    bins_per_doubling: int | None = _setting(None, minimum=1)
    """truncate: loss-against-position bins per doubling of the position; None: ``POSITION_BINS_PER_DOUBLING``."""
    alpha: float = _setting(2.0)
    """ladder key tokens: nll_short - nll_long must exceed alpha."""
    beta: float = _setting(-2.0)
    """ladder key tokens: -nll_long must exceed beta (the long-context prediction is confident)."""
    add_bos: bool | None = _setting(None)
    """Prepend BOS to every window: None (``auto``) iff the tokenizer does so for plain text."""
    batch_tokens: int | None = _setting(None, minimum=1)
    """Most tokens per forward batch / generate call; default: the backend's (hf 32768, vllm 262144)."""

    kind = "ppl"

    def __post_init__(self) -> None:
        _normalize(self)

    @property
    def variant(self) -> str:
        """The protocol: which way of scoring within the family (the protocol registry's key)."""
        return self.protocol

    @property
    def longest(self) -> int:
        """C = max(lengths)."""
        return max(self.lengths)

    @property
    def position_bins(self) -> int:
        """Loss-against-position bins per doubling of the position (``bins_per_doubling`` or its default)."""
        return self.bins_per_doubling or POSITION_BINS_PER_DOUBLING

    def stride_for(self, length: int) -> int:
        return self.stride if self.stride is not None else max(1, length // 2)

    def doc_tokens_cap(self) -> int:
        return self.max_doc_tokens if self.max_doc_tokens is not None else 4 * self.longest


@dataclass(frozen=True)
class MisalignSettings:
    """How a ``longshort_misalign_*`` task pairs long and short inputs (docs/metrics.md, "Long-Short Misalignment")."""

    lengths: tuple[int, ...] = _setting((1024, 2048, 4096, 8192), minimum=2)
    """Long context lengths L."""
    mode: str = _setting("last", choices=MISALIGN_MODES)
    """``last`` (suffix pairs ending at the same token) or ``dense`` (overlapping windows)."""
    pairs: int = _setting(4, minimum=1)
    """last: short lengths drawn per document and L (distinct)."""
    min_ratio: float = _setting(0.5)
    """Short context is at least ceil(min_ratio · L) tokens."""
    seed: int = _setting(1234, minimum=0)
    """Seeds numpy.random.default_rng([seed, doc_index, L])."""
    add_bos: bool | None = _setting(None)
    """As for perplexity."""
    batch_tokens: int | None = _setting(None, minimum=1)
    """As for perplexity."""
    topk: int = _setting(256, minimum=1)
    """vllm dense mode only: the top-K approximation's K (results are labelled approximate)."""

    kind = "misalign"

    def __post_init__(self) -> None:
        _normalize(self)

    @property
    def variant(self) -> str:
        """The mode: which pairing within the family (the protocol registry's key)."""
        return self.mode

    @property
    def longest(self) -> int:
        """C = max(lengths)."""
        return max(self.lengths)

    def min_short(self, length: int) -> int:
        return math.ceil(self.min_ratio * length)


_CLASSES = {"ppl": PerplexitySettings, "misalign": MisalignSettings}

# Keys lm-eval itself puts into task metadata.
HARNESS_KEYS = frozenset({"version", "config_source", "_metadata", "num_fewshot"})


def setting_keys(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def _as_int(key: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"metadata {key}={value!r} must be an integer")
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"metadata {key}={value!r} must be an integer") from None
    if number != float(value) or number < minimum:
        raise ValueError(f"metadata {key}={value!r} must be an integer >= {minimum}")
    return number


def _as_float(key: str, value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(f"metadata {key}={value!r} must be a number")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"metadata {key}={value!r} must be a number") from None
    if not math.isfinite(number):
        raise ValueError(f"metadata {key}={value!r} must be finite")
    return number


def _as_lengths(key: str, value: Any, minimum: int) -> tuple[int, ...]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            value = [v for v in value.replace(",", " ").split() if v]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"metadata {key}={value!r} must be a non-empty list of integers, e.g. [1024, 4096]")
    return tuple(sorted({_as_int(key, v, minimum) for v in value}))


# The words a yes/no/auto setting accepts (None = auto).
_TRISTATE = {"auto": None, "none": None, "true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _as_tristate(key: str, value: Any) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    word = str(value).strip().lower()
    if word not in _TRISTATE:
        raise ValueError(f"metadata {key}={value!r} must be true, false or 'auto'")
    return _TRISTATE[word]


def _as_choice(key: str, value: Any, choices: tuple[str, ...]) -> str:
    if str(value) not in choices:
        raise ValueError(f"metadata {key}={value!r} must be one of {choices}")
    return str(value)


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _parse_field(cls: type, field: dataclasses.Field, value: Any) -> Any:
    """One metadata value, parsed by its field's declared type and constraints."""
    kind = _field_types(cls)[field.name]
    minimum, choices = field.metadata.get("minimum"), field.metadata.get("choices")
    optional = kind in (int | None, bool | None)
    if value is None and optional:
        return None
    if kind == tuple[int, ...]:
        return _as_lengths(field.name, value, minimum)
    if kind in (int, int | None):
        return _as_int(field.name, value, minimum if minimum is not None else 0)
    if kind is float:
        return _as_float(field.name, value)
    if kind == bool | None:
        return _as_tristate(field.name, value)
    if kind is str and choices:
        return _as_choice(field.name, value, choices)
    raise TypeError(f"{cls.__name__}.{field.name}: no parser for type {kind}")


def parse_settings(
    kind: str,
    metadata: dict[str, Any],
    *,
    foreign_keys: frozenset[str] | set[str] = frozenset(),
    other_keys: dict[str, Sequence[str]] | None = None,
) -> PerplexitySettings | MisalignSettings:
    """Build the settings of a task family from its metadata.

    ``foreign_keys`` are keys that belong to someone else (model arguments that lm-eval
    merges into task metadata) and are ignored. ``other_keys`` names further groups of keys
    that are valid in metadata but read elsewhere (e.g. ``{"data keys": DATASET_KEYS}``): they
    are ignored here and listed in the error for an unknown key, which names every known key
    (both task families' and those groups), so a typo never silently falls back to a default.
    """
    cls = _CLASSES[kind]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    known = {
        "perplexity tasks": setting_keys(PerplexitySettings),
        "misalignment tasks": setting_keys(MisalignSettings),
        **(other_keys or {}),
    }
    recognised = {key for keys in known.values() for key in keys}
    values: dict[str, Any] = {}
    unknown = []
    for key, value in metadata.items():
        if key in fields:
            if value is not None or _field_types(cls)[key] in (int | None, bool | None):
                values[key] = value  # None for a required setting means "the default"
        elif key in HARNESS_KEYS or key in foreign_keys or key in recognised:
            # A group run passes one --metadata to perplexity and misalignment tasks alike.
            continue
        else:
            unknown.append(key)
    if unknown:
        listing = "; ".join(f"{what}: {sorted(keys)}" for what, keys in known.items())
        raise ValueError(
            f"unknown metadata key(s) {sorted(unknown)} for longshort {kind} tasks; known keys are "
            f"{listing} (fix the spelling or drop the key)"
        )
    return cls(**values)


def _normalize(settings: PerplexitySettings | MisalignSettings) -> None:
    """Parse every field by its type (every way in: metadata, JSON, the constructor), then check."""
    cls = type(settings)
    for field in dataclasses.fields(cls):
        object.__setattr__(settings, field.name, _parse_field(cls, field, getattr(settings, field.name)))
    _check(settings)


def _check(settings: PerplexitySettings | MisalignSettings) -> None:
    """Constraints between settings."""
    if isinstance(settings, PerplexitySettings):
        if settings.bins_per_doubling is not None and settings.protocol != "truncate":
            raise ValueError(
                f"metadata bins_per_doubling={settings.bins_per_doubling} asks for loss against position, which "
                f"only protocol truncate measures (one pass over ids[0:C] scores every position), not "
                f"{settings.protocol}; use protocol=truncate or drop bins_per_doubling"
            )
        if settings.protocol == "sliding":
            for length in settings.lengths:
                if settings.stride_for(length) > length:
                    raise ValueError(
                        f"metadata stride={settings.stride} exceeds window length {length}: "
                        "tokens between windows would never be scored; use stride <= min(lengths)"
                    )
            if settings.doc_tokens_cap() < settings.longest:
                raise ValueError(
                    f"metadata max_doc_tokens={settings.max_doc_tokens} is below max(lengths)="
                    f"{settings.longest}; raise it or drop the longest length"
                )
        return
    if not 0.0 < settings.min_ratio < 1.0:
        raise ValueError(f"metadata min_ratio={settings.min_ratio!r} must lie strictly between 0 and 1")
    for length in settings.lengths:
        low = settings.min_short(length)
        available = length - low
        if settings.mode == "last" and settings.pairs > available:
            raise ValueError(
                f"metadata pairs={settings.pairs} exceeds the {available} distinct short lengths in "
                f"[{low}, {length - 1}] for L={length}; lower pairs or min_ratio, or raise L"
            )
        if settings.mode == "dense" and min(length // 2, available) < 1:
            raise ValueError(
                f"metadata min_ratio={settings.min_ratio} with L={length} leaves no dense gap: the short "
                f"context must be >= {low} of {length} tokens; lower min_ratio or raise L"
            )


# Settings read by one protocol or mode only; the others ignore them.
_ONLY_FOR = {
    "target_tokens": "ladder",
    "alpha": "ladder",
    "beta": "ladder",
    "stride": "sliding",
    "max_doc_tokens": "sliding",
    "single_pass": "truncate",
    "bins_per_doubling": "truncate",
    "pairs": "last",
    "topk": "dense",
}


def measured_settings(settings: PerplexitySettings | MisalignSettings) -> dict:
    """The settings that decide what a task measures: those its protocol or mode reads, without
    the batch budget (which changes speed, not numbers). Two results are comparable only when
    these are equal (plus the same documents)."""
    values = dataclasses.asdict(settings)
    variant = settings.variant
    values = {k: v for k, v in values.items() if k != "batch_tokens" and _ONLY_FOR.get(k, variant) == variant}
    values["lengths"] = list(values["lengths"])
    if "bins_per_doubling" in values:  # the default and the same number given explicitly measure alike
        values["bins_per_doubling"] = settings.position_bins
    return {"kind": settings.kind, **values}


def settings_to_json(settings: PerplexitySettings | MisalignSettings) -> str:
    """Stable JSON (the request argument lm-eval hashes and logs)."""
    payload = {"kind": settings.kind, **dataclasses.asdict(settings)}
    return json.dumps(payload, sort_keys=True)


def settings_from_json(text: str) -> PerplexitySettings | MisalignSettings:
    """The settings ``settings_to_json`` wrote, parsed and checked again."""
    payload = json.loads(text)
    return _CLASSES[payload.pop("kind")](**payload)


__all__ = [
    "measured_settings",
    "MisalignSettings",
    "PerplexitySettings",
    "parse_settings",
    "settings_from_json",
    "settings_to_json",
]
