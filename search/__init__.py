"""search: the hyperparameter sweep, its results, the best model on test, the report, the `cxr` CLI.

    space.py       the search space as data, the metric (val_auc, max), space files
    config.py      SearchConfig: every setting of a sweep, saved as RUN/search_config.json
    trainable.py   the Tune trainable (one trial = one cxr_model.fit)
    trial_reporter.py  inside a trial: the Keras callback that reports each epoch to Tune and
                   checkpoints the trial's best weights
    tuner.py       Tuner + OptunaSearch + ASHA, resume, Ray connection
    shared_data.py the sweep's train + val in the object store, loaded by a Ray task
    tracking.py    what a sweep leaves beside Tune's state: RUN/optuna.db, MLflow runs
    study_storage.py  the Optuna study the driver holds (optuna.db is copied from it)
    ray_adapter.py the one place that relies on Ray internals (each pinned by a test)
    results.py     RUN/results.{parquet,csv}: one row per trial
    best.py        best trial -> checkpoint -> test (once) -> RUN/best/
    sweep_report.py  after the sweep: RUN/report.md and its plots
    run.py         all of the above in order
    cli.py, demo.py  the `cxr search` and `cxr demo` subcommands
    main.py        the `cxr` program: wires every package's cli.py into one parser

Only this package imports `ray.tune`, and only inside functions: `import cxr_search` stays light.
"""
