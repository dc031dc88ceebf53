"""vLLM data parallelism through Ray: ``--model vllm`` with ``data_parallel_size=N`` in ``--model_args``.

With N > 1 lm-eval's ``VLLM`` starts no engine of its own; it keeps the arguments it would give
``vllm.LLM`` (``lm.model_args``) and the tokenizer. ``VLLMDataParallel.start`` starts N Ray actors
(``EngineReplica``), each holding ``vllm.LLM(**lm.model_args)`` and our engine on the route those
arguments give (a pooling engine: hidden states, any other: prompt log-probabilities), alive until
the process ends. Each actor asks Ray for ``tensor_parallel_size`` GPUs, or one CPU where the Ray
cluster has no GPUs (the CPU build of vLLM).

The harness scores a task in chunks of whole documents (``runner.score_chunks``); this engine
hands chunks to the actors, the largest (in input tokens) first, each to the next free actor, and
returns every chunk's results as the actor computed them. A chunk is the same engine call on any
actor, so numbers and per-document records equal ``data_parallel_size=1``'s.
"""

from __future__ import annotations

import collections
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import lm_eval_longshort
from lm_eval_longshort.protocols.requests import LengthLimitError, ScoringEngine

log = logging.getLogger(__name__)

# A private local Ray instance: the object store only carries documents and small summaries.
OBJECT_STORE_BYTES = 200 * 1024**2
# lm-eval's note: these leak from the driver into actors and make an inner DP=1 engine misplace itself.
DP_VARIABLES = ("VLLM_DP_RANK", "VLLM_DP_RANK_LOCAL", "VLLM_DP_SIZE", "VLLM_DP_MASTER_IP", "VLLM_DP_MASTER_PORT")


class EngineReplica:
    """One engine in one Ray actor: ``vllm.LLM(**engine_args)`` and our engine around it, built once."""

    def __init__(self, engine_args: dict, tokenizer, engine_kwargs: dict):
        for name in DP_VARIABLES:
            os.environ.pop(name, None)
        from vllm import LLM

        from lm_eval_longshort.backends.vllm import route_engine

        # The driver's tokenizer: responses decode bytes with exactly the tokenizer lm-eval built.
        self.engine = route_engine(LLM(**engine_args), tokenizer, hint=False, progress=False, **engine_kwargs)
        self.chunks = 0

    def facts(self) -> dict:
        """What the driver's checks read from an engine (``VLLMDataParallel``'s properties)."""
        e = self.engine
        return {
            "name": e.name,
            "max_length": e.max_length,
            "batch_tokens": e.batch_tokens,
            "position_dependent": e.position_dependent,
            "approximate_dense": e.approximate_dense,
            "length_hint": e.length_hint,
            "identity": e.identity(),
        }

    def length_problem(self, n_inputs: int, what: str) -> str | None:
        """The engine's own message for a request of ``n_inputs`` tokens that it cannot take, or None."""
        try:
            self.engine.check_lengths(n_inputs, what)
        except LengthLimitError as exc:
            return str(exc)
        return None

    def score(self, function: Callable, chunk):
        self.chunks += 1
        return function(self.engine, chunk)

    def request(self, method: str, args: tuple, kwargs: dict):
        return getattr(self.engine, method)(*args, **kwargs)

    def chunks_scored(self) -> int:
        return self.chunks


class VLLMDataParallel(ScoringEngine):
    """``data_parallel_size`` vLLM engines in Ray actors, answering as one engine (``map_chunks``)."""

    def __init__(self, actors: list, tokenizer, facts: dict):
        self.actors = actors
        self._tokenizer = tokenizer
        self.facts = facts
        self.batch_tokens = facts["batch_tokens"]

    @classmethod
    def start(cls, lm, **engine_kwargs) -> VLLMDataParallel:
        """Start ``lm.data_parallel_size`` engines with lm-eval's engine arguments; return once all run."""
        import ray

        n, tensor_parallel = int(lm.data_parallel_size), int(getattr(lm, "tensor_parallel_size", 1) or 1)
        private = connect(n)
        if ray.cluster_resources().get("GPU", 0) > 0:
            resources, env = {"num_gpus": tensor_parallel}, {}
        else:  # the CPU build: an actor asking for GPUs would never be scheduled; the engine core in the actor
            resources, env = {"num_cpus": 1}, {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
        if private:  # this copy of the package first on the actors' path (a source checkout too); a cluster's
            # nodes have it installed
            package_root = str(Path(lm_eval_longshort.__file__).resolve().parents[1])
            env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)
        # lm-eval's note: the inner engine (DP=1) must not itself use Ray (nested placement groups deadlock).
        engine_args = {k: v for k, v in lm.model_args.items() if k != "distributed_executor_backend"}
        replica = ray.remote(EngineReplica).options(**resources, runtime_env={"env_vars": env})
        log.info("starting %d vLLM engines in Ray actors (%s each)", n, resources)
        actors = [replica.remote(engine_args, lm.tokenizer, engine_kwargs) for _ in range(n)]
        facts = ray.get([a.facts.remote() for a in actors])
        if any(f != facts[0] for f in facts[1:]):  # the same weights and settings everywhere, or stop
            raise RuntimeError(f"the {n} data-parallel vLLM engines differ: {facts}")
        return cls(actors, lm.tokenizer, facts[0])

    def shutdown(self) -> None:
        """End the actors (their engines and memory); Ray itself stays up."""
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []

    # -- ScoringEngine properties: the replicas' -------------------------------------
    @property
    def name(self) -> str:  # the route's name: responses and the resume key equal data_parallel_size=1's
        return self.facts["name"]

    @property
    def max_length(self) -> int:
        return self.facts["max_length"]

    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def position_dependent(self) -> bool:
        return self.facts["position_dependent"]

    @property
    def approximate_dense(self) -> bool:
        return self.facts["approximate_dense"]

    @property
    def length_hint(self) -> str:
        return self.facts["length_hint"]

    def identity(self) -> dict:
        return dict(self.facts["identity"])

    def check_lengths(self, n_inputs: int, what: str) -> None:
        if n_inputs > self.max_length:  # the route's own message (the log-probability route has its own)
            import ray

            problem = ray.get(self.actors[0].length_problem.remote(n_inputs, what))
            raise LengthLimitError(problem or f"{what} needs {n_inputs} input tokens; {self.length_hint}")

    # -- work ---------------------------------------------------------------------------
    def map_chunks(self, score: Callable, chunks: Sequence, costs: Sequence[int]) -> Iterator[tuple[int, object]]:
        """Every chunk on some actor: the largest first, each to the next free actor; in finishing order."""
        import ray

        if 0 < len(chunks) < len(self.actors):
            log.warning(
                "%d chunks of documents for %d data-parallel engines: %d engines wait; a smaller batch_tokens "
                "(--metadata) makes more chunks",
                len(chunks),
                len(self.actors),
                len(self.actors) - len(chunks),
            )
        queue = collections.deque(sorted(range(len(chunks)), key=lambda k: -costs[k]))
        free = list(range(len(self.actors)))
        running: dict = {}  # object ref -> (chunk index, actor index)
        while queue or running:
            while queue and free:
                k, a = queue.popleft(), free.pop(0)
                running[self.actors[a].score.remote(score, chunks[k])] = (k, a)
            (done,), _ = ray.wait(list(running), num_returns=1)
            k, a = running.pop(done)
            free.append(a)
            yield k, ray.get(done)

    def chunks_per_replica(self) -> list[int]:
        """How many chunks each actor has scored (a check that the work was shared)."""
        import ray

        return ray.get([a.chunks_scored.remote() for a in self.actors])

    def _ask(self, method: str, *args, **kwargs):
        import ray

        return ray.get(self.actors[0].request.remote(method, args, kwargs))

    # Requests made directly (not through chunks) go to the first engine.
    def target_nll(self, windows, *, batch_tokens=None):
        return self._ask("target_nll", windows, batch_tokens=batch_tokens)

    def last_logprobs(self, prompts, *, batch_tokens=None):
        return self._ask("last_logprobs", prompts, batch_tokens=batch_tokens)

    def aligned_divergences(self, pairs, topk=256, *, batch_tokens=None):
        return self._ask("aligned_divergences", pairs, topk, batch_tokens=batch_tokens)


def connect(n_actors: int) -> bool:
    """Ray for the actors: the running one if this process has it, the cluster at ``RAY_ADDRESS``
    if set, else a private local instance with room for ``n_actors`` CPU actors (then True)."""
    import ray

    cluster = os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        return not cluster
    if cluster:
        ray.init(address=cluster)
        return False
    ray.init(
        address="local",
        num_cpus=max(n_actors, os.cpu_count() or 1),
        include_dashboard=False,
        object_store_memory=OBJECT_STORE_BYTES,
    )
    return True
