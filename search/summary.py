"""The console summary of a search (`cxr search`, `cxr demo`): the top trials and, once the sweep
is complete, the best trial's test metrics and where its model, report and results are."""
from __future__ import annotations

from typing import Any

from cxr_model.config import METRIC_LABEL
from cxr_model.evaluate import DISPLAY_ORDER
from cxr_search.config import SearchConfig
from cxr_search.space import METRIC, result_params


def print_summary(cfg: SearchConfig, summary: dict[str, Any]) -> int:
    table = summary["table"]
    print()
    print(_top_trials(table))
    if not summary["finished"]:
        print(f"\nThe sweep was interrupted ({len(table)} of {cfg.trials} trials so far). Continue it with:\n"
              f"  cxr search {cfg.prepared} --out {cfg.out} --resume")
        return 130
    best = summary["best"]
    test = best["metrics"]["test"]
    print(f"\nBest trial {best['trial_id']}: {METRIC_LABEL} {best[METRIC]:.4f}; "
          f"threshold {best['threshold']:.3f} (chosen on {'out-of-fold predictions' if cfg.cv else 'validation'})")
    if cfg.cv:
        cv, single = best["cv"], best["cv"]["best_fold"]["test_roc_auc"]["value"]
        print(f"Exported: {cv['exported']}; out-of-fold roc_auc {cv['oof_roc_auc']['value']:.4f}; test roc_auc of "
              f"the fold ensemble {cv['ensemble_test_roc_auc']['value']:.4f}, of the best single fold model {single:.4f}")
    print("Test split, evaluated once (95% bootstrap intervals):")
    for name in DISPLAY_ORDER:
        m = test[name]
        print(f"  {name:<12} {m['value']:.4f}  [{m['ci_low']:.4f}, {m['ci_high']:.4f}]")
    print(f"\nModel:   {best['model_dir']}\nReport:  {summary['report']}\n"
          f"Results: {cfg.run_dir / 'results.csv'}\nOptuna:  optuna-dashboard {cfg.optuna_url}")
    return 0


def _top_trials(table, n: int = 10) -> str:
    cols = ["trial_id", METRIC, "epochs_run", "stopped_by", *result_params()]
    shown = table[[c for c in cols if c in table]].head(n)
    return f"Top {len(shown)} of {len(table)} trials by {METRIC_LABEL}:\n" + shown.to_string(
        index=False, float_format=lambda v: f"{v:.4g}")
