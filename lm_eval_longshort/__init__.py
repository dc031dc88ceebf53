"""lm-eval-longshort: long-context perplexity and Long-Short Misalignment for lm-evaluation-harness.

Layers (each imports only the ones above it):
- ``numerics``: divergences and token-weighted aggregation over tensors (no lm-eval);
- ``protocols``: settings, and documents -> scoring requests -> per-document summaries;
- ``backends``: engines that turn requests into numbers (``hf``; ``vllm`` imported only when used);
- ``harness``: lm-eval Task classes, the ``longshort_score`` request type, dataset loaders;
- ``assets``, ``reporting``, ``cli``: the embedded default, tables/plots/correlations, the command line.
"""

__version__ = "0.1.0"
