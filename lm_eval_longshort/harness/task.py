"""lm-eval Task classes for the longshort tasks (thin glue; the work is in protocols/ and backends/).

A YAML names one of these with ``class: !function lm_eval_longshort.harness.task.<Cls>``.
Each document becomes ONE Instance of request type ``longshort_score`` whose response is a
small per-document summary; ``process_results`` turns it into per-length (numerator,
denominator) pairs and ``aggregation`` pools them token-weighted. Metric names come from
the metric catalogue (numerics/catalogue.py) and the task's ``lengths`` (``ppl@4096``,
``symkl@8192``...), so they are derived here rather than listed in YAML.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import inspect
import json
import logging
import math
from pathlib import Path

from lm_eval.api.instance import Instance
from lm_eval.api.task import ConfigurableTask

from lm_eval_longshort.harness import lm_method
from lm_eval_longshort.harness.datasets import DATASET_KEYS, LOADER_KEYS
from lm_eval_longshort.harness.resume import text_sha1
from lm_eval_longshort.numerics import aggregate, catalogue, histogram
from lm_eval_longshort.numerics.catalogue import key
from lm_eval_longshort.protocols.settings import measured_settings, parse_settings, settings_to_json

lm_method.install()
log = logging.getLogger(__name__)

# from_pretrained keyword arguments HFLM forwards that are not in its signature.
_FROM_PRETRAINED_KEYS = {
    "attn_implementation",
    "low_cpu_mem_usage",
    "torch_dtype",
    "device_map",
    "offload_folder",
    "quantization_config",
    "use_safetensors",
    "local_files_only",
    "token",
    "cache_dir",
    "variant",
    "force_download",
    "code_revision",
    "max_memory",
    "tp_plan",
    "subfolder",
    "revision",
}


def _init_params_from_source(path: Path, class_name: str) -> set[str]:
    """Parameter names of ``class_name.__init__`` (or dataclass fields) read from source, without importing it."""
    try:
        tree = ast.parse(path.read_text())
    except (OSError, SyntaxError):
        return set()
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    names.add(item.target.id)
                if isinstance(item, ast.FunctionDef) and item.name == "__init__":
                    names.update(a.arg for a in item.args.args + item.args.kwonlyargs)
    return names


@functools.cache
def model_argument_names() -> frozenset[str]:
    """Keys lm-eval may merge into task metadata from --model_args (hf, vllm and vLLM engine args)."""
    from lm_eval.models.huggingface import HFLM

    names = set(inspect.signature(HFLM.__init__).parameters) | _FROM_PRETRAINED_KEYS
    lm_eval_dir = Path(inspect.getfile(HFLM)).parent
    names |= _init_params_from_source(lm_eval_dir / "vllm_causallms.py", "VLLM")
    spec = importlib.util.find_spec("vllm")
    if spec and spec.submodule_search_locations:
        vllm_dir = Path(next(iter(spec.submodule_search_locations)))
        names |= _init_params_from_source(vllm_dir / "engine" / "arg_utils.py", "EngineArgs")
    return frozenset(names - {"self", "kwargs", "args"})


class _LongShortTask(ConfigurableTask):
    KIND = ""

    def __init__(self, config: dict | None = None, **kwargs) -> None:
        config = dict(config or {})
        config.pop("class", None)  # lm-eval passes the YAML's own `class:` key along
        config.setdefault("output_type", "loglikelihood_rolling")
        config.setdefault("test_split", "test")
        config.setdefault("doc_to_text", "title")
        config.setdefault("doc_to_target", "")
        metadata = dict(config.get("metadata") or {})
        self.settings = parse_settings(
            self.KIND, metadata, foreign_keys=model_argument_names(), other_keys={"data keys": DATASET_KEYS}
        )
        self.data_keys = _data_keys(config, metadata)
        self._settings_json = settings_to_json(self.settings)
        self._documents: list[dict] = []
        super().__init__(config=config, **kwargs)

    def download(self, dataset_kwargs=None, **kwargs) -> None:
        super().download(dataset_kwargs, **kwargs)
        # Number documents by their place in the full list: --samples and multi-rank runs
        # renumber what they iterate, but the misalignment draws must not change.
        for split in list(self.dataset):
            if "doc_index" not in self.dataset[split].column_names:
                ds = self.dataset[split]
                self.dataset[split] = ds.add_column("doc_index", list(range(len(ds))))

    def construct_requests(self, doc, ctx, **kwargs) -> Instance:
        # lm-eval's evaluator passes metadata=(task, doc_id, repeats); its own task tests call
        # construct_requests(doc=..., ctx=...) without it, as the Task contract allows.
        metadata = kwargs.get("metadata") or (self.config.task, doc.get("doc_index"), 1)
        task, doc_id, _ = metadata
        task = task or self.config.task
        doc_id = doc.get("doc_index", doc_id)  # the place in the full list, also under --samples
        if doc_id is None:
            raise ValueError(
                f"{self.config.task}: construct_requests needs the document's index: a doc with "
                "'doc_index' (every doc of this task's dataset has one) or metadata=(task, doc_id, repeats)"
            )
        doc_id = int(doc_id)
        digest = text_sha1(doc["text"])[:12]
        # arguments[0] is what lm-eval hashes for --log_samples: it names the document by
        # content; the text itself is read from `doc` by the LM method.
        label = f"{task} doc {doc_id} {doc.get('title', '')!r} sha1:{digest}"
        return Instance(
            request_type=lm_method.REQUEST_TYPE,  # type: ignore[arg-type]
            doc=doc,
            arguments=(label, self._settings_json),
            idx=0,
            metadata=metadata,
        )

    def process_results(self, doc, results) -> dict:
        response = json.loads(results[0]) if isinstance(results[0], str) else results[0]
        skipped = bool(response.get("skipped"))
        values = self._per_doc_values(response) if not skipped else {name: None for name in self.aggregation()}
        values["skipped_docs"] = int(skipped)
        values["documents"] = {
            "doc_index": int(response["doc_index"]),
            "title": response.get("title", ""),
            "sha1": text_sha1(doc["text"]),
            "n_tokens": int(response["n_tokens"]),
            "skipped": skipped,
            **({} if skipped else {"sums": {k: list(v) for k, v in values.items() if isinstance(v, tuple)}}),
            **({} if skipped or not (found := distributions(values)) else {"distributions": found}),
            **({"positions": response["positions"]} if "positions" in response else {}),
        }
        return values

    def aggregation(self) -> dict:
        """{metric key: aggregation} for every catalogue metric this task's kind and settings report."""
        return aggregations(self.KIND, self.settings, documents=self._collect_documents)

    def _collect_documents(self, records: list[dict]) -> int:
        """Keep every document's record for the results JSON; the metric is the number scored."""
        self._documents = sorted(records, key=lambda r: r["doc_index"])
        return scored_documents(records)

    def higher_is_better(self) -> dict:
        return {name: catalogue.get(catalogue.parse_key(name)[0]).higher_is_better for name in self.aggregation()}

    def dump_config(self) -> dict:
        """lm-eval's config dump plus ``longshort``: what was measured, on which documents, by which engine."""
        config = super().dump_config()
        settings = measured_settings(self.settings)
        config["longshort"] = {
            "format": 1,
            "kind": self.KIND,
            "settings": json.loads(self._settings_json),
            "measured": {
                "task": self.config.task,
                **settings,
                "data": self.data_keys,
                "documents": documents_digest(self._documents),
            },
            "documents": self._documents,
            "engine": lm_method.ENGINES_BY_TASK.get(self.config.task),
            "stderr": "delta",
        }
        return config


def aggregations(kind: str, settings, documents=None) -> dict:
    """{metric key: aggregation} for every catalogue metric a task of ``kind`` with ``settings`` reports.

    The one mapping from metrics to aggregation functions (each carrying its standard error as
    ``fn.stderr``), used by the tasks and by the assembly of a sharded run's results
    (sweep/assemble.py). ``documents``: the aggregation of the ``documents`` pool (a task's keeps
    every document's record; by default the number scored).
    """
    variant = settings.protocol if kind == "ppl" else settings.mode
    aggs = {}
    for metric in catalogue.metrics():
        if metric.kind not in (kind, None) or (metric.only and variant not in metric.only):
            continue
        if metric.pool == "positions":  # per-position bins: in the document records, not an lm-eval metric
            continue
        function = (documents or scored_documents) if metric.pool == "documents" else _aggregator(metric)
        lengths = settings.lengths if metric.per_length else [None]
        aggs.update({key(metric.name, n): function for n in lengths})
    return aggs


def _aggregator(metric: catalogue.Metric):
    """How documents combine into ``metric`` (not the ``documents`` pool: see ``aggregations``)."""
    if metric.name in _SPECIAL:
        return _SPECIAL[metric.name]
    if metric.pool == "quantile":
        return histogram.pooled_quantile(metric.quantile)
    return {"max": aggregate.maximum, "count": aggregate.count}.get(metric.pool) or _RATIO[metric.transform]


# A distribution summary's field in a document record's ``distributions[<of>@L]``.
_DISTRIBUTION_FIELD = {"quantile": "counts", "max": "max"}


def distributions(values: dict) -> dict:
    """A scored document's ``distributions`` record from its per-document values: per summarised
    metric and length (``symkl@L``), its histogram ``counts`` and its exact ``max``."""
    out: dict[str, dict] = {}
    for name, value in values.items():
        metric_name, length, _ = catalogue.parse_key(name)
        metric = catalogue.get(metric_name)
        if metric is not None and metric.of is not None and value is not None:
            out.setdefault(key(metric.of, length), {})[_DISTRIBUTION_FIELD[metric.pool]] = value
    return out


def scored_documents(records: list[dict]) -> int:
    """The number of documents scored (not skipped), from their records."""
    return sum(1 for r in records if not r["skipped"])


def documents_digest(records: list[dict]) -> str:
    """``measured.documents``: the sha1 of the scored documents' (doc_index, text sha1), in doc_index order."""
    scored = [(r["doc_index"], r["sha1"]) for r in sorted(records, key=lambda r: r["doc_index"]) if not r["skipped"]]
    return hashlib.sha1(json.dumps(scored).encode()).hexdigest()


def document_values(record: dict, aggs: dict) -> dict:
    """What ``process_results`` gave for one document, rebuilt from its record (for the metrics
    of ``aggs``): a scored document's (numerator, denominator) sums, None for every metric of a
    skipped one, a distribution summary's histogram counts or maximum, the skipped flag, the record
    itself. The ``approximate`` flag (pooled by maximum) is not recorded per document and is left out.
    """
    skipped = bool(record["skipped"])
    values = {}
    for name in aggs:
        metric_name, length, _ = catalogue.parse_key(name)
        metric = catalogue.get(metric_name)
        summary = (record.get("distributions") or {}).get(key(metric.of, length), {}) if metric.of else {}
        if metric.pool == "documents":
            values[name] = record
        elif metric.pool == "count":
            values[name] = int(skipped)
        elif metric.pool == "ratio" and (skipped or name in record["sums"]):
            values[name] = None if skipped else tuple(record["sums"][name])
        elif metric.of is not None and (skipped or _DISTRIBUTION_FIELD[metric.pool] in summary):
            values[name] = None if skipped else summary[_DISTRIBUTION_FIELD[metric.pool]]
    return values


def _data_keys(config: dict, metadata: dict) -> dict:
    """The data keys this task's loader reads (with their values); any other data key is an error."""
    loader = getattr(config.get("custom_dataset"), "__name__", "")
    used = LOADER_KEYS.get(loader, DATASET_KEYS)
    stray = sorted(k for k in DATASET_KEYS if k in metadata and k not in used)
    if stray:
        raise ValueError(
            f"task {config.get('task')} reads no data key(s) {stray} (its documents come from the "
            f"`{loader}` loader, which reads {list(used) or 'no data keys'}); use a longshort_*_local task "
            "for your own files, or drop the key(s)"
        )
    return {k: metadata[k] for k in used if k in metadata}


def _keyppl(pairs) -> float:
    """keyppl, saying why when it is NaN (no target was a key token)."""
    value = aggregate.perplexity(pairs)
    if math.isnan(value):
        log.warning(
            "keyppl is NaN: no target is a key token (key_frac = 0): long context helped no "
            "target by more than alpha nats with a confident long-context prediction"
        )
    return value


def _keyppl_stderr(pairs) -> float:
    """The delta-method error of keyppl; NaN when fewer than 2 documents hold key tokens.

    A document without key tokens contributes (0, 0), so with all key tokens in one document
    every residual a_d - R·b_d is 0 and the formula gives 0: an artefact, not certainty.
    """
    if sum(1 for pair in pairs if pair is not None and pair[1] > 0) < 2:
        return math.nan
    return aggregate.perplexity.stderr(pairs)


_keyppl.stderr = _keyppl_stderr  # type: ignore[attr-defined]
# A pooled ratio's aggregation by the catalogue's transform; metrics with their own rule.
_RATIO = {"identity": aggregate.pooled_ratio, "exp": aggregate.perplexity, "bits": aggregate.bits_per_byte}
_SPECIAL = {"keyppl": _keyppl}


class PerplexityTask(_LongShortTask):
    """``longshort_ppl_*``: ppl@L, bpb@L, ppl@max (+ keyppl, key_frac for ladder; ppl_pos@L for
    truncate), skipped_docs."""

    KIND = "ppl"

    def _per_doc_values(self, response: dict) -> dict:
        values = {}
        by_length = {r["L"]: r for r in response["records"]}
        for n in self.settings.lengths:
            values[key("ppl", n)] = (by_length[n]["nll_sum"], by_length[n]["n_targets"])
        for n in self.settings.lengths:
            values[key("bpb", n)] = (by_length[n]["nll_sum"], by_length[n]["n_bytes"])
        if "positions" in response:  # truncate: the targets since the previous length
            for n in self.settings.lengths:
                values[key("ppl_pos", n)] = (by_length[n]["pos_nll_sum"], by_length[n]["pos_n_targets"])
        values["ppl@max"] = values[key("ppl", self.settings.longest)]
        if "key_tokens" in response:
            tokens = response["key_tokens"]
            values["keyppl"] = (tokens["key_nll_sum"], tokens["n_key"])
            values["key_frac"] = (tokens["n_key"], tokens["n_targets"])
        return values


class MisalignTask(_LongShortTask):
    """``longshort_misalign_*``: sce@L, symkl@L, js@L, top1@L, tv@L, approximate, skipped_docs;
    in dense mode also dp@L and the distribution of symkl (its percentiles and maximum per L).

    ``approximate`` is 1.0 when the backend approximated (vllm's top-K dense mode), else 0.0.
    """

    KIND = "misalign"

    def _per_doc_values(self, response: dict) -> dict:
        mode, lengths = response["mode"], self.settings.lengths
        reported = [m for m in catalogue.metrics("misalign", per_length=True) if not m.only or mode in m.only]
        names = [m.name for m in reported if m.pool == "ratio"]
        sums = {(m, n): 0.0 for m in names for n in lengths}
        counts = dict.fromkeys(lengths, 0)
        if mode == "last":
            for pair in response["pairs"]:
                counts[pair["long_len"]] += 1
                for m in names:
                    sums[(m, pair["long_len"])] += pair[m]
        else:
            for group in response["groups"]:
                counts[group["L"]] += group["n_positions"]
                for m in names:
                    sums[(m, group["L"])] += group[f"{m}_sum"]
        values = {key(m, n): (sums[(m, n)], counts[n]) for m in names for n in lengths}
        groups = {g["L"]: g for g in response.get("groups", [])}  # dense: one group per length
        for metric in (m for m in reported if m.of is not None):
            for n in lengths:
                found = groups[n][f"{metric.of}_hist"] if metric.pool == "quantile" else groups[n][f"{metric.of}_max"]
                values[key(metric.name, n)] = found
        values["approximate"] = float(bool(response.get("approximate", False)))
        return values
