"""``segevo tune`` end to end on CPU: tiny model, synthetic prep cache, 1 Ray worker, 2 epochs of 1 step per trial.

Covers: a 4-trial study lands in SQLite with nested MLflow runs (parent + one child per trial, params and per-epoch
metrics, best trial tagged, plots); the report and a written-back profile; a study process killed mid-trial and
restarted as two processes on the same SQLite file: nothing finished is lost, the dead trial is failed by heartbeat
and retried from its Ray checkpoint, both processes run trials; a trial built to be pruned stops its Ray run after
the pruned epoch; and two processes share a study on a PostgreSQL server started on 127.0.0.1 for the test.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pytest
import yaml
from conftest import TINY
from prep_helpers import write_prep

from segevo.config import ConfigError, load_config, parse_config, search_space

SEGEVO = str(Path(sys.executable).parent / "segevo")
REPO = Path(__file__).resolve().parents[1]
ENV = {"TORCH_EXTENSIONS_DIR": str(REPO / ".cache" / "torch_extensions"), "RAY_DEDUP_LOGS": "0",
       "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
       "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}  # the controller picks up each epoch's report sooner


def workspace(tmp: Path, study: str = "demo", storage: str | None = None, **tune) -> Path:
    """Prep cache, a split that validates on the MRI case (its LoRA expert moves the Dice), a tiny config."""
    write_prep(tmp / "data")
    split = json.loads((tmp / "data" / "split.json").read_text())
    split["val"] = [k for k in split["train"] if k.endswith("mr1")]
    (tmp / "data" / "split.json").write_text(json.dumps(split))
    cfg = {
        "model": TINY,
        "priors": {"dim": 16, "num_heads": 2},
        "data": {"root": str(tmp / "data")},
        "loader": {"samples_per_epoch": 4},
        "train": {"epochs": 2, "steps_per_epoch": 1, "batch_size": 1, "num_workers": 1, "val_samples": 1,
                  "storage_path": str(tmp / "runs"), "loader_workers": 0, "max_failures": 0, "keep_checkpoints": 1,
                  "allow_random_base": True},
        "tracking": {"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}", "system_metrics": False},
        "tune": {"study": study, "storage": storage or f"sqlite:///{tmp / 'optuna.db'}", "trials": 4,
                 "output": str(tmp / "reports"), "heartbeat_s": 1, "grace_s": 10, **tune},
    }
    path = tmp / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def tune(tmp: Path, cfg: Path, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run([SEGEVO, "--config", str(cfg), "tune", *args], cwd=tmp, capture_output=True, text=True,
                         timeout=600, env={**os.environ, **ENV})
    if ok:
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def start(tmp: Path, cfg: Path, *args: str) -> subprocess.Popen:
    """A ``segevo tune`` in its own session, so that a kill takes its local Ray's helper processes along."""
    log = tmp / f"tune-{time.monotonic_ns()}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([SEGEVO, "--config", str(cfg), "tune", *args], cwd=tmp, stdout=out,
                                stderr=subprocess.STDOUT, env={**os.environ, **ENV}, start_new_session=True)
    proc.log = log
    return proc


def finish(proc: subprocess.Popen, timeout: float = 600) -> str:
    code = proc.wait(timeout=timeout)
    text = proc.log.read_text()
    assert code == 0, text[-4000:]
    return text


def load(storage: str, name: str = "demo"):
    import optuna

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna.load_study(study_name=name, storage=storage)


def finished(study) -> list:
    from optuna.trial import TrialState

    return [t for t in study.get_trials() if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]


# --- config and command-line errors (no Ray) ---------------------------------------------------------------------


def test_default_space_is_lora_rank_pool_size_and_lr():
    space = search_space(parse_config({}))
    assert space["adapters.experts.MRI.rank"].choices == [4, 8, 16, 32]
    assert space["priors.pool_size"].choices == [1, 2, 4, 8, 16]
    assert space["train.lr"].type == "float" and space["train.lr"].log
    assert "adapters.experts.CT.rank" not in space, "the identity expert has no rank to tune"


@pytest.mark.parametrize(("space", "message"), [
    ({"priors.poolsize": {"type": "categorical", "choices": [1]}}, r"tune\.space\.priors\.poolsize: .*pool_size"),
    ({"adapters.experts.PET.rank": {"type": "int", "low": 2, "high": 8}}, r"experts has no section 'PET'"),
    ({"priors.pool_size": {"type": "categorical", "choices": [0, 4]}}, r"value 0: priors\.pool_size: .*greater"),
    ({"train.lr": {"type": "float", "low": 0.0, "high": 0.1, "log": True}}, r"log scale needs low > 0"),
    ({"train.batch_size": {"type": "int", "low": 1.5, "high": 4}}, r"int bounds must be integers"),
    ({"train": {"type": "int", "low": 1, "high": 4}}, r"'train' is a section"),
])
def test_bad_search_space_names_the_key(space, message):
    with pytest.raises(ConfigError, match=message):
        parse_config({"tune": {"space": space}}, "params.yaml")


def test_cli_errors_are_one_line(tmp_path, capsys, monkeypatch):
    from segevo_pipeline.cli import main

    def error(*args: str, code: int = 1) -> str:
        assert main(["--config", str(cfg), "tune", *args]) == code
        err = capsys.readouterr().err
        assert err.startswith("segevo: error: ") and err.count("\n") == 1, err
        return err

    monkeypatch.chdir(tmp_path)
    cfg = workspace(tmp_path, space={"priors.poolsize": {"type": "categorical", "choices": [1, 2]}})
    assert "tune.space.priors.poolsize: 'priors.poolsize' is not a tunable config key" in error()
    cfg = workspace(tmp_path / "ok")
    dead = error("--storage", "postgresql://tuner:secret@127.0.0.1:9/optuna")
    assert "tune.storage postgresql://tuner:***@127.0.0.1:9/optuna: cannot open the study database" in dead
    database = tmp_path / "ok" / "optuna.db"
    assert f"no study database at {database}" in error("--report", "--study", "nope")
    assert not database.exists()  # a read-only command creates nothing
    import optuna

    optuna.storages.RDBStorage(f"sqlite:///{database}")  # an existing database without that study
    assert "no study 'nope'" in error("--report", "--study", "nope")
    assert "argument --trials: 0 is out of range: expected an integer >= 1" in error("--trials", "0", code=2)


# --- one study, four trials, then killed and resumed ---------------------------------------------------------------


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tune")
    cfg = workspace(tmp, pruner={"kind": "median", "startup_trials": 1, "warmup_epochs": 0}, grace_s=5)
    start_s = time.perf_counter()
    out = tune(tmp, cfg)
    wall = time.perf_counter() - start_s
    storage = f"sqlite:///{tmp / 'optuna.db'}"
    snapshot = [(t.number, t.state, t.value, t.datetime_complete) for t in load(storage).get_trials()]
    print(f"4-trial study: {wall:.1f} s; per trial: "
          + ", ".join(f"{t.number}: {t.user_attrs.get('wall_s')} s {t.state.name}" for t in load(storage).trials))
    return tmp, cfg, storage, out, snapshot


@pytest.mark.slow
def test_four_trial_study_in_sqlite(study):
    tmp, _, storage, out, _ = study
    s = load(storage)
    trials = s.get_trials()
    assert len(trials) == 4 and len(finished(s)) == 4, [t.state for t in trials]
    for t in trials:
        assert t.user_attrs["run_id"] == f"demo-t{t.number}"
        assert set(t.params) == {"adapters.experts.MRI.rank", "priors.pool_size", "train.lr"}
        assert set(t.intermediate_values) == set(range(t.user_attrs["epochs"]))  # one report per epoch run
        summary = json.loads((tmp / "reports" / "demo" / "trials" / f"demo-t{t.number}" / "train.json").read_text())
        assert summary["run_id"] == f"demo-t{t.number}" and summary["epochs_run"] == t.user_attrs["epochs"]
    assert not (tmp / "metrics").exists() and not (tmp / "models").exists(), "the DVC train outputs stay untouched"
    for name in ("history", "importances", "slice", "contour"):
        assert (tmp / "reports" / "demo" / f"{name}.html").stat().st_size > 1000
        assert (tmp / "reports" / "demo" / f"{name}.png").stat().st_size > 1000
    assert (tmp / "reports" / "demo" / "plotly.min.js").is_file(), "the HTML plots open offline"


@pytest.mark.slow
def test_nested_mlflow_runs(study):
    tmp, _, storage, _, _ = study
    import mlflow

    s = load(storage)
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("segevo").experiment_id
    parents = client.search_runs([experiment], "tags.`segevo.role` = 'study'")
    assert len(parents) == 1
    parent = parents[0]
    children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    by_name = {c.info.run_name: c for c in children}
    assert sorted(by_name) == [f"demo-t{n}" for n in range(4)]
    for t in s.get_trials():
        child = by_name[t.user_attrs["run_id"]]
        assert child.data.params["adapters.experts.MRI.rank"] == str(t.params["adapters.experts.MRI.rank"])
        assert child.data.params["priors.pool_size"] == str(t.params["priors.pool_size"])
        assert child.data.tags["optuna.state"] == t.state.name
        steps = sorted(m.step for m in client.get_metric_history(child.info.run_id, "val_dice"))
        assert steps == sorted(t.intermediate_values), "per-epoch metrics in the child run"
    best = s.best_trial
    assert parent.data.tags["best_run_id"] == f"demo-t{best.number}"
    assert float(parent.data.tags["best_value"]) == pytest.approx(best.value)
    assert by_name[f"demo-t{best.number}"].data.tags["segevo.best"] == "true"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "study")}
    assert {"study/contour.html", "study/contour.png", "study/importances.png", "study/history.html"} <= artifacts


@pytest.mark.slow
def test_report_and_profile(study):
    tmp, cfg, storage, _, _ = study
    out = tune(tmp, cfg, "--report", "--write-profile", str(tmp / "best.yaml"))
    best = load(storage).best_trial
    assert f"best: trial {best.number} (demo-t{best.number})" in out.stdout
    table = out.stdout.split("best: ", 1)[1].splitlines()[1:]
    assert table[0].split()[:5] == ["#", "state", "val_dice", "epochs", "time_s"]
    assert [row.split()[0] for row in table[1:5]] == ["0", "1", "2", "3"]
    profile = load_config(tmp / "best.yaml")
    assert profile.adapters.experts["MRI"].rank == best.params["adapters.experts.MRI.rank"]
    assert profile.priors.pool_size == best.params["priors.pool_size"]
    assert profile.train.lr == pytest.approx(best.params["train.lr"])


@pytest.mark.slow
def test_killed_study_resumes_in_two_processes(study):
    """SIGKILL mid-trial, then two processes restart the SQLite study: one retries the dead trial from its Ray
    checkpoint, the other runs a new trial; nothing finished is lost, nothing stays RUNNING, the file is sound."""
    tmp, cfg, storage, _, before = study
    proc = start(tmp, cfg, "--trials", "6")
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:  # kill it once trial 4 has reported an epoch
        trial = [t for t in load(storage).get_trials() if t.number == 4]
        if trial and trial[0].intermediate_values:
            break
        assert proc.poll() is None, "the study process ended before it could be killed:\n" + proc.log.read_text()
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)  # the process and its local Ray's helpers, as when a machine dies
    proc.wait()
    assert load(storage).trials[4].state.name == "RUNNING", "killed mid-trial"
    # Restart once the dead trial's heartbeat is older than grace_s (5 s), as a restart after a crash usually is:
    # the first process to look fails and requeues it before any new trial starts. (Restarted sooner, the study
    # still ends with 6 finished trials and the dead one failed, but its retry may be left waiting.)
    time.sleep(6)
    logs = run_two(tmp, cfg, "--trials", "6")
    s = load(storage)
    trials = s.get_trials()
    assert [(t.number, t.state, t.value, t.datetime_complete) for t in trials[:4]] == before, "finished trials kept"
    assert trials[4].state.name == "FAIL", "the dead trial was failed by heartbeat, not left RUNNING"
    retry = next(t for t in trials[5:] if t.params == trials[4].params)
    assert retry.user_attrs["run_id"] == "demo-t4", "the retry continues the dead trial's Ray run"
    assert len(trials) == 7 and len(finished(s)) == 6 and not [t for t in trials if t.state.name == "RUNNING"]
    assert sum("resumed after epoch" in log for log in logs) == 1
    assert all(re.search(r"^trial \d+ \(demo-t\d+\): (complete|pruned)", log, re.M) for log in logs), \
        "each process ran a trial"
    assert trials[6].params != trials[5].params, "processes sharing a study do not repeat proposals"
    with sqlite3.connect(tmp / "optuna.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)


# --- two processes on one study -------------------------------------------------------------------------------------


def run_two(tmp: Path, cfg: Path, *args: str) -> list[str]:
    start_s = time.perf_counter()
    procs = [start(tmp, cfg, *args) for _ in range(2)]
    logs = [finish(p) for p in procs]
    print(f"two processes: {time.perf_counter() - start_s:.1f} s")
    return logs


@pytest.mark.slow
def test_a_trial_built_to_be_pruned_stops_its_ray_run(tmp_path):
    """A threshold no Dice reaches prunes the trial at epoch 0; its Ray run ends there instead of running epoch 1."""
    cfg = workspace(tmp_path, study="pruned", trials=1,
                    pruner={"kind": "threshold", "min_dice": 1.0, "warmup_epochs": 0})
    out = tune(tmp_path, cfg)
    assert "trial 0 (pruned-t0): pruned after epoch 0" in out.stdout
    assert "pruned by the study after epoch 0" in out.stdout + out.stderr, "the worker got the verdict"
    (trial,) = load(f"sqlite:///{tmp_path / 'optuna.db'}", "pruned").get_trials()
    assert trial.state.name == "PRUNED" and list(trial.intermediate_values) == [0]
    summary = json.loads((tmp_path / "reports" / "pruned" / "trials" / "pruned-t0" / "train.json").read_text())
    assert summary["epochs_run"] == 1, "pruning stopped the Ray run after epoch 0 of 2"
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("segevo").experiment_id],
                                "tags.mlflow.runName = 'pruned-t0'")
    assert run.data.tags["optuna.state"] == "PRUNED" and run.info.status == "KILLED"


def _postgres_bin() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


@pytest.fixture(scope="module")
def postgres():
    """A throwaway PostgreSQL server on 127.0.0.1 (as the ``postgres`` user when we are root: initdb refuses root)."""
    bindir = _postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL server not installed (Debian: apt-get install postgresql; .ci/run installs it)")
    as_user: list[str] = []
    data = Path(tempfile.mkdtemp(prefix="segevo-pg-"))
    if os.geteuid() == 0:
        user = "postgres" if any(p.pw_name == "postgres" for p in pwd.getpwall()) else "nobody"
        shutil.chown(data, user)
        as_user = ["runuser", "-u", user, "--"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = lambda *cmd: subprocess.run([*as_user, *cmd], check=True, capture_output=True, timeout=120)  # noqa: E731
    run(str(bindir / "initdb"), "-D", str(data / "db"), "-U", "tuner", "--auth=trust", "-E", "UTF8")
    run(str(bindir / "pg_ctl"), "-D", str(data / "db"), "-l", str(data / "server.log"), "-w", "start",
        "-o", f"-h 127.0.0.1 -p {port} -k {data}")
    yield f"postgresql://tuner@127.0.0.1:{port}/postgres"
    run(str(bindir / "pg_ctl"), "-D", str(data / "db"), "-m", "fast", "-w", "stop")
    shutil.rmtree(data, ignore_errors=True)


@pytest.mark.slow
def test_two_processes_share_a_postgresql_study(tmp_path, postgres):
    cfg = workspace(tmp_path, study="multinode", storage=postgres, trials=2, pruner={"kind": "none"})
    logs = run_two(tmp_path, cfg)
    s = load(postgres, "multinode")
    trials = s.get_trials()
    assert len(trials) == 2 and all(t.state.name == "COMPLETE" for t in trials), [t.state for t in trials]
    assert {t.user_attrs["run_id"] for t in trials} == {"multinode-t0", "multinode-t1"}
    for log in logs:
        assert "study multinode (postgresql://tuner@127.0.0.1" in log and "2 complete" in log
    assert sum("trial 0 (multinode-t0): complete" in log for log in logs) == 1
    assert sum("trial 1 (multinode-t1): complete" in log for log in logs) == 1
