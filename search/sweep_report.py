"""RUN/report.md and its plots: what was searched, what won, and how it did on test.

Plots (RUN/plots/): learning curves of the top trials, each hyperparameter against the metric,
Optuna's parameter importances, and Optuna's own optimisation history, parallel coordinates and
intermediate values (what ASHA saw per epoch), which show the order of the trials and how the
parameters combine, something the per-parameter scatter cannot; the confusion matrix and ROC are the export's own
(RUN/best/plots/), linked rather than redrawn. Figures use matplotlib's Figure + Agg canvas, never
pyplot (no global state, no display). Only Optuna's plots need pyplot: each figure is closed
after saving, and the Agg backend is chosen when pyplot is not loaded yet (a notebook keeps its own).
"""
from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from cxr_datasets.figures import DPI, new_figure, save_figure
from cxr_model.config import METRIC_LABEL
from cxr_model.evaluate import DISPLAY_ORDER
from cxr_search.config import SearchConfig
from cxr_search.folds import FOLDS_DONE
from cxr_search.results import epoch_columns, fold_columns
from cxr_search.space import HYPERPARAMETERS, METRIC, describe, result_params

TOP_CURVES = 6      # learning curves drawn (more is unreadable)
TOP_TABLE = 20      # trials listed in the report's table
REPORT_FILE = "report.md"
PLOTS_DIR = "plots"


def write_report(cfg: SearchConfig, table: pd.DataFrame, best: dict[str, Any], *,
                 wall_time_s: float | None = None) -> Path:
    plots = write_plots(cfg, table)
    optuna_plots, skipped = write_optuna_plots(cfg, cfg.run_dir / PLOTS_DIR)
    plots.update(optuna_plots)
    chosen_on = "out-of-fold predictions" if cfg.cv else "validation"
    text = "\n".join([
        f"# cxr-tune sweep report: `{cfg.run_dir.name}`",
        "",
        _summary(cfg, table, wall_time_s),
        "## Best trial",
        "",
        _best_section(best, cfg),
        *([_cv_section(cfg, best)] if cfg.cv else []),
        f"## Test metrics (evaluated once, threshold chosen on {chosen_on})",
        "",
        _metrics_table(best["metrics"], "out-of-fold" if cfg.cv else "validation"),
        "",
        f"![confusion matrix]({_rel(cfg, best['model_dir'] / 'plots' / 'confusion_test.png')}) "
        f"![ROC]({_rel(cfg, best['model_dir'] / 'plots' / 'roc_test.png')})",
        "",
        "## Calibration and operating points",
        "",
        _calibration_section(best["metrics"], "out-of-fold" if cfg.cv else "validation"),
        "",
        f"![precision-recall]({_rel(cfg, best['model_dir'] / 'plots' / 'pr_test.png')}) "
        f"![reliability]({_rel(cfg, best['model_dir'] / 'plots' / 'reliability_test.png')})",
        "",
        "## Trials",
        "",
        _trials_table(table, cfg),
        "",
        "## Plots",
        "",
        *[f"![{name}]({_rel(cfg, path)})\n" for name, path in plots.items()],
        *[f"Not drawn: {name} ({why}).\n" for name, why in skipped.items()],
        "## Search space",
        "",
        "```",
        describe({k: cfg.space[k] for k in HYPERPARAMETERS if k in cfg.space}),
        "```",
        "",
        f"Search settings: `{cfg.run_dir / 'search_config.json'}`. All trials: `results.csv`, "
        f"`results.parquet`. Optuna study `{cfg.study_name}` in `{cfg.optuna_url}` "
        "(open it with `optuna-dashboard <url>`).",
        "",
    ])
    path = cfg.run_dir / REPORT_FILE
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------- sections


def _summary(cfg: SearchConfig, table: pd.DataFrame, wall_time_s: float | None) -> str:
    counts = table["stopped_by"].value_counts().to_dict()
    parts = ", ".join(f"{n} {why}" for why, n in sorted(counts.items()))
    wall = f" in {wall_time_s / 60:.1f} min" if wall_time_s else ""
    nodes = table["node_id"].nunique()
    if cfg.cv:
        used = int(table["epochs_run"].sum())
        budget = (f"{cfg.cv}-fold patient-grouped cross-validation of train + val, up to {cfg.max_epochs} epochs "
                  f"per fold (ASHA on folds: every trial runs fold 1, reduction factor {cfg.reduction_factor}); "
                  f"{used} trial-epochs in all, against {len(table) * cfg.cv * cfg.max_epochs} for every trial's "
                  f"full CV at the epoch budget")
    else:
        budget = (f"up to {cfg.max_epochs} epochs each "
                  f"(ASHA grace {cfg.grace_period}, reduction factor {cfg.reduction_factor})")
    return (f"{len(table)} trials{wall} on {nodes} node(s), {budget}; ended by: {parts}. "
            f"Prepared data: `{cfg.prepared}`{_data_hash(cfg)}; base weights: "
            f"{cfg.weights or 'none (random init)'}.\n")


def _data_hash(cfg: SearchConfig) -> str:
    return f" (manifest sha256 `{cfg.prepared_hash[:12]}...`)" if cfg.prepared_hash else ""


def _best_section(best: dict[str, Any], cfg: SearchConfig | None = None) -> str:
    params = "\n".join(f"| {k} | {_fmt(v)} |" for k, v in best["params"].items())
    if cfg is not None and cfg.cv:
        cv = best["cv"]
        return (f"Trial `{best['trial_id']}`: {METRIC_LABEL} {_pm(cv[f'{METRIC}_mean'], cv[f'{METRIC}_se'])} "
                f"over {cfg.cv} folds (median best epoch {best['best_epoch']}); decision threshold "
                f"{best['threshold']:.4f} ({best['threshold_method']}, on the out-of-fold predictions of train + val). "
                f"Exported to `{best['model_dir']}`.\n\n| parameter | value |\n|---|---|\n{params}\n")
    return (f"Trial `{best['trial_id']}`: {METRIC_LABEL} {best[METRIC]:.4f} at epoch {best['best_epoch']}; "
            f"decision threshold {best['threshold']:.4f} ({best['threshold_method']}, on validation). "
            f"Exported to `{best['model_dir']}`.\n\n| parameter | value |\n|---|---|\n{params}\n")


def _metrics_table(metrics: dict[str, Any], val_label: str = "validation") -> str:
    lines = [f"| metric | test | 95% CI | {val_label} |", "|---|---|---|---|"]
    for name in DISPLAY_ORDER:
        test, val = metrics["test"][name], metrics["val"][name]
        lines.append(f"| {name} | {_fmt(test['value'])} | {_fmt(test['ci_low'])} - {_fmt(test['ci_high'])} "
                     f"| {_fmt(val['value'])} |")
    (tn, fp), (fn, tp) = metrics["test"]["confusion_matrix"]
    lines.append(f"\nTest n = {metrics['test']['n']}: TN {tn}, FP {fp}, FN {fn}, TP {tp}.")
    return "\n".join(lines)


def _calibration_section(metrics: dict[str, Any], val_label: str = "validation") -> str:
    """Threshold-free scores (AUPRC, Brier, ECE, AUC with DeLong's interval) and sensitivity /
    specificity at the operating points chosen on validation, for test and validation."""
    test, val = metrics["test"], metrics["val"]
    lines = [f"| score | test | 95% CI | {val_label} |", "|---|---|---|---|"]
    for label, key in (("ROC AUC (DeLong CI)", "roc_auc_delong"), ("AUPRC (average precision)", "auprc"),
                       ("Brier score (lower is better)", "brier")):
        t = test[key]
        lines.append(f"| {label} | {_fmt(t['value'])} | {_fmt(t['ci_low'])} - {_fmt(t['ci_high'])} "
                     f"| {_fmt(val[key]['value'])} |")
    lines.append(f"| ECE, 10 bins (lower is better) | {_fmt(test['ece'])} | | {_fmt(val['ece'])} |")
    points = test.get("operating_points") or []
    if points:
        lines += ["", f"Operating points (threshold chosen on {val_label}, applied unchanged to test; "
                  "Wilson 95% intervals):", "",
                  "| operating point | threshold | test sensitivity | test specificity | val sensitivity | val specificity |",
                  "|---|---|---|---|---|---|"]
        for t_op, v_op in zip(points, val.get("operating_points") or points):
            lines.append(f"| {t_op['name']} | {_fmt(t_op['threshold'])} | {_ci(t_op['sensitivity'])} "
                         f"| {_ci(t_op['specificity'])} | {_fmt(v_op['sensitivity']['value'])} "
                         f"| {_fmt(v_op['specificity']['value'])} |")
    return "\n".join(lines)


def _ci(m: dict[str, Any]) -> str:
    return f"{_fmt(m['value'])} [{_fmt(m['ci_low'])}, {_fmt(m['ci_high'])}]"


def _trials_table(table: pd.DataFrame, cfg: SearchConfig | None = None) -> str:
    if cfg is not None and cfg.cv:
        table = table.assign(**{f"{METRIC} (CV mean ± SE)": [
            _pm(m, se) for m, se in zip(table[METRIC], table["cv_se"])]})
        cols = ["trial_id", f"{METRIC} (CV mean ± SE)", FOLDS_DONE, *fold_columns(table), "fold_best_epochs",
                "epochs_run", "stopped_by", *result_params(), "duration_s"]
    else:
        cols = ["trial_id", METRIC, "best_epoch", "epochs_run", "stopped_by", *result_params(), "duration_s"]
    shown = table[[c for c in cols if c in table]].head(TOP_TABLE)
    lines = ["| " + " | ".join(shown.columns) + " |", "|" + "---|" * len(shown.columns)]
    for _, row in shown.iterrows():
        lines.append("| " + " | ".join(_fmt(v) for v in row) + " |")
    more = f"\n({len(table) - TOP_TABLE} more in results.csv)" if len(table) > TOP_TABLE else ""
    return "\n".join(lines) + more


def _cv_section(cfg: SearchConfig, best: dict[str, Any]) -> str:
    """The folds of the best configuration and whether selection held: each exported candidate's
    selection-time score beside its test AUC."""
    cv = best["cv"]
    lines = ["## Cross-validation", "",
             f"{cfg.cv} patient-grouped, class-stratified folds of train + val (`folds.csv`: each patient's "
             f"fold); the best trial's {METRIC_LABEL}: {_pm(cv[f'{METRIC}_mean'], cv[f'{METRIC}_se'])} "
             f"(mean ± standard error over its folds). Exported: {cv['exported']}"
             + (" (one shared frozen VGG16 base)" if cv.get("shared_base") and not cv.get("refit") else "") + ".", "",
             "| fold | held-out images | " + METRIC_LABEL + " | best epoch | epochs run |", "|---|---|---|---|---|"]
    for f in cv["folds"]:
        lines.append(f"| {f['fold']} | {f['n_held_out']} | {_fmt(f[METRIC])} | {f['best_epoch']} | {f['epochs_run']} |")
    test = cv["ensemble_test_roc_auc"]
    oof = cv["oof_roc_auc"]
    refit = cv.get("refit")
    single = cv["best_fold"]["test_roc_auc"]
    fold = cv["best_fold"]["fold"]
    best_fold_val = next(f[METRIC] for f in cv["folds"] if f["fold"] == fold)
    lines += ["", "Did selection hold? Each model's score at selection time beside its test ROC AUC "
              "(95% bootstrap intervals):", "",
              "| model | selection-time score | test ROC AUC | 95% CI |", "|---|---|---|---|",
              f"| ensemble of the {cv['members']} fold models{'' if refit else ' (exported)'} "
              f"| out-of-fold ROC AUC {_fmt(oof['value'])} "
              f"| {_fmt(test['value'])} | {_fmt(test['ci_low'])} - {_fmt(test['ci_high'])} |",
              f"| best single fold model (fold {fold}) | its fold's {METRIC_LABEL} {_fmt(best_fold_val)} "
              f"| {_fmt(single['value'])} | {_fmt(single['ci_low'])} - {_fmt(single['ci_high'])} |"]
    if refit:
        r = refit["test_roc_auc"]
        lines.append(f"| refit on all of train + val, {refit['epochs']} epochs (exported) | none (no held-out images) "
                     f"| {_fmt(r['value'])} "
                     f"| {_fmt(r['ci_low'])} - {_fmt(r['ci_high'])} |")
    return "\n".join(lines) + "\n"


def _pm(mean: Any, se: Any) -> str:
    if se is None or (isinstance(se, float) and math.isnan(se)):
        return _fmt(mean)
    return f"{_fmt(mean)} ± {_fmt(se)}"


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, (float, np.floating)):
        return f"{value:.4g}"
    return str(value)


def _rel(cfg: SearchConfig, path: Path | str) -> str:
    try:
        return str(Path(path).resolve().relative_to(cfg.run_dir.resolve()))
    except ValueError:
        return str(path)


# ----------------------------------------------------------------------------- plots


def write_plots(cfg: SearchConfig, table: pd.DataFrame) -> dict[str, Path]:
    folder = cfg.run_dir / PLOTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    plots = {
        "learning curves of the top trials": plot_learning_curves(table, folder / "learning_curves.png",
                                                                  by_fold=bool(cfg.cv)),
        f"each hyperparameter against {METRIC_LABEL}": plot_params_vs_metric(
            table, cfg.space, folder / f"params_vs_{METRIC}.png"),
    }
    importance = plot_param_importances(cfg, folder / "param_importances.png")
    if importance is not None:
        plots["Optuna parameter importances"] = importance
    return plots


def plot_learning_curves(table: pd.DataFrame, path: Path, by_fold: bool = False) -> Path:
    """METRIC per epoch of the best trials; ASHA-stopped trials end early, marked x. With
    `by_fold` (a CV sweep) the best METRIC of each fold instead, fold after fold."""
    fig = new_figure(7, 4.2)
    ax = fig.subplots()
    cols = fold_columns(table) if by_fold else epoch_columns(table)
    unit = "fold" if by_fold else "epoch"
    finished = table[table[METRIC].notna()].head(TOP_CURVES)
    for _, row in finished.iterrows():
        values = row[cols].to_numpy(dtype=float)
        epochs = np.arange(1, len(values) + 1)
        keep = ~np.isnan(values)
        if not keep.any():  # a CV trial stopped inside fold 1 has no completed fold to draw
            continue
        line, = ax.plot(epochs[keep], values[keep], "-o", markersize=3,
                        label=f"{row['trial_id']} ({row[METRIC]:.3f}, {row['head_units']})")
        if row["stopped_early"]:
            ax.plot(epochs[keep][-1], values[keep][-1], "x", color=line.get_color(), markersize=9)
    ax.set(title=f"{METRIC_LABEL.capitalize()} per {unit}, top {len(finished)} trials (x: stopped early)",
           xlabel=unit, ylabel=METRIC_LABEL)
    ax.xaxis.get_major_locator().set_params(integer=True)  # a MaxNLocator: it takes integer=True
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return save_figure(fig, path)


def plot_params_vs_metric(table: pd.DataFrame, space: dict[str, Any], path: Path) -> Path:
    """One panel per searched hyperparameter: each finished trial's best METRIC against it.

    A per-layer hyperparameter (the head's widths) is shown as two panels, its number of layers
    and its first layer's value; values that were fixed in the space (one value across the sweep)
    get no panel. Ranges are drawn on their own scale (log where the space samples on a log scale),
    choices as evenly spaced levels.
    """
    done = table[table[METRIC].notna()].copy()
    scales: dict[str, str | None] = {}
    for name in result_params():
        hp, spec = HYPERPARAMETERS[name], space.get(name)
        scale = ("log" if spec.get("log") else "linear") if isinstance(spec, dict) and "low" in spec else None
        if hp.per_layer:  # "512-128" -> layers 2, first 512
            values = done[name].astype(str).str.split("-")
            done[hp.per_layer] = values.str.len()
            done[f"{name}_1"] = values.str[0].astype(int)
            scales[hp.per_layer], scales[f"{name}_1"] = None, scale
        else:
            scales[name] = scale
    params = [p for p in scales if p in done and done[p].astype(str).nunique() > 1]
    ncols = 4
    nrows = max(1, math.ceil(len(params) / ncols))
    fig = new_figure(3.3 * ncols, 2.8 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, name in zip(axes, params):
        _param_panel(ax, done, name, scales[name])
    for ax in axes[len(params):]:
        ax.set_visible(False)
    fig.suptitle(f"Best {METRIC_LABEL} of each trial against each searched hyperparameter "
                 "(o: ran to the end, x: stopped early)", fontsize=9)
    return save_figure(fig, path)


def _param_panel(ax, done: pd.DataFrame, name: str, scale: str | None) -> None:
    values = done[name]
    if scale is not None:
        x = values.astype(float).to_numpy()
    else:  # categorical: evenly spaced levels, jittered a little so equal points stay visible
        levels = sorted(values.dropna().astype(str).unique(), key=_natural)
        position = {level: i for i, level in enumerate(levels)}
        jitter = np.random.default_rng(0).uniform(-0.12, 0.12, len(values))
        x = values.astype(str).map(position).to_numpy(dtype=float) + jitter
        ax.set_xticks(range(len(levels)), levels, fontsize=8)
    for early, marker in ((False, "o"), (True, "x")):
        pick = (done["stopped_early"] == early).to_numpy()
        ax.scatter(x[pick], done[METRIC].to_numpy()[pick], marker=marker, s=22, alpha=0.8)
    if scale == "log":
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 3.0)))  # 1e-4, 3e-4, 1e-3 ... / 100, 300
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_title(name, fontsize=9)
    ax.grid(alpha=0.3)


def _natural(text: str):
    try:
        return (0, float(text.split("-")[0]), text)
    except ValueError:
        return (1, 0.0, text)


def plot_param_importances(cfg: SearchConfig, path: Path) -> Path | None:
    """Optuna's parameter importances (its default evaluator) from the study; None when too few
    trials finished to estimate them."""
    import optuna  # with SQLAlchemy: ~1 s to import, and `cxr --help` imports this module

    study = optuna.load_study(study_name=cfg.study_name, storage=cfg.optuna_url)
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    if len(complete) < 2:
        return None
    try:
        with warnings.catch_warnings():  # "few trials per regime": the title gives the count
            warnings.simplefilter("ignore")
            importances = optuna.importance.get_param_importances(study)
    except (RuntimeError, ValueError):  # e.g. every trial sampled the same values
        return None
    if not importances:
        return None
    names = list(importances)[::-1]
    fig = new_figure(6, 0.45 * len(names) + 1.4)
    ax = fig.subplots()
    ax.barh(names, [importances[n] for n in names], color="tab:blue")
    ax.set(title=f"Optuna parameter importance for {METRIC_LABEL} ({len(complete)} trials)",
           xlabel="importance (normalised to sum to 1)")
    ax.grid(alpha=0.3, axis="x")
    return save_figure(fig, path)


OPTUNA_PLOTS = {  # report caption -> (file name, optuna.visualization.matplotlib function name)
    "Optuna optimisation history": ("optuna_history.png", "plot_optimization_history"),
    "Optuna parallel coordinates": ("optuna_parallel_coordinate.png", "plot_parallel_coordinate"),
    "Optuna intermediate values (per epoch)": ("optuna_intermediate_values.png", "plot_intermediate_values"),
}


def write_optuna_plots(cfg: SearchConfig, folder: Path) -> tuple[dict[str, Path], dict[str, str]]:
    """Optuna's own matplotlib plots of the study: ({caption: png}, {caption: why not drawn}).

    A plot Optuna cannot draw for this study (one trial, no intermediate values, ...) is skipped
    with its reason, never failing the report.
    """
    import matplotlib
    import optuna

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")  # no display needed; an already loaded pyplot keeps the user's backend
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as optuna_mpl

    drawn, skipped = {}, {}
    try:
        study = optuna.load_study(study_name=cfg.study_name, storage=cfg.optuna_url)
        complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    except Exception as exc:  # noqa: BLE001 - the report is written without these plots
        return {}, {caption: f"the study could not be read: {exc}" for caption in OPTUNA_PLOTS}
    for caption, (name, function) in OPTUNA_PLOTS.items():
        reason = _why_not(function, complete)
        if reason is None:
            try:
                drawn[caption] = _save_optuna(getattr(optuna_mpl, function), study, folder / name, plt)
            except Exception as exc:  # noqa: BLE001 - e.g. a plot Optuna cannot draw for one trial
                reason = f"Optuna could not draw it: {type(exc).__name__}: {exc}"
        if reason is not None:
            skipped[caption] = reason
    return drawn, skipped


def _why_not(function: str, complete) -> str | None:
    # Optuna draws empty axes (with a warning) in these cases: say so instead of linking a blank plot.
    if not complete:
        return "no trial completed"
    if function == "plot_parallel_coordinate" and len(complete) < 2:
        return "needs at least two completed trials"
    if function == "plot_intermediate_values" and not any(t.intermediate_values for t in complete):
        return "no trial reported intermediate values"
    return None


def _save_optuna(plot, study, path: Path, plt) -> Path:
    figures_before = set(plt.get_fignums())
    try:
        with warnings.catch_warnings():  # ExperimentalWarning: the matplotlib backend of optuna.visualization
            warnings.simplefilter("ignore")
            ax = plot(study)
        fig = (ax.flat[0] if isinstance(ax, np.ndarray) else ax).figure
        fig.set_dpi(DPI)
        fig.tight_layout()
        fig.savefig(path, dpi=DPI)
    finally:  # close what this plot opened, also when it failed half-way
        for number in set(plt.get_fignums()) - figures_before:
            plt.close(number)
    return path


