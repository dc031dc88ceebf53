"""The offline environment of the test suite: set in this process by conftest.py, given to every
subprocess the tests start (the lm_eval CLI, lm-eval-longshort, accelerate, bash).

No imports beyond the standard library: conftest.py reads this before lm-eval, datasets or
huggingface_hub are imported (they read these variables at import).
"""

from __future__ import annotations

import os

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def offline_env(**extra: str) -> dict[str, str]:
    """This process's environment with the offline variables, then ``extra`` (PATH, PYTHONPATH, ...)."""
    return {**os.environ, **OFFLINE, **extra}
