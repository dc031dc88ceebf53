"""The metric catalogue: every metric the tasks report, listed once (docs/metrics.md).

Each entry says what a metric is (which task kind reports it, per length or not, how its
pooled ratio R = Σa/Σb becomes the reported value), how to show it (title, axis label) and
where it appears by default. Everything else derives from here: the tasks' aggregations and
``higher_is_better``, the divergence names the backends compute, and the columns, tables,
plots, correlations and CSV of ``report``, ``compare`` and the sweep report.

A new divergence is one entry here (kind ``misalign``, per length, transform ``identity``)
plus its kernel, a function of the same name in ``numerics/divergences.py``. Metric keys are
built and parsed only by :func:`key` and :func:`parse_key`. No torch, no lm-eval: importable
anywhere.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass

KINDS = ("ppl", "misalign")
TRANSFORMS = ("identity", "exp", "bits")  # numerics/aggregate.py: R, exp(R), R / ln 2
POOLS = ("ratio", "max", "count", "documents", "quantile", "positions")
STDERR_SUFFIX = "_stderr"


@dataclass(frozen=True)
class Metric:
    """One metric of the catalogue.

    Attributes:
        name: the metric's name; a per-length metric is reported as ``name@L``.
        kind: the task kind that reports it, ``ppl`` or ``misalign``; None: every task.
        per_length: reported once per context length L (else once per task).
        title: the plot title.
        label: the axis label (unit).
        better: ``higher`` or ``lower``; None for counts and flags (no direction).
        pool: how documents combine: ``ratio`` (Σa / Σb, then ``transform``), ``max`` (the
            largest per-document value: of ``of``'s positions, or a flag, 1 if any document has
            it), ``quantile`` (the ``quantile`` of ``of``'s per-position values, read from the
            documents' merged histograms, numerics/histogram.py), ``count`` (a sum of counts),
            ``documents`` (the number scored; the task keeps every document's record) or
            ``positions`` (no lm-eval metric: per-position bins of (Σa, Σb) in each document's
            record, pooled per bin by ``plot --positions`` and the sweep report).
        transform: for ``pool = ratio``, how R becomes the value: ``identity``, ``exp``, ``bits``.
        only: the protocol (ppl) or mode (misalign) values under which the task reports it;
            empty: always.
        table: in the sweep report's per-length tables (and its scalar table).
        plot: a panel of ``plot`` and of the sweep report's length figures.
        correlate: correlated with perplexity in the sweep report (and its precision table);
            also the misalignment columns of the finetune report.
        regularizer: a divergence the training regularizer may use (``--divergence``).
        of: for pool ``quantile`` or ``max``: the per-position metric whose distribution this
            summarises (``symkl``); None: not a distribution summary.
        quantile: for pool ``quantile``: which one (0.5 the median).
        next_token: computed per position from the probability of the actual next token under
            both contexts (``dp``), beside the divergences, not by a kernel of the two
            distributions alone.
    """

    name: str
    kind: str | None
    per_length: bool
    title: str
    label: str
    better: str | None
    pool: str = "ratio"
    transform: str = "identity"
    only: tuple[str, ...] = ()
    table: bool = False
    plot: bool = False
    correlate: bool = False
    regularizer: bool = False
    of: str | None = None
    quantile: float | None = None
    next_token: bool = False

    @property
    def family(self) -> str:
        """``ppl`` or ``misalign`` for a per-length metric, else ``scalar``."""
        return self.kind if self.per_length and self.kind else "scalar"

    @property
    def higher_is_better(self) -> bool:
        """What lm-eval's ``higher_is_better`` says (False for counts and flags)."""
        return self.better == "higher"


_ENTRIES = (
    Metric("ppl", "ppl", True, "Perplexity", "perplexity", "lower", transform="exp", table=True, plot=True),
    Metric("bpb", "ppl", True, "Bits per byte", "bits / byte", "lower", transform="bits", table=True),
    Metric(
        "ppl_pos",
        "ppl",
        True,
        "Perplexity of the positions since the previous length",
        "perplexity",
        "lower",
        transform="exp",
        only=("truncate",),
        table=True,
    ),
    Metric(
        "loss_pos",
        "ppl",
        False,
        "Loss against position",
        "loss (nats / token)",
        "lower",
        pool="positions",
        only=("truncate",),
    ),
    Metric(
        "symkl",
        "misalign",
        True,
        "Symmetric KL (long vs short context)",
        "symKL (nats / token)",
        "lower",
        table=True,
        plot=True,
        correlate=True,
        regularizer=True,
    ),
    Metric(
        "sce",
        "misalign",
        True,
        "Symmetric cross-entropy (long vs short)",
        "SCE (nats / token)",
        "lower",
        table=True,
        plot=True,
        correlate=True,
        regularizer=True,
    ),
    Metric("js", "misalign", True, "Jensen-Shannon divergence", "JS (nats / token)", "lower"),
    Metric("top1", "misalign", True, "Top-1 agreement (long vs short)", "agreement rate", "higher", table=True),
    Metric("tv", "misalign", True, "Total variation distance", "TV distance", "lower"),
    # The distribution of misalignment in dense mode (docs/metrics.md): percentiles of per-position
    # symkl from fixed log-spaced histograms, its exact maximum, and the next token's probability gain.
    *(
        Metric(
            f"symkl_p{round(100 * q)}",
            "misalign",
            True,
            f"{round(100 * q)}th percentile of per-position symKL",
            "symKL (nats)",
            "lower",
            pool="quantile",
            only=("dense",),
            table=q == 0.9,
            of="symkl",
            quantile=q,
        )
        for q in (0.5, 0.9, 0.99)
    ),
    Metric(
        "symkl_max",
        "misalign",
        True,
        "Largest per-position symKL",
        "symKL (nats)",
        "lower",
        pool="max",
        only=("dense",),
        table=True,
        of="symkl",
    ),
    Metric(
        "dp",
        "misalign",
        True,
        "Next-token probability gain (long minus short)",
        "p_long - p_short (next token)",
        "higher",
        only=("dense",),
        table=True,
        next_token=True,
    ),
    Metric("ppl@max", "ppl", False, "Perplexity at the longest length", "perplexity", "lower", transform="exp"),
    Metric(
        "keyppl",
        "ppl",
        False,
        "Perplexity of the key tokens",
        "perplexity",
        "lower",
        transform="exp",
        only=("ladder",),
        table=True,
    ),
    Metric("key_frac", "ppl", False, "Share of key tokens", "fraction", "higher", only=("ladder",), table=True),
    Metric("approximate", "misalign", False, "Approximated (vLLM top-K)", "flag", None, pool="max"),
    Metric("skipped_docs", None, False, "Documents skipped", "documents", None, pool="count"),
    Metric("documents", None, False, "Documents scored", "documents", None, pool="documents"),
)

CATALOGUE: dict[str, Metric] = {}


def register(metric: Metric) -> Metric:
    """Add ``metric`` to the catalogue (an error if its name is taken or a field is unknown)."""
    if metric.name in CATALOGUE:
        raise ValueError(f"metric {metric.name!r} is already in the catalogue")
    problems = [
        f"{field} {value!r} not in {allowed}"
        for field, value, allowed in (
            ("kind", metric.kind, (*KINDS, None)),
            ("pool", metric.pool, POOLS),
            ("transform", metric.transform, TRANSFORMS),
            ("better", metric.better, ("higher", "lower", None)),
        )
        if value not in allowed
    ]
    if metric.of is not None and metric.pool not in ("quantile", "max"):
        problems.append("only a metric pooled by quantile or max summarises another's distribution (of)")
    if (metric.pool == "quantile") != (
        metric.of is not None and metric.quantile is not None and 0 < metric.quantile <= 1
    ):
        problems.append("pool quantile needs of and a quantile in (0, 1], and only it takes a quantile")
    if "@" in metric.name.removesuffix("@max") or metric.name.endswith(STDERR_SUFFIX) or "," in metric.name:
        problems.append("a name may not hold '@', ',' or end in '_stderr' (they delimit keys)")
    if problems:
        raise ValueError(f"metric {metric.name!r}: {'; '.join(problems)}")
    CATALOGUE[metric.name] = metric
    return metric


for _metric in _ENTRIES:
    register(_metric)


def get(name: str) -> Metric | None:
    """The entry of ``name``, or None for a metric the catalogue does not list."""
    return CATALOGUE.get(name)


def metrics(
    kind: str | None = None,
    per_length: bool | None = None,
    table: bool | None = None,
    plot: bool | None = None,
    correlate: bool | None = None,
    regularizer: bool | None = None,
) -> tuple[Metric, ...]:
    """Entries in catalogue order, those matching every filter given (None: any)."""
    wanted = {"per_length": per_length, "table": table, "plot": plot, "correlate": correlate}
    wanted["regularizer"] = regularizer
    return tuple(
        m
        for m in CATALOGUE.values()
        if (kind is None or m.kind == kind) and all(v is None or getattr(m, k) == v for k, v in wanted.items())
    )


def names(kind: str | None = None, per_length: bool | None = True, **flags: bool) -> tuple[str, ...]:
    """Names of :func:`metrics` (per-length ones unless ``per_length`` says otherwise)."""
    return tuple(m.name for m in metrics(kind, per_length, **flags))


def shown(kind: str, reported: Collection[str]) -> tuple[str, ...]:
    """The per-length metric names of ``kind`` a table shows for results reporting ``reported``:
    every one without ``only`` (a missing value is a blank cell), and those that only some
    protocols or modes report when present (no empty ``ppl_pos`` column for a ``ladder`` run)."""
    return tuple(m.name for m in metrics(kind, True) if not m.only or m.name in reported)


def divergences() -> tuple[str, ...]:
    """The misalignment metrics with a divergence kernel each in ``numerics/divergences.py``
    (pooled ratios of two distributions alone: not ``dp``, not the distribution summaries)."""
    return tuple(m.name for m in metrics("misalign", per_length=True) if m.pool == "ratio" and not m.next_token)


def next_token_metrics() -> tuple[str, ...]:
    """Per-position misalignment metrics read from the next token's probabilities (``dp``)."""
    return tuple(m.name for m in metrics("misalign", per_length=True) if m.next_token)


def summarised() -> tuple[str, ...]:
    """The per-position metrics whose distribution is kept (histogram and maximum): ``symkl``."""
    return tuple(dict.fromkeys(m.of for m in CATALOGUE.values() if m.of is not None))


def transform(name: str) -> str:
    """How ``name``'s pooled ratio becomes its value (``identity`` for a metric not listed)."""
    metric = CATALOGUE.get(name)
    return metric.transform if metric else "identity"


def title(name: str) -> str:
    """The plot title of ``name`` (the name itself when it is not listed)."""
    metric = CATALOGUE.get(name)
    return metric.title if metric else name


def label(name: str) -> str:
    """The axis label of ``name`` (the name itself when it is not listed)."""
    metric = CATALOGUE.get(name)
    return metric.label if metric else name


def order(name: str) -> tuple[int, str]:
    """Sort key: catalogue order, then metrics it does not list by name."""
    position = list(CATALOGUE).index(name) if name in CATALOGUE else len(CATALOGUE)
    return position, name


# --------------------------------------------------------------------------- metric keys

_KEY_RE = re.compile(r"^(?P<name>.+?)(?:@(?P<length>\d+))?(?P<stderr>_stderr)?$")


def key(name: str, length: int | None = None, stderr: bool = False) -> str:
    """The key of ``name`` (at ``length``): ``symkl@4096``, ``ppl@4096_stderr``, ``keyppl``."""
    text = name if length is None else f"{name}@{int(length)}"
    return text + STDERR_SUFFIX if stderr else text


def parse_key(text: str) -> tuple[str, int | None, bool]:
    """(name, length or None, is a standard error) of a key :func:`key` builds.

    ``"ppl@4096_stderr"`` -> ``("ppl", 4096, True)``; ``"ppl@max"`` -> ``("ppl@max", None,
    False)``: only a decimal suffix is a length.
    """
    match = _KEY_RE.match(text)
    if match is None:  # only the empty string
        return text, None, False
    length = match["length"]
    return match["name"], int(length) if length is not None else None, match["stderr"] is not None
