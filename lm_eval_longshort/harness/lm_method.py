"""The request type ``longshort_score`` and the LM method of that name.

lm-eval dispatches each Instance by ``getattr(lm, instance.request_type)`` and lm-eval
0.4.13 has no model plugins, so the method is attached to the base class ``LM`` (not only
``TemplateLM``: models such as ``dummy`` derive from ``LM`` directly and must get the clear
"use --model hf or --model vllm" error, not an AttributeError): plain ``--model hf`` and
``--model vllm`` then serve our requests. The method picks a backend
engine for the lm object and hands it every document of every longshort task at once.
"""

from __future__ import annotations

import json
import logging
from collections import Counter, defaultdict

import lm_eval.evaluator_utils
from lm_eval.api.model import LM
from tqdm.auto import tqdm

from lm_eval_longshort.harness.resume import DocumentStore, engine_identity
from lm_eval_longshort.protocols.requests import ScoringEngine
from lm_eval_longshort.protocols.runner import Document, TaskPlan, plan_task, score_chunks
from lm_eval_longshort.protocols.settings import MisalignSettings, settings_from_json

REQUEST_TYPE = "longshort_score"
log = logging.getLogger(__name__)

# Engine identity (backend, model, dtype, fingerprint) per task name, for the results JSON.
ENGINES_BY_TASK: dict[str, dict] = {}


def engine_for(lm) -> ScoringEngine:
    """The scoring engine of an lm-eval model object (created once, then cached on it)."""
    engine = getattr(lm, "_longshort_engine", None)
    if engine is not None:
        return engine
    from lm_eval.models.huggingface import HFLM

    kind = type(lm).__name__
    if isinstance(lm, HFLM):
        from lm_eval_longshort.backends.hf import HFEngine

        engine = HFEngine.from_hflm(lm)
    elif kind == "VLLM":
        from lm_eval_longshort.backends.vllm import from_lm_eval  # imports vllm: only here

        engine = from_lm_eval(lm)
    else:
        raise TypeError(
            f"longshort tasks need full-vocabulary log-probabilities, which the {kind!r} backend "
            "does not provide; run them with --model hf or --model vllm"
        )
    lm._longshort_engine = engine
    return engine


class TaskCheckError(ValueError):
    """One or more longshort tasks of a call cannot run; raised before anything is scored."""


def longshort_score(self, requests, disable_tqdm: bool = False) -> list[str]:
    """Score ``longshort_score`` Instances: arguments = (label, settings JSON); text from the doc.

    Every task of the call is checked first (settings against the backend, documents long
    enough, model arguments that collide with task keys), so a bad task stops the call before
    any work. Responses are JSON text (lm-eval logs responses as strings, so they stay valid JSON
    in --log_samples output).
    """
    _check_data_parallel(self, requests)
    engine = engine_for(self)
    identity = engine_identity(engine)
    plans = _check_tasks(self, engine, requests)
    store = DocumentStore.for_lm(self, identity)
    responses: list[str | None] = [None] * len(requests)
    for plan, indices in plans:
        ENGINES_BY_TASK[plan.task] = identity
        log.info("%s: %d documents on the %s backend", plan.task, len(plan.docs), engine.name)
        _score_with_store(engine, plan, store, disable_tqdm)
        for i, response in zip(indices, plan.responses, strict=True):
            responses[i] = json.dumps(response)
    return responses  # type: ignore[return-value]


def _check_tasks(lm, engine: ScoringEngine, requests) -> list[tuple[TaskPlan, list[int]]]:
    """A plan per task, or one error that names every task that cannot run."""
    by_task = defaultdict(list)
    for i, request in enumerate(requests):
        by_task[(request.task_name, request.args[1])].append(i)
    plans, problems = [], []
    for (task, settings_json), indices in by_task.items():
        settings = settings_from_json(settings_json)
        docs = [
            Document(
                int(requests[i].doc.get("doc_index", requests[i].doc_id)),
                str(requests[i].doc.get("title", "")),
                requests[i].doc["text"],
            )
            for i in indices
        ]
        try:
            _check_model_arguments(lm, settings, task)
            plans.append((plan_task(engine, settings, docs, task), indices))
        except ValueError as exc:
            problems.append((task, exc))
    if len(problems) == 1:
        raise problems[0][1]
    if problems:
        listing = "\n".join(f"  - {task}: {exc}" for task, exc in problems)
        raise TaskCheckError(
            f"{len(problems)} of {len(by_task)} longshort tasks cannot run (nothing was scored):\n{listing}"
        )
    return plans


def _check_data_parallel(lm, requests) -> None:
    """Refuse more data-parallel engines than documents, before any engine starts (``--model vllm``
    with ``data_parallel_size=N`` starts N; each scores whole documents)."""
    engines = int(getattr(lm, "data_parallel_size", 1) or 1)
    documents = max(Counter(r.task_name for r in requests).values(), default=0)
    if engines > 1 and engines > documents:
        raise ValueError(
            f"data_parallel_size={engines} is more than the {documents} documents a task has to score: "
            f"{engines - documents} of the engines would get none; use data_parallel_size={documents} or "
            "fewer (or score more documents: --limit)"
        )


def _check_model_arguments(lm, settings, task: str) -> None:
    """Refuse a task value that came from --model_args rather than --metadata.

    lm-eval merges --model_args into every task's metadata, and ``seed`` is both a vLLM engine
    argument and the misalignment seed: ``--model_args ...,seed=0`` would silently change the
    draws. A task seed equal to the engine's (and not the default) cannot be told apart from that.
    """
    if settings.kind != "misalign" or type(lm).__name__ != "VLLM":
        return
    engine_seed = (getattr(lm, "model_args", None) or {}).get("seed")
    if engine_seed is not None and int(engine_seed) == settings.seed != MisalignSettings.seed:
        raise ValueError(
            f"task {task}: seed={settings.seed} is also the vLLM engine's seed, and lm-eval copies "
            "--model_args into task metadata, so it would silently change the misalignment draws. The "
            "engine seed does not affect scoring: drop seed from --model_args, and set the draws' seed "
            "with --metadata '{\"seed\": N}' (a value different from the engine's)"
        )


def _score_with_store(engine: ScoringEngine, plan: TaskPlan, store: DocumentStore | None, quiet: bool) -> None:
    """Score a plan chunk by chunk, taking finished chunks from the store and committing new ones."""
    keys = {i: store.key(plan.settings, plan.bos, plan.docs[i]) for c in plan.chunks for i in c} if store else {}
    todo = []
    for chunk in plan.chunks:
        stored = [store.get(keys[i]) for i in chunk] if store else [None]
        if all(r is not None for r in stored):
            for i, response in zip(chunk, stored, strict=True):
                plan.responses[i] = {**response, "title": plan.docs[i].title}
        else:
            todo.append(chunk)
    n_usable = sum(len(c) for c in plan.chunks)
    n_todo = sum(len(c) for c in todo)
    if store:
        log.info(
            "%s: %d of %d documents resumed from the --use_cache database, %d to score",
            plan.task,
            n_usable - n_todo,
            n_usable,
            n_todo,
        )
    bar = tqdm(total=n_todo, desc=f"{plan.task}", unit="doc", disable=quiet or not n_todo)
    for chunk in score_chunks(engine, plan, todo):
        if store:
            store.put({keys[i]: plan.responses[i] for i in chunk})
        bar.update(len(chunk))
    bar.close()


def install() -> None:
    """Attach the method to lm-eval's LM base class and let our aggregations bring their own
    standard errors (idempotent)."""
    if getattr(LM, REQUEST_TYPE, None) is not longshort_score:
        setattr(LM, REQUEST_TYPE, longshort_score)
    original = lm_eval.evaluator_utils.stderr_for_metric
    if not getattr(original, "longshort", False):
        lm_eval.evaluator_utils.stderr_for_metric = _stderr_for_metric_with(original)
    _show_info_logs()


def _show_info_logs() -> None:
    """Print our INFO lines (documents resumed, scored) like lm-eval's own, unless logging is set up.

    lm-eval configures only its ``lm_eval`` logger; without a handler Python would print our
    warnings alone. Records still propagate to the root logger (and to pytest's caplog).
    """
    package = logging.getLogger("lm_eval_longshort")
    if package.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s [longshort] %(message)s"))
    package.addHandler(handler)
    package.setLevel(logging.INFO)


def _stderr_for_metric_with(original):
    """lm-eval asks ``stderr_for_metric(aggregation_fn, bootstrap_iters)``, which knows only its
    own aggregations; ours carry ``fn.stderr`` (delta method over documents, numerics/aggregate.py).
    ``bootstrap_iters=0`` still means "no standard errors", as in lm-eval."""

    def stderr_for_metric(metric, bootstrap_iters):
        own = getattr(metric, "stderr", None)
        if own is not None and bootstrap_iters > 0:
            return own
        return original(metric, bootstrap_iters)

    stderr_for_metric.longshort = True
    return stderr_for_metric
