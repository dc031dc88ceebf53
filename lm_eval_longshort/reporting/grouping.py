"""Which task results measured the same thing, and how groups that did not differ.

Two task results are comparable iff their ``measured`` records are equal (same task,
settings that decide the scored tokens, corpus and document set; see runs.py). ``report``,
``plot`` and ``compare`` only put comparable results side by side; this module partitions
results into such groups and words the difference between groups for the user. A result
from a file without the record is a group of its own ("settings unknown").
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from lm_eval_longshort.numerics import catalogue
from lm_eval_longshort.reporting.runs import Run

_DIGEST = re.compile(r"[0-9a-f]{32,}")
_UNKNOWN = "settings unknown (results file written before the longshort record; rerun to compare it)"


@dataclass
class Group:
    """Task results (run, task) that measured the same thing; ``measured`` None = unknown."""

    kind: str
    measured: dict | None
    members: list[tuple[Run, str]] = field(default_factory=list)

    @property
    def labels(self) -> list[str]:
        """Run labels, with the task name where a run has several members."""
        runs = [run for run, _ in self.members]
        return [run.label if runs.count(run) == 1 else f"{run.label}:{task}" for run, task in self.members]


def task_kind(run: Run, task: str) -> str | None:
    """ "ppl" or "misalign" from the record, else from the metrics reported per length."""
    record = run.longshort.get(task)
    if record and record.get("kind") in catalogue.KINDS:
        return record["kind"]
    metrics = set(run.per_length.get(task, {}))
    for kind in catalogue.KINDS:
        if metrics & set(catalogue.names(kind)):
            return kind
    return None


def _key(measured: dict | None, run: Run, task: str) -> str:
    """Equality key: canonical JSON of ``measured``; a unique key when it is unknown."""
    if measured is None:
        return f"unknown:{id(run)}:{task}"
    return json.dumps(measured, sort_keys=True, default=str)


def group_results(members: Sequence[tuple[Run, str]], kind: str) -> list[Group]:
    """Partition (run, task) results into groups of equal ``measured``, in first-seen order."""
    groups: dict[str, Group] = {}
    for run, task in members:
        measured = run.measured(task)
        key = _key(measured, run, task)
        groups.setdefault(key, Group(kind, measured)).members.append((run, task))
    return list(groups.values())


def groups_by_kind(runs: Sequence[Run]) -> dict[str, list[Group]]:
    """{kind: groups} over every longshort task of every run."""
    out: dict[str, list[Group]] = {}
    for kind in catalogue.KINDS:
        members = [(run, task) for run in runs for task in sorted(run.per_length) if task_kind(run, task) == kind]
        if members:
            out[kind] = group_results(members, kind)
    return out


def _flatten(measured: dict, prefix: str = "") -> dict[str, object]:
    """Nested dicts as dotted keys (``data.files``) so a differing data key is named exactly."""
    flat: dict[str, object] = {}
    for key, value in measured.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def differing_keys(groups: Sequence[Group]) -> list[str]:
    """Keys of ``measured`` whose values are not the same in every known group, sorted."""
    flats = [_flatten(g.measured) for g in groups if g.measured is not None]
    keys = sorted({k for flat in flats for k in flat})
    return [k for k in keys if len({json.dumps(f.get(k), sort_keys=True, default=str) for f in flats}) > 1]


def _short(value) -> str:
    """A setting as JSON; hex digests (the document set) cut to 12 characters."""
    if isinstance(value, str) and _DIGEST.fullmatch(value):
        return json.dumps(value[:12] + "...")
    return json.dumps(value, default=str)


def settings_text(group: Group, keys: Sequence[str]) -> str:
    """``lengths [128, 256], seed 0`` for the keys that tell this group apart."""
    if group.measured is None:
        return _UNKNOWN
    flat = _flatten(group.measured)
    shown = [f"{k} {_short(flat[k])}" if k in flat else f"no {k}" for k in keys]
    return "with " + ", ".join(shown) if shown else "with the same settings"


def describe_split(groups: Sequence[Group]) -> str:
    """Why these groups are kept apart: one line per group and the differing keys.

    Example: ``ppl: runs a, b measured lengths [128, 256]; run c lengths [128, 192]:
    not compared (keys differing: lengths)``, written as one line per group.
    """
    keys = differing_keys(groups)
    lines = [
        f"{groups[0].kind} results measured {len(groups)} different things; they are not compared with each other:"
    ]
    for i, group in enumerate(groups, 1):
        who = ", ".join(group.labels)
        noun = "runs" if len(group.members) > 1 else "run"
        lines.append(f"  group {i}: {noun} {who} {settings_text(group, keys)}")
    if keys:
        lines.append(f"  keys differing: {', '.join(keys)}")
    if "documents" in keys:
        lines.append(
            "  (documents: a digest of the scored documents; --limit/--samples, the corpus or a document's text differ)"
        )
    return "\n".join(lines)


def describe_all(runs: Sequence[Run]) -> str:
    """The grouping notes of every kind that splits into more than one group ("" if none)."""
    notes = [describe_split(groups) for groups in groups_by_kind(runs).values() if len(groups) > 1]
    return "\n".join(notes)
