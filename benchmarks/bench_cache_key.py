"""What the resume cache's weight digest costs against a run it keys (CPU): prints, asserts nothing.

Times the engine identity of the embedded model (SHA-256 over every parameter byte, in memory)
and one `longshort_ppl_shakespeare` evaluation (one play, the quick-start lengths) through
lm-eval's simple_evaluate, and prints the share of the run the digest takes. Also times a file
digest of the model folder, first (hashing) and second (remembered) call.

Usage: .venv/bin/python benchmarks/bench_cache_key.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time

from _common import embedded_hflm


def best_of(repeat: int, fn) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    import os

    import lm_eval
    from harness_run import INSTALLED_TASKS
    from lm_eval.tasks import TaskManager

    from lm_eval_longshort.assets import prepare
    from lm_eval_longshort.backends import fingerprint

    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    lm, model, _ = embedded_hflm()
    n_bytes = fingerprint.tensor_bytes(list(model.named_parameters()))
    digest = best_of(args.repeat, lambda: fingerprint.hf_identity(model))
    print(f"in-memory digest: {n_bytes / 2**20:.0f} MiB of parameters in {digest:.3f} s")

    meta = {"lengths": [1024, 2048, 4096]}
    tm = TaskManager(include_path=str(INSTALLED_TASKS), include_defaults=False, metadata=meta)

    def run():
        lm_eval.simple_evaluate(model=lm, tasks=["longshort_ppl_shakespeare"], limit=1, task_manager=tm)

    run_s = best_of(1, run)  # includes one digest: the identity is part of every run
    print(f"one run (1 play, lengths {meta['lengths']}): {run_s:.2f} s")
    print(f"digest share of the run: {digest / run_s:.2%}")

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["LM_EVAL_LONGSHORT_CACHE"] = tmp  # an empty digest store
        folder = prepare(progress=False).model_dir
        first = best_of(1, lambda: fingerprint.files_digest(folder))
        again = best_of(args.repeat, lambda: fingerprint.files_digest(folder))
    print(f"file digest of the model folder: first {first:.3f} s (hashing), then {again * 1000:.1f} ms (remembered)")


if __name__ == "__main__":
    main()
