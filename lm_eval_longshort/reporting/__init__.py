"""Read lm-eval results JSONs of the longshort tasks; tabulate, plot and compare runs.

One job per module:
  runs      load results files into Run objects (values, standard errors, longshort records)
  grouping  which results measured the same thing; how groups differ
  tables    the table renderer (text or Markdown) and what ``report`` prints
  plots     the figure (matplotlib, object API only; imported only when plotting)
  compare   paired differences, correlations (scipy.stats), CSV and Markdown output
"""

from lm_eval_longshort.reporting.compare import CompareResult, Correlation, Difference, compare_runs, pearson, spearman
from lm_eval_longshort.reporting.grouping import Group, describe_all, groups_by_kind
from lm_eval_longshort.reporting.plots import check_output_path, length_label, plot_runs
from lm_eval_longshort.reporting.runs import (
    MISALIGN_METRICS,
    PPL_METRICS,
    ReportingError,
    Run,
    load_runs,
    parse_metric_key,
    read_results_file,
)
from lm_eval_longshort.reporting.tables import (
    format_length_table,
    format_report,
    format_run_report,
    format_value,
    render_table,
)

__all__ = [
    "MISALIGN_METRICS",
    "PPL_METRICS",
    "CompareResult",
    "Correlation",
    "Difference",
    "Group",
    "ReportingError",
    "Run",
    "check_output_path",
    "compare_runs",
    "describe_all",
    "format_length_table",
    "format_report",
    "format_run_report",
    "format_value",
    "groups_by_kind",
    "length_label",
    "load_runs",
    "parse_metric_key",
    "pearson",
    "plot_runs",
    "read_results_file",
    "render_table",
    "spearman",
]
