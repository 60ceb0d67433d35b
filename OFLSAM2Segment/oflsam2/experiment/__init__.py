"""Few-shot experiments from a YAML file: ``oflsam2 experiment CONFIG``.

For every support group x query case x method the engine segments the query from support
volumes (cross-volume protocol: nothing is annotated in the query, unless a method run sets
``annotate_query``), the result is scored per label, and the prediction, a metrics CSV and a
montage are written; at the end a table gives mean ± std over groups (per method and label,
and the mean over labels). A case whose metrics file exists is skipped, so an interrupted run
resumes where it stopped.

The modules import one way, each only from those before it: :mod:`.config` (the file's format
and checks) → :mod:`.draws` (support draws, seeds) → :mod:`.tables` (results) → :mod:`.run`
(the grid, resuming) → :mod:`.cli` (the subcommand).

Output folder::

    run.json                          the draw and settings (a re-run must match them)
    group_<g>/<method>/<case>/        prediction.nii.gz, metrics.csv, montage.png, info.json
    group_<g>/supports/<case>.png     drawn support planes (slices mode)
    cases.csv  results.csv  results.md  dice_boxplot.png

Metrics come from each label's own binary result; the prediction file holds them composed
into one label map (where two labels overlap the later one in ``labels`` wins).
"""

from .cli import register_experiment_command, run_experiment_command
from .config import SUPPORT_MODES, Case, ExperimentConfig, MethodRun, SupportProtocol, load_config
from .draws import CaseInfo, CaseLoader, LoadedCase, draw_groups, run_seeds, scan_cases, support_references
from .run import METRICS_FILE, NORMALISED_PRESET, PREDICTION_FILE, cached_volumes, default_engine_factory, run_experiment
from .tables import CASE_COLUMNS, RESULT_KEYS, ExperimentOutcome, results_markdown, summarize_groups, write_tables

__all__ = [
    "CASE_COLUMNS",
    "METRICS_FILE",
    "NORMALISED_PRESET",
    "PREDICTION_FILE",
    "RESULT_KEYS",
    "SUPPORT_MODES",
    "Case",
    "CaseInfo",
    "CaseLoader",
    "ExperimentConfig",
    "ExperimentOutcome",
    "LoadedCase",
    "MethodRun",
    "SupportProtocol",
    "cached_volumes",
    "default_engine_factory",
    "draw_groups",
    "load_config",
    "register_experiment_command",
    "results_markdown",
    "run_experiment",
    "run_experiment_command",
    "run_seeds",
    "scan_cases",
    "summarize_groups",
    "support_references",
    "write_tables",
]
