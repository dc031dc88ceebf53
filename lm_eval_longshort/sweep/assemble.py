"""A sharded run's results JSON, assembled from its finished pieces as an unsharded run writes it.

Every document's record (``configs[task]["longshort"]["documents"]``) holds its per-metric
(numerator, denominator) sums. The records of all pieces, in doc_index order (the order lm-eval
scores a run's documents in), give back what each document's ``process_results`` returned
(harness/task.py ``document_values``); the task's own aggregation functions
(``harness.task.aggregations``) and lm-eval's own loop over them (``_compute_task_aggregations``,
private in lm-eval 0.4.13 but what every run goes through; with the standard errors ``fn.stderr``
the harness installs, and "N/A" where lm-eval writes it) then give every value and standard error
the unsharded run reports, from the same numbers in the same order. ``approximate``, a flag
not recorded per document, is the maximum of the pieces' values (each scored document carries its
piece's value, so every metric keeps one value per document). The document record and its
``measured.documents`` digest are rebuilt from all records, and ``n-samples`` counts them all.
The rest (environment, model, task configs) is the first piece's, once the pieces are seen to agree
on the task configs, except what describes the run as a whole: ``config.limit`` (the sweep's),
``config.use_cache`` (the pieces' caches), the evaluation time (their sum) and ``longshort_sweep``
(the run's plan, and the pieces' results files).
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
from pathlib import Path

from lm_eval_longshort.numerics import catalogue
from lm_eval_longshort.sweep import claims, shards
from lm_eval_longshort.sweep.folder import Layout, newest_results
from lm_eval_longshort.sweep.spec import RunSpec, Sweep


class _Aggregations:
    """What lm-eval's ``_compute_task_aggregations`` reads of a task: its name and aggregations."""

    def __init__(self, task_name: str, aggs: dict):
        self.task_name, self._aggs = task_name, aggs

    def aggregation(self) -> dict:
        return self._aggs


def _metric(result_key: str) -> tuple[str, str] | None:
    """(metric key, filter) of a results key ``ppl@64,none``; None for a standard error or a label."""
    metric, comma, filter_key = result_key.rpartition(",")
    if not comma or catalogue.parse_key(metric)[2]:
        return None
    return metric, filter_key


def _piece_value(value) -> float | None:
    """A piece's value of a flag pooled by maximum (NaN: none of its documents had one)."""
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def task_results(task: str, pieces: list[dict], bootstrap_iters: int) -> tuple[dict, list[dict]]:
    """``results[task]`` of the whole run and its document records, from the pieces' results."""
    from lm_eval.evaluator_utils import _compute_task_aggregations

    from lm_eval_longshort.harness import task as harness
    from lm_eval_longshort.protocols.settings import settings_from_json

    record = pieces[0]["configs"][task]["longshort"]
    aggs = harness.aggregations(record["kind"], settings_from_json(json.dumps(record["settings"])))
    owned = [(r, i) for i, piece in enumerate(pieces) for r in piece["configs"][task]["longshort"]["documents"]]
    owned.sort(key=lambda pair: pair[0]["doc_index"])
    documents = [r for r, _ in owned]
    if len({r["doc_index"] for r in documents}) != len(documents):
        raise RuntimeError(f"task {task}: two pieces scored the same document; delete the run's shards to recompute")
    values = [harness.document_values(r, aggs) for r in documents]
    template = pieces[0]["results"][task]
    raw_metrics = {}
    for result_key in template:
        if (found := _metric(result_key)) is None:
            continue
        metric, filter_key = found
        entry = catalogue.get(catalogue.parse_key(metric)[0])
        if entry.pool == "max" and entry.of is None:  # a flag, not recorded per document
            flags = [_piece_value(piece["results"][task][result_key]) for piece in pieces]
            raw_metrics[found] = [None if r["skipped"] else flags[i] for r, i in owned]
        else:
            raw_metrics[found] = [v[metric] for v in values if metric in v]
    metrics, sample_len = _compute_task_aggregations(_Aggregations(task, aggs), raw_metrics, bootstrap_iters)
    labels = {k: v for k, v in template.items() if "," not in k}
    return {**labels, "sample_len": sample_len, **metrics}, documents


def _config_without_documents(config: dict) -> dict:
    """A task's config with the parts that differ between pieces (their documents) taken out."""
    config = copy.deepcopy(config)
    config["longshort"].pop("documents", None)
    config["longshort"]["measured"].pop("documents", None)
    return config


def assemble(sweep: Sweep, run: RunSpec, layout: Layout, pieces: list[shards.Work], claim: claims.Claim) -> Path:
    """Write the run's results JSON from its finished pieces into ``runs/<run>/``; its path.

    Written under ``.partial/<run>/`` and renamed into place (atomic: then the run is finished),
    while ``claim`` (the run's) is still this worker's.
    """
    from lm_eval_longshort.harness.task import documents_digest

    files = [newest_results(layout.work_dir(piece)) for piece in pieces]
    loaded = [json.loads(path.read_text(encoding="utf-8")) for path in files]
    out = copy.deepcopy(loaded[0])
    for task in out["results"]:
        configs = [_config_without_documents(data["configs"][task]) for data in loaded]
        if any(c != configs[0] for c in configs[1:]):
            raise RuntimeError(f"task {task}: the pieces' task configs differ (engine or settings); delete the shards")
        out["results"][task], documents = task_results(task, loaded, sweep.bootstrap_iters)
        longshort = out["configs"][task]["longshort"]
        longshort["documents"] = documents
        longshort["measured"]["documents"] = documents_digest(documents)
        out["n-samples"][task]["effective"] = sum(data["n-samples"][task]["effective"] for data in loaded)
    out["config"]["limit"] = sweep.limit  # what an unsharded run records; its pieces ran with samples
    out["config"]["use_cache"] = [data["config"].get("use_cache") for data in loaded]
    seconds = sum(float(data.get("total_evaluation_time_seconds") or 0) for data in loaded)
    out["total_evaluation_time_seconds"] = str(seconds)
    out["longshort_sweep"] = {
        "sweep": sweep.name,
        "run": run.name,
        "plan": sweep.run_plan(run),
        "shards": [f"runs/{piece.folder}/{path.name}" for piece, path in zip(pieces, files)],
    }
    partial = layout.partial_dir(run.name)
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    name = max(path.name for path in files)  # lm-eval's results_<date>.json: the last piece's date
    written = partial / name
    written.write_text(json.dumps(out, indent=2, default=str, ensure_ascii=False), encoding="utf-8")
    if not claim.held():
        shutil.rmtree(partial, ignore_errors=True)
        raise RuntimeError(f"run {run.name} was taken over by {claims.describe(claim.path)} while assembling")
    final = layout.run_dir(run.name) / name
    os.replace(written, final)
    shutil.rmtree(partial, ignore_errors=True)
    return final
