"""MLflow tracking that never takes training down: an unreachable or failing store warns once and goes quiet.

One MLflow run per training run, named by ``run_id``; a resumed run (same ``run_id``) continues the same
MLflow run. The default store is a SQLite file in the repo (MLflow 3 refuses the plain file store).
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlparse


def resolve_uri(configured: str | None, workdir: Path) -> str:
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(workdir / 'mlflow.db').resolve()}"


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = str(value)[:6000]
    return out


class Tracker:
    def __init__(self, uri: str, experiment: str, run_name: str, params: dict[str, Any] | None = None,
                 system_metrics: bool = False):
        self.active = False
        self._warned = False
        try:
            self._reachable(uri)
            import mlflow

            self._mlflow = mlflow
            mlflow.set_tracking_uri(uri)
            exp = mlflow.set_experiment(experiment)
            found = mlflow.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.runName = '{run_name}'",
                                       max_results=1, output_format="list")
            if found:
                mlflow.start_run(run_id=found[0].info.run_id, log_system_metrics=system_metrics)
            else:
                mlflow.start_run(run_name=run_name, log_system_metrics=system_metrics)
                if params:
                    mlflow.log_params(flatten(params))
            self.active = True
        except Exception as err:  # tracking is best effort by design
            self._warn(f"MLflow tracking disabled ({uri}): {_first_line(err)}")

    @staticmethod
    def _reachable(uri: str) -> None:
        """Fail in seconds on a dead server instead of MLflow's minutes of retries."""
        url = urlparse(uri)
        if url.scheme in ("http", "https"):
            from segevo.net import check_reachable

            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
            check_reachable(uri, "start the tracking server or fix tracking.tracking_uri", timeout=3.0)

    def _warn(self, message: str) -> None:
        if not self._warned:
            warnings.warn(message, RuntimeWarning, stacklevel=3)
            self._warned = True
        self.active = False

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.active:
            try:
                self._mlflow.log_metrics({_metric_name(k): float(v) for k, v in metrics.items()}, step=step)
            except Exception as err:
                self._warn(f"MLflow logging failed, continuing without it: {_first_line(err)}")

    def log_artifacts(self, path: Path, artifact_path: str | None = None) -> None:
        if self.active:
            try:
                if path.is_dir():
                    self._mlflow.log_artifacts(str(path), artifact_path)
                else:
                    self._mlflow.log_artifact(str(path), artifact_path)
            except Exception as err:
                self._warn(f"MLflow artifact upload failed, continuing without it: {_first_line(err)}")

    def close(self) -> None:
        if self.active:
            try:
                self._mlflow.end_run()
            except Exception as err:
                self._warn(f"MLflow end_run failed: {_first_line(err)}")


def _metric_name(name: str) -> str:
    """MLflow names allow alphanumerics, ``_-. :/``: prompt combinations like ``text+box`` become ``text_box``."""
    return re.sub(r"[^A-Za-z0-9_\-. :/]", "_", name)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:200]
