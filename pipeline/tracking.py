"""MLflow tracking that never takes training down: requests go through MLflow's own retry and backoff, and a
request that still fails warns and is dropped (the next one is tried again).

One MLflow run per training run, named by ``run_id``; a resumed run (same ``run_id``) continues the same
MLflow run; a run that fails or is stopped ends FAILED or KILLED, not RUNNING forever. The default store is a
SQLite file in the repo (MLflow 3 refuses the plain file store); a cluster uses one server for the driver and
every rank. System metrics come from every node: rank 0 logs them with the run, and the first rank of every
other node attaches its own monitor to the same run under its node id (``system/<node>/...``).
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

# MLflow copies every URI given to set_tracking_uri into MLFLOW_TRACKING_URI (for subprocesses): the ones we set
# are not the user's choice, so a second verb in the same process (the Python API, the tests) must not take them.
_SET_HERE: set[str] = set()


def resolve_uri(configured: str | None, workdir: Path) -> str:
    """``tracking.tracking_uri``, else the user's MLFLOW_TRACKING_URI, else ``mlflow.db`` in ``workdir``."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    user = env if env not in _SET_HERE else None
    return configured or user or f"sqlite:///{(workdir / 'mlflow.db').resolve()}"


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = str(value)[:6000]
    return out


# MLflow's own retry policy for every request of a run (the user's environment wins): 5 retries with
# exponential backoff (2, 4, 8, 16, 32 s) ride out a server restart; each attempt times out after 30 s.
RETRY_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "5", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "2",
             "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
MAX_WARNINGS = 5


def retry_env() -> dict[str, str]:
    """The retry settings in force, for the driver's own use and for every Ray worker's environment."""
    return {k: os.environ.get(k, v) for k, v in RETRY_ENV.items()}


def check_server(uri: str) -> None:
    """One TCP connection to an ``http(s)`` tracking server, in seconds: a dead server at the start is an error
    the caller decides about (a cluster run refuses to start; one machine warns)."""
    if urlparse(uri).scheme in ("http", "https"):
        from segevo.net import check_reachable

        check_reachable(uri, "start the tracking server or fix tracking.tracking_uri", timeout=3.0)


class Tracker:
    def __init__(self, uri: str, experiment: str, run_name: str, params: dict[str, Any] | None = None,
                 system_metrics: bool = False, node_id: str | None = None):
        self.active = False
        self.run_id: str | None = None
        self._warnings = 0
        try:
            check_server(uri)
            os.environ.update(retry_env())
            import mlflow

            self._mlflow = mlflow
            if os.environ.get("MLFLOW_TRACKING_URI") != uri:
                _SET_HERE.add(uri)
            mlflow.set_tracking_uri(uri)
            if node_id is not None:
                mlflow.set_system_metrics_node_id(node_id)
            exp = mlflow.set_experiment(experiment)
            found = mlflow.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.runName = '{run_name}'",
                                       max_results=1, output_format="list")
            if found:
                run = mlflow.start_run(run_id=found[0].info.run_id, log_system_metrics=system_metrics)
            else:
                run = mlflow.start_run(run_name=run_name, log_system_metrics=system_metrics)
                if params:
                    mlflow.log_params(flatten(params))
            self.run_id = run.info.run_id
            self.active = True
        except Exception as err:  # tracking is best effort by design
            self._warn(f"MLflow tracking disabled ({uri}): {_first_line(err)}")

    def _warn(self, message: str) -> None:
        """A failed request (after MLflow's retries) is dropped with a warning; tracking goes on."""
        self._warnings += 1
        if self._warnings <= MAX_WARNINGS:
            suffix = " (further MLflow warnings are not shown)" if self._warnings == MAX_WARNINGS else ""
            warnings.warn(message + suffix, RuntimeWarning, stacklevel=3)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.active:
            try:
                self._mlflow.log_metrics({_metric_name(k): float(v) for k, v in metrics.items()}, step=step)
            except Exception as err:
                self._warn(f"MLflow logging failed at step {step}, training goes on: {_first_line(err)}")

    def log_artifacts(self, path: Path, artifact_path: str | None = None) -> None:
        if self.active:
            try:
                if path.is_dir():
                    self._mlflow.log_artifacts(str(path), artifact_path)
                else:
                    self._mlflow.log_artifact(str(path), artifact_path)
            except Exception as err:
                self._warn(f"MLflow artifact upload failed, continuing without it: {_first_line(err)}")

    def close(self, status: str = "FINISHED") -> None:
        """End the run as FINISHED, FAILED or KILLED."""
        if self.active:
            try:
                self._mlflow.end_run(status=status)
            except Exception as err:
                self._warn(f"MLflow end_run failed: {_first_line(err)}")
            self.active = False


class NodeMetrics:
    """System metrics of one more node, logged into an existing run under ``system/<node_id>/...``."""

    def __init__(self, uri: str, run_id: str, node_id: str):
        self._monitor = None
        try:
            os.environ.update(retry_env())
            from mlflow.environment_variables import MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(run_id, sampling_interval=MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL.get()
                                                 or 10, resume_logging=True, node_id=node_id, tracking_uri=uri)
            self._monitor.start()
        except Exception as err:
            warnings.warn(f"MLflow system metrics of node {node_id} disabled: {_first_line(err)}", RuntimeWarning,
                          stacklevel=2)

    def close(self) -> None:
        if self._monitor is not None:
            self._monitor.finish()
            self._monitor = None


def end_run(uri: str, experiment: str, run_name: str, status: str) -> None:
    """Mark a training run FAILED or KILLED from the driver (its workers died or were stopped); best effort."""
    try:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            return
        for run in client.search_runs([exp.experiment_id], f"tags.mlflow.runName = '{run_name}'", max_results=1):
            if run.info.status == "RUNNING":
                client.set_terminated(run.info.run_id, status)
    except Exception as err:
        warnings.warn(f"MLflow: could not mark run {run_name} {status}: {_first_line(err)}", RuntimeWarning,
                      stacklevel=2)


class StudyRuns:
    """The MLflow side of an Optuna study: one parent run per study, one child run per trial, best effort.

    A trial's child run is its training run (named by its ``run_id``): created here under the parent with the
    trial's config as params, then continued by the training workers' ``Tracker``. Processes sharing a study share
    its parent (found by tag). Like ``Tracker``, an unreachable or failing store warns once and goes quiet.
    """

    def __init__(self, uri: str, experiment: str, study: str):
        self.active = False
        self._warned = False
        self._study = study
        try:
            check_server(uri)
            os.environ.update(retry_env())
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=uri)
            self._experiment = self._experiment_id(experiment)
            self.parent_id = self._parent()
            self.active = True
        except Exception as err:
            self._warn(f"MLflow tracking of study {study} disabled ({uri}): {_first_line(err)}")

    def _experiment_id(self, name: str) -> str:
        found = self._client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self._client.create_experiment(name)
        except Exception:  # another process created it first
            return self._client.get_experiment_by_name(name).experiment_id

    def _parents(self) -> list:
        return self._client.search_runs(
            [self._experiment], f"tags.`segevo.study` = '{self._study}' and tags.`segevo.role` = 'study'",
            order_by=["attributes.start_time ASC"])

    def _parent(self) -> str:
        """The study's parent run; when two processes create one at once, the older one wins, ours goes."""
        found = self._parents()
        if not found:
            mine = self._client.create_run(self._experiment, run_name=self._study,
                                           tags={"segevo.study": self._study, "segevo.role": "study"}).info.run_id
            found = self._parents()
            if found[0].info.run_id != mine:
                self._client.delete_run(mine)
        parent = found[0].info.run_id
        self._client.update_run(parent, status="RUNNING")
        return parent

    def _warn(self, message: str) -> None:
        if not self._warned:
            warnings.warn(message, RuntimeWarning, stacklevel=3)
            self._warned = True
        self.active = False

    def _child(self, run_id: str) -> str | None:
        found = self._client.search_runs([self._experiment], f"tags.mlflow.runName = '{run_id}'", max_results=1)
        return found[0].info.run_id if found else None

    def start_trial(self, run_id: str, number: int, config: dict[str, Any]) -> None:
        """The trial's child run; a retried trial (same ``run_id``) continues the dead one's run."""
        if not self.active:
            return
        try:
            from mlflow.entities import Param

            tags = {"mlflow.parentRunId": self.parent_id, "segevo.study": self._study, "optuna.trial": str(number)}
            child = self._child(run_id)
            if child is None:
                child = self._client.create_run(self._experiment, run_name=run_id, tags=tags).info.run_id
                self._client.log_batch(child, params=[Param(k, v) for k, v in flatten(config).items()])
            else:
                for key, value in tags.items():
                    self._client.set_tag(child, key, value)
        except Exception as err:
            self._warn(f"MLflow trial run failed, continuing without it: {_first_line(err)}")

    def finish_trial(self, run_id: str, number: int, state: str, value: float | None) -> None:
        """State on the child (pruned runs end KILLED, failed ones FAILED), the trial's value on the parent."""
        if not self.active:
            return
        try:
            child = self._child(run_id)
            if child is not None:
                self._client.set_tag(child, "optuna.state", state)
                status = {"COMPLETE": "FINISHED", "PRUNED": "KILLED"}.get(state, "FAILED")
                self._client.set_terminated(child, status)
            if value is not None:
                self._client.log_metric(self.parent_id, "trial_val_dice", value, step=number)
        except Exception as err:
            self._warn(f"MLflow trial update failed, continuing without it: {_first_line(err)}")

    def finish_study(self, best: dict[str, Any] | None, files: list[Path], done: bool) -> None:
        """Tags the best trial on the parent and on its child run, uploads the study's plots."""
        if not self.active:
            return
        try:
            client, parent = self._client, self.parent_id
            if best is not None:
                previous = client.get_run(parent).data.tags.get("best_run_id")
                if previous and previous != best["run_id"] and (old := self._child(previous)):
                    client.set_tag(old, "segevo.best", "false")
                for key in ("trial", "run_id", "value"):
                    client.set_tag(parent, f"best_{key}", str(best[key]))
                for key, value in best["params"].items():
                    client.set_tag(parent, f"best.{key}", str(value))
                if child := self._child(best["run_id"]):
                    client.set_tag(child, "segevo.best", "true")
            for path in files:
                client.log_artifact(parent, str(path), "study")
            if done:
                client.set_terminated(parent, "FINISHED")
        except Exception as err:
            self._warn(f"MLflow study update failed: {_first_line(err)}")


def _metric_name(name: str) -> str:
    """MLflow names allow alphanumerics, ``_-. :/``: prompt combinations like ``text+box`` become ``text_box``."""
    return re.sub(r"[^A-Za-z0-9_\-. :/]", "_", name)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:200]
