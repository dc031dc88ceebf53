"""Read lm-eval results JSONs of the longshort tasks; tabulate, plot and compare runs.

Every metric's name, kind, transform, title and axis label come from the metric catalogue
(numerics/catalogue.py). One job per module:
  runs         load results files into Run objects (values, standard errors, longshort records)
  longtable    the long table every report builds on: a row per (run, task, metric, L) value
  grouping     which results measured the same thing; how groups differ
  differences  paired differences between rows, on the same documents
  correlation  Pearson / Spearman (scipy.stats) and percentile bootstrap intervals over runs
  writers      the one table renderer (text or Markdown) and CSV
  tables       what ``report`` prints
  plots        ``plot``'s figure (matplotlib, object API only; imported only when plotting)
  bands        the sweep report's figures: error bands, misalignment vs perplexity
  positions    loss against token position (truncate's per-position bins): pooled curves, figure
  compare      ``compare``: values, paired differences and correlations across runs
"""

from lm_eval_longshort.reporting.compare import CompareResult, compare_runs
from lm_eval_longshort.reporting.correlation import Correlation, bootstrap_intervals, correlate, pearson, spearman
from lm_eval_longshort.reporting.differences import Difference, between_lengths, between_runs, paired
from lm_eval_longshort.reporting.grouping import Group, describe_all, groups_by_kind
from lm_eval_longshort.reporting.longtable import Row, long_table, values_csv
from lm_eval_longshort.reporting.plots import (
    check_output_path,
    draw_distribution,
    draw_runs,
    length_label,
    plot_distribution,
    plot_runs,
)
from lm_eval_longshort.reporting.positions import PositionCurve, plot_positions, position_curve
from lm_eval_longshort.reporting.runs import (
    ReportingError,
    Run,
    load_runs,
    parse_metric_key,
    read_results_file,
    run_from_results,
)
from lm_eval_longshort.reporting.tables import format_length_table, format_report, format_run_report, format_value
from lm_eval_longshort.reporting.writers import csv_text, render_table, write_text

__all__ = [
    "CompareResult",
    "Correlation",
    "Difference",
    "Group",
    "ReportingError",
    "Row",
    "Run",
    "between_lengths",
    "between_runs",
    "bootstrap_intervals",
    "check_output_path",
    "compare_runs",
    "correlate",
    "csv_text",
    "describe_all",
    "draw_distribution",
    "draw_runs",
    "format_length_table",
    "format_report",
    "format_run_report",
    "format_value",
    "groups_by_kind",
    "length_label",
    "load_runs",
    "long_table",
    "paired",
    "parse_metric_key",
    "pearson",
    "plot_distribution",
    "plot_positions",
    "plot_runs",
    "position_curve",
    "PositionCurve",
    "read_results_file",
    "render_table",
    "run_from_results",
    "spearman",
    "values_csv",
    "write_text",
]
