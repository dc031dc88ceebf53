"""docs/metrics.md's worked examples, re-derived here and checked against the package and the text.

Each worked example is a list of text lines. They are built twice: once by plain index
arithmetic and numpy written here from the rules the document states, once from what the
package's protocol and aggregation functions return. The two must agree, and every line must
appear verbatim in docs/metrics.md, so neither the code nor the document can drift. No model
is needed: the example document is ids = 0..19, so every token's id is its own index.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from reference import delta_terms, dense_gap, dense_max_gap, dense_positions, last_short_lengths, terms_se

from lm_eval_longshort.numerics import aggregate
from lm_eval_longshort.protocols import misalignment, perplexity
from lm_eval_longshort.protocols.settings import MisalignSettings, PerplexitySettings

DOC = Path(__file__).resolve().parents[1] / "docs" / "metrics.md"
IDS = np.arange(20)  # [20] a 20-token document whose token ids are their positions
LENGTHS = (4, 8)
C = max(LENGTHS)
W = 3  # ladder target_tokens
BOS = 99  # any id: windows hold document ids only, the BOS is the backend's to prepend
SEED, PAIRS = 1234, 2
DOCS = (0, 1, 2)


def span(tokens) -> str:
    """``ids[a:b]`` for a window of the example document (its ids are its positions)."""
    tokens = np.asarray(tokens)
    assert len(tokens) and np.array_equal(tokens, np.arange(tokens[0], tokens[0] + len(tokens))), tokens
    return f"ids[{tokens[0]}:{tokens[-1] + 1}]"


def fed(window) -> np.ndarray:
    """The document ids a TargetWindow feeds the model (its last token is a target only, unless feed_last)."""
    return window.tokens if window.feed_last else window.tokens[:-1]


# ----------------------------------------------------------------------------- perplexity


def ladder_spec() -> list[str]:
    lines = [f"needs {C + W} tokens; longest input {C + W - 1} tokens ({C + W} with a BOS)"]
    return lines + [f"L={n}: reads ids[{C - n}:{C + W - 1}], scores ids[{C}:{C + W}]" for n in LENGTHS]


def ladder_code() -> list[str]:
    s = PerplexitySettings(lengths=LENGTHS, target_tokens=W)
    lines = [
        f"needs {perplexity.needed_tokens(s)} tokens; longest input {perplexity.longest_input(s, None)} "
        f"tokens ({perplexity.longest_input(s, BOS)} with a BOS)"
    ]
    for n, w in zip(LENGTHS, perplexity.ladder_windows(IDS, s, None, "doc"), strict=True):
        lines.append(f"L={n}: reads {span(fed(w))}, scores {span(w.tokens[w.score_from :])}")
    return lines


def truncate_spec() -> list[str]:
    lines = [f"L={n}: reads ids[0:{n}], scores ids[1:{n}]; with a BOS: scores ids[0:{n}]" for n in LENGTHS]
    # One pass over ids[0:C] scores ids[1:C]; length L keeps the first L - 1 of those NLLs.
    kept = ", ".join(f"L={n} keeps the first {n - 1}" for n in LENGTHS)
    return lines + [f"single pass: reads ids[0:{C}], scores ids[1:{C}]; {kept}"]


def truncate_code() -> list[str]:
    s = PerplexitySettings(lengths=LENGTHS, protocol="truncate")
    plain = perplexity.truncate_windows(IDS, s, None, "doc", False)
    with_bos = perplexity.truncate_windows(IDS, s, BOS, "doc", False)
    lines = [
        f"L={n}: reads {span(fed(a))}, scores {span(a.tokens[a.score_from :])}; "
        f"with a BOS: scores {span(b.tokens[b.score_from :])}"
        for n, a, b in zip(LENGTHS, plain, with_bos, strict=True)
    ]
    (one,) = perplexity.truncate_windows(IDS, s, None, "doc", True)
    nlls = [np.arange(1.0, len(one.tokens) - one.score_from + 1)]  # [C - 1] a distinct NLL per target
    records = perplexity.truncate_summarize(IDS, nlls, s, None, lambda ids: "x" * len(ids))["records"]
    for record in records:  # the kept NLLs are the first n_targets of the pass: 1 + 2 + ... + n
        assert record["nll_sum"] == pytest.approx(record["n_targets"] * (record["n_targets"] + 1) / 2)
    kept = ", ".join(f"L={r['L']} keeps the first {r['n_targets']}" for r in records)
    return lines + [f"single pass: reads {span(fed(one))}, scores {span(one.tokens[one.score_from :])}; {kept}"]


def positions_spec() -> list[str]:
    k, edges = 2, [0]  # 2 bins per doubling: 0, then round(2^(j/2)) = 1, 1, 2, 3, 4, 6 below C, then C
    edges += sorted({int(2 ** (j / k) + 0.5) for j in range(2 * k + 4)} - {0} | set(LENGTHS))
    edges = [e for e in edges if e <= C]
    nll = {t: float(t) for t in range(1, C)}  # no BOS: ids[1:C] are the targets, NLL of ids[t] = t
    bins = list(zip(edges, edges[1:]))
    sums = [sum(nll.get(t, 0.0) for t in range(lo, hi)) for lo, hi in bins]
    counts = [sum(1 for t in range(lo, hi) if t in nll) for lo, hi in bins]
    new4, new8 = [t for t in nll if t < 4], [t for t in nll if 4 <= t < 8]
    return [
        f"bins_per_doubling={k}, C={C}: edges {edges}",
        "bins: positions " + ", ".join(f"{lo}..{hi - 1}" for lo, hi in bins),
        f"no BOS, NLL of ids[t] = t: nll_sum {[int(x) for x in sums]}, n_targets {counts}",
        f"ppl_pos@4 scores ids[1:4]: exp({sum(new4):g}/{len(new4)}) = {math.exp(sum(new4) / len(new4)):.4f}; "
        f"ppl_pos@8 scores ids[4:8]: exp({sum(new8):g}/{len(new8)}) = {math.exp(sum(new8) / len(new8)):.4f}",
        f"ppl@8 pools every bin: exp({sum(sums):g}/{sum(counts)}) = {math.exp(sum(sums) / sum(counts)):.4f}",
        "with a BOS: ppl_pos@4 scores ids[0:4], ppl_pos@8 scores ids[4:8]",
    ]


def positions_code() -> list[str]:
    s = PerplexitySettings(lengths=LENGTHS, protocol="truncate", bins_per_doubling=2)
    nll = np.arange(1.0, C)  # the one pass's NLLs of ids[1:C]
    summary = perplexity.truncate_summarize(IDS, [nll], s, None, lambda ids: "x" * len(ids))
    bins, records = summary["positions"], {r["L"]: r for r in summary["records"]}
    edges = bins["edges"]
    assert edges == perplexity.position_edges(s)

    def pos(n: int) -> str:
        a, b = records[n]["pos_nll_sum"], records[n]["pos_n_targets"]
        return f"exp({a:g}/{b}) = {math.exp(a / b):.4f}"

    with_bos = perplexity.truncate_summarize(IDS, [np.arange(0.0, C)], s, BOS, lambda ids: "x" * len(ids))
    first = {r["L"]: r["pos_n_targets"] for r in with_bos["records"]}
    total = records[C]
    return [
        f"bins_per_doubling=2, C={C}: edges {edges}",
        "bins: positions " + ", ".join(f"{lo}..{hi - 1}" for lo, hi in zip(edges, edges[1:])),
        f"no BOS, NLL of ids[t] = t: nll_sum {[int(x) for x in bins['nll_sum']]}, n_targets {bins['n_targets']}",
        f"ppl_pos@4 scores ids[1:4]: {pos(4)}; ppl_pos@8 scores ids[4:8]: {pos(8)}",
        f"ppl@8 pools every bin: exp({total['nll_sum']:g}/{total['n_targets']}) = "
        f"{math.exp(total['nll_sum'] / total['n_targets']):.4f}",
        f"with a BOS: ppl_pos@4 scores ids[{4 - first[4]}:4], ppl_pos@8 scores ids[{8 - first[8]}:8]",
    ]


def sliding_windows_spec(n_doc: int, length: int, stride: int, first: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored) per window: starts 0, S, 2S, ... until a window reaches n_doc."""
    out, scored = [], first  # tokens before `scored` are scored already (or unscorable)
    for begin in range(0, n_doc, stride):
        end = min(begin + length, n_doc)
        start = max(scored, begin + first)
        out.append((begin, end, start))
        scored = end
        if end == n_doc:
            break
    return out


def sliding_spec() -> list[str]:
    lines = []
    for prefix, n_doc, lengths in (("", len(IDS), LENGTHS), ("max_doc_tokens=18, ", 18, (8,))):
        for n in lengths:
            lines += [
                f"{prefix}L={n} S={n // 2}: window ids[{b}:{e}] scores ids[{f}:{e}]"
                for b, e, f in sliding_windows_spec(n_doc, n, n // 2, 1)
            ]
    lines += [f"with a BOS: L={n} first window scores ids[0:{n}]" for n in LENGTHS]
    return lines


def sliding_code() -> list[str]:
    lines = []
    for prefix, cap, lengths in (("", None, LENGTHS), ("max_doc_tokens=18, ", 18, (8,))):
        s = PerplexitySettings(lengths=lengths, protocol="sliding", max_doc_tokens=cap)
        windows = perplexity.sliding_windows(IDS, s, None, "doc")
        for w in windows:
            n = int(w.label.split("L=")[1].split("@")[0])
            lines.append(
                f"{prefix}L={n} S={s.stride_for(n)}: window {span(fed(w))} scores {span(w.tokens[w.score_from :])}"
            )
        n_doc = min(len(IDS), s.doc_tokens_cap())
        for n in lengths:  # invariant: each length scores ids[1:D] exactly once
            scored = np.concatenate([w.tokens[w.score_from :] for w in windows if f"L={n}@" in w.label])
            assert np.array_equal(scored, np.arange(1, n_doc))
    s = PerplexitySettings(lengths=LENGTHS, protocol="sliding")
    for n in LENGTHS:
        first = next(w for w in perplexity.sliding_windows(IDS, s, BOS, "doc") if w.label.endswith(f"L={n}@0"))
        lines.append(f"with a BOS: L={n} first window scores {span(first.tokens[first.score_from :])}")
    return lines


def yes_no(flags) -> str:
    return "[" + ", ".join("yes" if f else "no" for f in flags) + "]"


def key_tokens_example() -> tuple[np.ndarray, np.ndarray]:
    """Per-target NLLs of the three ladder targets at L = min(lengths) and at L = C."""
    return np.array([3.0, 0.5, 4.0]), np.array([0.5, 0.4, 2.5])


def key_spec() -> list[str]:
    short, long = key_tokens_example()
    gain, confident = short - long, -long > -2.0
    key = (gain > 2.0) & confident
    n_key, key_sum = int(key.sum()), float(long[key].sum())
    return [
        f"gain nll_short - nll_long: [{', '.join(f'{g:.1f}' for g in gain)}]; confident (-nll_long > -2): "
        f"{yes_no(confident)}; gain > 2: {yes_no(gain > 2.0)}; key: {yes_no(key)}",
        f"n_key = {n_key}, key_nll_sum = {key_sum}, keyppl = exp({key_sum}/{n_key}) = {math.exp(key_sum / n_key):.4f}, "
        f"key_frac = {n_key}/{W} = {n_key / W:.4f}",
    ]


def key_code() -> list[str]:
    short, long = key_tokens_example()
    s = PerplexitySettings(lengths=LENGTHS, target_tokens=W)
    keys = perplexity.ladder_summarize(IDS, [short, long], s, None, lambda ids: "x" * len(ids))["key_tokens"]
    n_key, key_sum = keys["n_key"], keys["key_nll_sum"]
    gain = short - long
    flags = [g > s.alpha and -x > s.beta for g, x in zip(gain, long)]
    assert sum(flags) == n_key  # the flags shown are the ones the package counted
    return [
        f"gain nll_short - nll_long: [{', '.join(f'{g:.1f}' for g in gain)}]; confident (-nll_long > -2): "
        f"{yes_no(-long > s.beta)}; gain > 2: {yes_no(gain > s.alpha)}; key: {yes_no(flags)}",
        f"n_key = {n_key}, key_nll_sum = {key_sum}, "
        f"keyppl = exp({key_sum}/{n_key}) = {aggregate.perplexity([(key_sum, n_key)]):.4f}, "
        f"key_frac = {n_key}/{keys['n_targets']} = {aggregate.pooled_ratio([(n_key, keys['n_targets'])]):.4f}",
    ]


# ----------------------------------------------------------------------------- misalignment


def last_spec() -> list[str]:
    lines = []
    for doc in DOCS:
        for n in LENGTHS:
            shorts = last_short_lengths(SEED, doc, n, PAIRS, 0.5)
            parts = ", ".join(f"l={short} ids[{C - short}:{C}]" for short in shorts)
            lines.append(f"doc {doc}, L={n}: long ids[{C - n}:{C}]; short {parts}")
    return lines


def last_code() -> list[str]:
    s = MisalignSettings(lengths=LENGTHS, pairs=PAIRS, seed=SEED)
    lines = []
    for doc in DOCS:
        out = misalignment.last_prompts(IDS, s, doc, None, "doc")
        prompts, records = out[0], out[1]  # prompts: [long_L, short_L_1..short_L_pairs] per L
        assert {r["end"] for r in records} == {C}
        for i, n in enumerate(LENGTHS):
            group = prompts[i * (1 + PAIRS) : (i + 1) * (1 + PAIRS)]
            shorts = [r["short_len"] for r in records if r["long_len"] == n]
            assert shorts == misalignment.short_lengths(s, doc, n) == [len(p.tokens) for p in group[1:]]
            parts = ", ".join(f"l={len(p.tokens)} {span(p.tokens)}" for p in group[1:])
            lines.append(f"doc {doc}, L={n}: long {span(group[0].tokens)}; short {parts}")
    return lines


def dense_spec(ratio: float, docs) -> list[str]:
    prefix = "" if ratio == 0.5 else f"min_ratio={ratio}, "
    lines = []
    for doc in docs:
        needs = 0
        for n in LENGTHS:
            top, gap = dense_max_gap(n, ratio), dense_gap(SEED, doc, n, ratio)
            t = dense_positions(n, gap, ratio)  # positions both windows reach
            lines.append(
                f"{prefix}doc {doc}, L={n}: e={gap} of [1, {top}], A=ids[0:{n}], B=ids[{gap}:{gap + n}], "
                f"t={t[0]}..{t[-1]}, B positions {t[0] - gap}..{t[-1] - gap}, "
                f"long context {t[0] + 1}..{t[-1] + 1}, short context {t[0] + 1 - gap}..{t[-1] + 1 - gap}"
            )
            needs = max(needs, n + gap)
        lines.append(f"{prefix}doc {doc}: needs {needs} tokens")
    return lines


def dense_code(ratio: float, docs) -> list[str]:
    prefix = "" if ratio == 0.5 else f"min_ratio={ratio}, "
    s = MisalignSettings(lengths=LENGTHS, mode="dense", min_ratio=ratio, seed=SEED)
    lines = []
    for doc in docs:
        pairs, layout = misalignment.dense_pairs(IDS, s, doc, None, "doc")
        for n, pair, group in zip(LENGTHS, pairs, layout, strict=True):
            gap = group["b_start"]
            a, b = pair.long_positions, pair.short_positions  # [k] each, aligned
            assert np.array_equal(pair.long_tokens[a], pair.short_tokens[b])  # same document token
            assert group["n_positions"] == len(a) and group["long_ctx"] == [int(a[0]) + 1, int(a[-1]) + 1]
            lines.append(
                f"{prefix}doc {doc}, L={n}: e={gap} of [1, {misalignment.max_gap(s, n)}], "
                f"A={span(pair.long_tokens)}, B={span(pair.short_tokens)}, t={a[0]}..{a[-1]}, "
                f"B positions {b[0]}..{b[-1]}, long context {group['long_ctx'][0]}..{group['long_ctx'][1]}, "
                f"short context {group['short_ctx'][0]}..{group['short_ctx'][1]}"
            )
        lines.append(f"{prefix}doc {doc}: needs {misalignment.needed_tokens(s, doc)} tokens")
    return lines


# ----------------------------------------------------------------------------- standard errors

PPL8 = [(6.0, 3), (9.0, 3), (4.5, 3)]  # (NLL sum, targets) of three documents at L = 8
PPL4 = [(7.5, 3), (9.6, 3), (6.0, 3)]  # the same documents at L = 4
BPB8 = [(6.0, 12), (9.0, 10), (4.5, 14)]  # (NLL sum, UTF-8 bytes) at L = 8
SYMKL8 = [(0.8, 4), (1.2, 4), (0.3, 3)]  # (summed symkl, positions) of the dense example's documents at L = 8


def stderr_spec() -> list[str]:
    (r8, u8), (r4, u4), (rb, ub), (rs, us) = (delta_terms(*np.transpose(p)) for p in (PPL8, PPL4, BPB8, SYMKL8))
    p8, p4 = math.exp(r8), math.exp(r4)
    return [
        f"symkl@8: R = {rs:.4f}, se(R) = {terms_se(us):.4f}",
        f"ppl@8: R = {r8:.4f}, se(R) = {terms_se(u8):.4f}, ppl = {p8:.4f}, se(ppl) = {p8 * terms_se(u8):.4f}",
        f"ppl@4: R = {r4:.4f}, se(R) = {terms_se(u4):.4f}, ppl = {p4:.4f}, se(ppl) = {p4 * terms_se(u4):.4f}",
        f"bpb@8: R = {rb:.4f} nats/byte, se(R) = {terms_se(ub):.4f}, bpb = {rb / math.log(2):.4f}, "
        f"se(bpb) = {terms_se(ub) / math.log(2):.4f}",
        f"mean NLL, L=8 minus L=4: {r8 - r4:.4f}, paired se = {terms_se(u8 - u4):.4f} "
        f"(the two errors combined would give {math.hypot(terms_se(u8), terms_se(u4)):.4f})",
        f"ppl@8 minus ppl@4: {p8 - p4:.4f}, paired se = {terms_se(p8 * u8 - p4 * u4):.4f} "
        f"(the two errors combined would give {math.hypot(p8 * terms_se(u8), p4 * terms_se(u4)):.4f})",
    ]


def stderr_code() -> list[str]:
    f = aggregate
    d_r, se_r = f.paired_difference(PPL8, PPL4)
    d_p, se_p = f.paired_difference(PPL8, PPL4, "exp")
    s = MisalignSettings(lengths=LENGTHS, mode="dense", seed=SEED)
    positions = [misalignment.dense_pairs(IDS, s, doc, None, "doc")[1][-1]["n_positions"] for doc in DOCS]
    assert positions == [b for _, b in SYMKL8]  # the dense example's compared positions at L = 8
    return [
        f"symkl@8: R = {f.pooled_ratio(SYMKL8):.4f}, se(R) = {f.ratio_stderr(SYMKL8):.4f}",
        f"ppl@8: R = {f.pooled_ratio(PPL8):.4f}, se(R) = {f.ratio_stderr(PPL8):.4f}, "
        f"ppl = {f.perplexity(PPL8):.4f}, se(ppl) = {f.perplexity.stderr(PPL8):.4f}",
        f"ppl@4: R = {f.pooled_ratio(PPL4):.4f}, se(R) = {f.ratio_stderr(PPL4):.4f}, "
        f"ppl = {f.perplexity(PPL4):.4f}, se(ppl) = {f.perplexity.stderr(PPL4):.4f}",
        f"bpb@8: R = {f.pooled_ratio(BPB8):.4f} nats/byte, se(R) = {f.ratio_stderr(BPB8):.4f}, "
        f"bpb = {f.bits_per_byte(BPB8):.4f}, se(bpb) = {f.bits_per_byte.stderr(BPB8):.4f}",
        f"mean NLL, L=8 minus L=4: {d_r:.4f}, paired se = {se_r:.4f} (the two errors combined would give "
        f"{math.hypot(f.ratio_stderr(PPL8), f.ratio_stderr(PPL4)):.4f})",
        f"ppl@8 minus ppl@4: {d_p:.4f}, paired se = {se_p:.4f} (the two errors combined would give "
        f"{math.hypot(f.perplexity.stderr(PPL8), f.perplexity.stderr(PPL4)):.4f})",
    ]


# ----------------------------------------------------------------------------- the distribution of misalignment

SYMKL_DOCS = ([0.02, 0.5, 0.031], [0.0, 0.2])  # per-position symkl of two documents at one L
QUANTILES = (50, 90, 99)


def _bins_text(bins: dict[int, int]) -> str:
    return "{" + ", ".join(f"{i}: {c}" for i, c in sorted(bins.items())) + "}"


def _bounds(index: int) -> str:
    low, high = 10 ** (-8 + (index - 1) / 20), 10 ** (-8 + index / 20)
    return f"[{low:.4g}, {high:.4g})"


def _percentile_line(q: int, value: float, rank: int, pooled: list[float], index: int) -> str:
    return (
        f"symkl_p{q} = {value:.4g}: value {rank} of {len(pooled)} ({pooled[rank - 1]}) lies in bin {index} "
        + _bounds(index)
    )


def distribution_spec() -> list[str]:
    """Bins by the stated rule: 0 below 1e-8, i = floor(20·(log10 v + 8)) + 1 up to 200, 201 from 100."""

    def bin_of(v: float) -> int:
        return 0 if v < 1e-8 else 201 if v >= 100 else math.floor(20 * (math.log10(v) + 8)) + 1

    lines, merged = [], {}
    for d, values in enumerate(SYMKL_DOCS):
        bins = {}
        for v in values:
            bins[bin_of(v)] = bins.get(bin_of(v), 0) + 1
            merged[bin_of(v)] = merged.get(bin_of(v), 0) + 1
        lines.append(f"doc {d}: symkl {values} -> bins {_bins_text(bins)}, max {max(values)}")
    pooled = sorted(v for values in SYMKL_DOCS for v in values)
    lines.append(f"merged: {len(pooled)} positions, bins {_bins_text(merged)}")
    for q in QUANTILES:
        rank = math.ceil(q / 100 * len(pooled))
        i = bin_of(pooled[rank - 1])
        centre = 10 ** (-8 + (i - 0.5) / 20)
        lines.append(_percentile_line(q, centre, rank, pooled, i))
    return [*lines, f"symkl_max = {max(pooled)}"]


def distribution_code() -> list[str]:
    from lm_eval_longshort.numerics import histogram

    lines, docs = [], []
    for d, values in enumerate(SYMKL_DOCS):
        docs.append(histogram.sparse(histogram.counts(values)))
        lines.append(f"doc {d}: symkl {values} -> bins {_bins_text(dict(docs[-1]))}, max {max(values)}")
    merged = histogram.merged(docs)
    pooled = sorted(v for values in SYMKL_DOCS for v in values)
    lines.append(f"merged: {int(merged.sum())} positions, bins {_bins_text(dict(histogram.sparse(merged)))}")
    for q in QUANTILES:
        value = histogram.quantile(merged, q / 100)
        i = int(np.searchsorted(histogram.EDGES, value, side="right"))
        rank = math.ceil(q / 100 * len(pooled))
        lines.append(_percentile_line(q, value, rank, pooled, i))
    return [*lines, f"symkl_max = {max(pooled)}"]


EXAMPLES = {
    "ladder": (ladder_spec, ladder_code),
    "truncate": (truncate_spec, truncate_code),
    "loss against position": (positions_spec, positions_code),
    "sliding": (sliding_spec, sliding_code),
    "key tokens": (key_spec, key_code),
    "last": (last_spec, last_code),
    "dense": (lambda: dense_spec(0.5, DOCS), lambda: dense_code(0.5, DOCS)),
    "dense min_ratio 0.75": (lambda: dense_spec(0.75, (0,)), lambda: dense_code(0.75, (0,))),
    "standard errors": (stderr_spec, stderr_code),
    "distribution of misalignment": (distribution_spec, distribution_code),
}


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_worked_example(name):
    spec, code = EXAMPLES[name]
    expected = spec()
    assert code() == expected, f"the package disagrees with the rule docs/metrics.md states ({name})"
    lines = set(DOC.read_text(encoding="utf-8").splitlines())
    missing = [line for line in expected if line not in lines]
    assert not missing, f"docs/metrics.md lacks these lines of the {name} example (update it): {missing}"


if __name__ == "__main__":  # print the examples' lines, for pasting into docs/metrics.md
    for name, (spec, _) in EXAMPLES.items():
        print(f"--- {name}", *spec(), sep="\n")
