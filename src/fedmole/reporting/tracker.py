"""Optional experiment trackers for per-round metrics: `run.tracker = none | tensorboard | mlflow`.

Each tracker library is imported only when chosen (extras `fedmole[tensorboard]`,
`fedmole[mlflow]`). TensorBoard event files go to RUN_DIR/tensorboard
(`tensorboard --logdir RUN_DIR/tensorboard`); MLflow logs to its configured
tracking URI (MLFLOW_TRACKING_URI, default ./mlruns) under a run named after the
run directory, with the flattened config as parameters. Every numeric field of
a round's metrics row is logged with the round as step; each row is flushed at
once, so a run that stops early keeps what it logged.
"""

from __future__ import annotations

from pathlib import Path

TRACKERS = ("none", "tensorboard", "mlflow")


class Tracker:
    """No tracker: every call does nothing."""

    def log(self, row: dict) -> None:
        pass

    def close(self) -> None:
        pass


def numeric_fields(row: dict) -> dict[str, float]:
    """The numeric fields of a metrics row except the round number (booleans left out)."""
    return {k: float(v) for k, v in row.items()
            if k != "round" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoardTracker(Tracker):
    def __init__(self, run_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ImportError(f"run.tracker = 'tensorboard' needs TensorBoard ({e}): "
                              "pip install 'fedmole[tensorboard]'") from None
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log(self, row: dict) -> None:
        for key, value in numeric_fields(row).items():
            self.writer.add_scalar(key, value, global_step=int(row["round"]))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _flatten(cfg: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for key, value in cfg.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = str(value)
    return out


class MLflowTracker(Tracker):
    def __init__(self, run_dir: Path, cfg: dict):
        try:
            import mlflow
        except ImportError as e:
            raise ImportError(f"run.tracker = 'mlflow' needs MLflow ({e}): pip install 'fedmole[mlflow]'") from None
        self.mlflow = mlflow
        self.run = mlflow.start_run(run_name=run_dir.name)
        mlflow.log_params(_flatten(cfg))

    def log(self, row: dict) -> None:
        self.mlflow.log_metrics(numeric_fields(row), step=int(row["round"]))

    def close(self) -> None:
        self.mlflow.end_run()


def open_tracker(kind: str, run_dir: str | Path, cfg: dict) -> Tracker:
    """The tracker `kind` names (see TRACKERS) for one run directory."""
    if kind == "tensorboard":
        return TensorBoardTracker(Path(run_dir))
    if kind == "mlflow":
        return MLflowTracker(Path(run_dir), cfg)
    if kind != "none":
        raise ValueError(f"run.tracker = {kind!r}; allowed: {', '.join(TRACKERS)}")
    return Tracker()
