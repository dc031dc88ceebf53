"""The paper's training regularizer and the `finetune` demonstration.

regularizer  the loss ``L_LM + alpha · L_misalign`` (the dense task's definition) and a Trainer
checks       `finetune`'s up-front checks: options, outputs, held-out plays, training windows
finetune     the `finetune` command: options, training windows, one training per alpha
evaluation   `finetune`'s evaluation: the base model and the checkpoints as runs of one sweep
report       `finetune`'s report: training, held-out values, paired differences (compare's)

``from lm_eval_longshort.training import RegularizerConfig`` works as before. The regularizer's
names load on first use: the `finetune` command imports this package and must refuse a bad option
before torch and transformers are imported (tens of seconds on a busy machine).
"""

from __future__ import annotations

import importlib

# The regularizer's public names (regularizer.py's docstring says what each is).
_REGULARIZER_NAMES = (
    "DIVERGENCES",
    "LossTerms",
    "MisalignmentTrainer",
    "RegularizerConfig",
    "check_model",
    "check_windows",
    "default_gap_range",
    "dense_positions",
    "regularized_loss",
)

__all__ = list(_REGULARIZER_NAMES)


def __getattr__(name: str):
    if name in _REGULARIZER_NAMES:
        return getattr(importlib.import_module("lm_eval_longshort.training.regularizer"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
