"""`SearchConfig`: every setting of one sweep, resolved once, saved as RUN/search_config.json.

The saved file is what `--resume` reloads, so a resumed sweep searches the same space with the
same budget whatever flags the second command line carries.

Like every config dataclass of the project it checks itself when made: a bad value raises
`ConfigError` (a `ValueError`; the CLI prints it as one line), and `from_dict` rejects unknown keys.
A partial `space` is completed with the defaults of search/space.py.
"""
from __future__ import annotations

import dataclasses
import json
import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cxr_datasets.errors import ConfigError
from cxr_datasets.storage import Location, is_uri
from cxr_model.config import EXPORT_FORMATS, THRESHOLD_METHODS, EvalConfig, check_formats, normalise_weights, reject_unknown
from cxr_search.space import check_points, resolve_space

CONFIG_FILE = "search_config.json"
EXPERIMENT_NAME = "tune"  # Tune's experiment folder inside the storage location


@dataclass(frozen=True)
class SearchConfig:
    prepared: str                     # the `cxr prepare` output (a folder or s3:// gs:// file:// URI)
    out: str                          # the run folder: config, results, report, best model
    trials: int = 32                  # TPE needs ~10 random start-up trials before it models anything
    max_epochs: int = 20              # ASHA's max_t: the budget of a trial that is never stopped
    grace_period: int = 2             # epochs every trial gets before ASHA may stop it
    reduction_factor: int = 3         # ASHA keeps the top 1/3 at each rung (2 -> 4 -> 8 ... epochs)
    concurrency: int = 4              # trials at once: 4 x 0.25 GPU; also how stale TPE's view may be
    gpus_per_trial: float | None = None  # None: 0.25 if the cluster has GPUs, else 0 (CPU only)
    cpus_per_trial: float = 1.0       # input pipeline + host work; trials on CPU get this many threads
    weights: str | None = "imagenet"  # "imagenet" | None (random init; tests, demo) | path to weights
    address: str | None = None        # None: a local Ray; "auto" or ray://HOST:10001 for a cluster
    storage: str | None = None        # experiment state + checkpoints: a folder or s3:// / gs://; None: `out`
    optuna_storage: str | None = None  # Optuna study URL (a database); None: in Tune's searcher state
    study: str | None = None          # the Optuna study's name, fixed when the sweep starts
    max_failures: int = 2             # retries of a trial whose worker died, from its last checkpoint
    seed: int = 0                     # TPE's sampler and every trial's TrainConfig.seed
    patience: int = 5                 # fit's own early stopping (epochs without val AUC improvement)
    n_boot: int = EvalConfig.n_boot   # bootstrap resamples for the test metrics' intervals
    threshold_method: str = EvalConfig.threshold_method  # how the threshold is chosen on validation
    space: dict[str, Any] = field(default_factory=dict)  # search/space.py's; a partial one is completed
    points_to_evaluate: tuple[dict[str, Any], ...] = ()  # configurations the study runs first, in order
    #                                   (Optuna's names: head_units_1 ...); benches give two sweeps the same ones
    feature_cache_dir: str | None = None  # None: a node-local temp folder (each node computes once)
    feature_cache: bool = True        # frozen, unaugmented trials train on cached VGG16 features
    asha: bool = True                 # early stopping by ASHA; False runs every trial to max_epochs
    cv: int = 0                       # 0: one validation split; K >= 2: patient-grouped K-fold CV of train + val
    refit: bool = False               # with cv: export the best config retrained on all of train + val
    verbose: int = 1                  # Tune's console output: 0 silent, 1 status table, 2 per result
    formats: tuple[str, ...] = EXPORT_FORMATS  # RUN/best/'s model files (cxr_model.config.EXPORT_FORMATS)
    mlflow: str | None = None         # MLflow tracking URI: one MLflow run per trial (pip install 'cxr-tune[mlflow]')
    prepared_hash: str | None = None  # sha256 of PREPARED's manifest.json when the sweep started;
    #                                   a resume refuses other data (set by run_search)

    def __post_init__(self):
        # "none", "null" and "" (flags, JSON) mean random init, as in ModelConfig
        object.__setattr__(self, "weights", normalise_weights(self.weights))
        # the complete space: the defaults with this config's entries replacing theirs, validated
        object.__setattr__(self, "space", resolve_space(self.space, source="space"))
        # a tuple (a JSON list when loaded), each point checked against the complete space
        object.__setattr__(self, "points_to_evaluate", check_points(self.points_to_evaluate, self.space))
        object.__setattr__(self, "formats", check_formats(self.formats))  # a JSON list, "keras,onnx": a tuple
        for name in ("trials", "max_epochs", "grace_period", "concurrency", "n_boot"):
            _at_least(self, name, 1)
        _at_least(self, "reduction_factor", 2)  # 1 would keep every trial at every rung
        _at_least(self, "max_failures", -1)     # -1: retry without limit (Tune's convention)
        _at_least(self, "seed", 0)
        _at_least(self, "cv", 0)
        if self.cv == 1:
            raise ConfigError("cv must be 0 (one validation split) or a number of folds >= 2, got 1")
        if self.refit and not self.cv:
            raise ConfigError("refit retrains the best configuration of a cross-validated sweep: give cv >= 2")
        _at_least(self, "patience", 1)
        _at_least(self, "verbose", 0)
        for name, low in (("gpus_per_trial", 0.0), ("cpus_per_trial", 0.0)):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not value >= low):
                raise ConfigError(f"{name} must be a number >= {low:g}, got {value!r}")
        if self.threshold_method not in THRESHOLD_METHODS:
            raise ConfigError(f"threshold_method must be one of {', '.join(THRESHOLD_METHODS)}, "
                              f"got {self.threshold_method!r}")
        if self.address and self.address.startswith("ray://") and not (
                self.storage and is_uri(self.storage) and self.optuna_storage):
            # Ray Client runs Tune (and the Optuna searcher) on the cluster, while this machine
            # reads the results: both sides must reach the storage and the study.
            raise ConfigError("with address ray://... give storage s3://... (--storage) and optuna_storage URL "
                              "(--optuna-storage) that the cluster and this machine both reach (or submit the "
                              "command with `ray job submit`)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "SearchConfig":
        reject_unknown(cls, values)
        return cls(**values)

    @property
    def run_dir(self) -> Path:
        return Path(self.out)

    @property
    def storage_path(self) -> str:
        """Where Tune keeps experiment state and checkpoints (absolute for local folders)."""
        return _storage_path(self.storage or self.out)

    @property
    def experiment_path(self) -> str:
        return f"{self.storage_path}/{EXPERIMENT_NAME}"

    @property
    def study_name(self) -> str:
        # Named after the run folder, so sweeps sharing one PostgreSQL database stay apart; saved
        # once set, so a sweep resumed into another folder (a new head) keeps its study.
        return self.study or f"cxr-{self.run_dir.resolve().name}"

    @property
    def optuna_url(self) -> str:
        """The study's database: --optuna-storage, else the SQLite copy written to RUN/optuna.db
        after the sweep (the live study is in Tune's searcher state, see search/tuner.py)."""
        return self.optuna_storage or f"sqlite:///{(self.run_dir / 'optuna.db').resolve()}"

    @property
    def remote_storage(self) -> bool:
        """--storage is a URI (s3://, gs://, file://): the run's state also goes there."""
        return bool(self.storage and is_uri(self.storage))

    def save(self) -> Path:
        path = self.run_dir / CONFIG_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"
        path.write_text(text)
        if self.storage and Path(self.storage_path) != self.run_dir.resolve():
            # The whole run's state lives in --storage: `--resume --storage URI` on another
            # machine, in an empty folder, starts from this copy.
            write_to_storage(f"{self.storage_path}/{CONFIG_FILE}", text.encode())
        return path

    @classmethod
    def load(cls, run_dir: str | Path) -> "SearchConfig":
        return cls.from_dict(json.loads((Path(run_dir) / CONFIG_FILE).read_text()))

    @classmethod
    def load_from_storage(cls, storage: str) -> "SearchConfig | None":
        """The config a sweep saved in `storage` (a folder or URI), or None when there is none."""
        data = read_from_storage(f"{_storage_path(storage)}/{CONFIG_FILE}")
        return None if data is None else cls.from_dict(json.loads(data))


def _storage_path(storage: str) -> str:
    return storage.rstrip("/") if is_uri(storage) else str(Path(storage).resolve())


def write_to_storage(uri: str, data: bytes) -> str:
    """Write `data` to a local path or a pyarrow URI (s3://, gs://, file://); returns `uri`."""
    target = Location.of(uri)
    target.fs.create_dir(posixpath.dirname(target.path), recursive=True)
    target.write_bytes(data)
    return uri


def read_from_storage(uri: str) -> bytes | None:
    """The bytes at a local path or pyarrow URI, or None when there is no such file."""
    source = Location.of(uri)
    return source.read_bytes() if source.kind() == "file" else None


def _at_least(cfg: SearchConfig, name: str, low: int) -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
