"""The cluster path, end to end: a real three-node Ray cluster on this machine (a head and two workers, each in
its own network namespace with its own address and its own /tmp), an MLflow server and PostgreSQL on the
head's address, a shared folder and a local DVC remote. The ``ray job submit`` commands of cluster/README.md
run here as written, with the addresses, the profile and the remote substituted (``readme_commands``).

Covered: training on shared storage with one worker per worker node; the same with the data staged onto each
node from the DVC remote; a worker node's raylet killed mid-run (the run resumes from its last checkpoint once
the node is back, and no epoch is lost or repeated); refusals before any training (relative storage, missing
weights, unreachable tracking server); ``segevo tune`` as two jobs sharing one PostgreSQL study.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml
from conftest import TINY
from netns_cluster import NetnsCluster, available
from prep_helpers import write_prep

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
WHY = available()

pytestmark = [pytest.mark.slow, pytest.mark.skipif(WHY is not None, reason=f"no namespaces here: {WHY}")]


def readme_commands() -> dict[str, str]:
    """The ``ray job submit`` commands of cluster/README.md, continuation lines joined, keyed by the verb and
    the run id or study they name."""
    text = (REPO / "cluster" / "README.md").read_text()
    joined = re.sub(r"\\\n\s*", " ", text)
    found = {}
    for line in joined.splitlines():
        line = line.split("#", 1)[0].strip() if line.lstrip().startswith("ray job submit") else ""
        if line:
            name = re.search(r"run_id=(\S+)|--study (\S+)", line)
            found[next(g for g in name.groups() if g)] = line
    return found


def _postgres_bin() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return found[-1].parent if found else None


@pytest.fixture(scope="module")
def cluster():
    base = Path("/var/tmp") / f"segevo-cluster-{uuid.uuid4().hex[:8]}"  # outside /tmp: the nodes see it
    shared = base / "shared"
    write_prep(shared / "data", val=(2, 1))
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "disabled",
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_health_check_period_ms": "1000",
           "RAY_health_check_failure_threshold": "3", "RAY_health_check_timeout_ms": "1000",
           "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1", "PYTHONUNBUFFERED": "1",
           "GLOO_SOCKET_IFNAME": "eth0"}  # gloo finds its address by hostname, which all nodes share here
    env.pop("RAY_ADDRESS", None)
    with NetnsCluster(base, 3, env) as c:
        head = c.head
        built = REPO / ".cache" / "torch_extensions"
        for node in c.nodes:  # a warm image: DeepSpeed's CPU ops already built on every node
            if built.is_dir():
                shutil.copytree(built, node.tmp / "segevo" / "torch_extensions")
        logs = base / "logs"
        logs.mkdir()
        mlflow = head.popen([str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{base / 'mlflow.db'}",
                             "--artifacts-destination", str(base / "mlartifacts"), "--host", head.address,
                             "--port", "5000", "--workers", "1", "--allowed-hosts", f"{head.address}:5000"],
                            logs / "mlflow.log")
        postgres = _start_postgres(head, base)
        head.run(["ray", "start", "--head", "--node-ip-address", head.address, "--port", "6379",
                  "--dashboard-host", head.address, "--num-cpus", "0", "--disable-usage-stats"], check=True)
        for node in c.nodes[1:]:
            _join(node, head)
        c.wait_port(head, 5000, timeout=120)
        yield {"cluster": c, "base": base, "shared": shared, "postgres": postgres, "logs": logs,
               "mlflow_uri": f"http://{head.address}:5000", "env": env}
        mlflow.kill()
    shutil.rmtree(base, ignore_errors=True)


def _join(node, head) -> None:
    node.run(["ray", "start", "--address", f"{head.address}:6379", "--node-ip-address", node.address,
              "--num-cpus", "1", "--disable-usage-stats"], check=True)


def _start_postgres(head, base: Path) -> str | None:
    bindir = _postgres_bin()
    if bindir is None:
        return None
    data = base / "pg"
    data.mkdir()
    shutil.chown(data, "postgres")
    as_user = ["runuser", "-u", "postgres", "--"]
    subprocess.run([*as_user, str(bindir / "initdb"), "-D", str(data / "db"), "-U", "tuner", "--auth=trust"],
                   check=True, capture_output=True, timeout=120)
    with open(data / "db" / "pg_hba.conf", "a") as hba:  # the cluster's nodes are clients, not only loopback
        hba.write(f"host all all {head.address.rsplit('.', 1)[0]}.0/24 trust\n")
    head.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data / "db"), "-l", str(data / "server.log"), "-w",
              "start", "-o", f"-h {head.address} -p 5432 -k {data}"], check=True, timeout=120)
    return f"postgresql://tuner@{head.address}:5432/postgres"


def profile(env: dict, name: str, **train) -> Path:
    """The test's cluster profile: the tiny model, every path on the shared folder, every service a server."""
    shared = env["shared"]
    cfg = {
        "model": TINY, "priors": {"dim": 16, "num_heads": 2},
        "data": {"root": str(shared / "data")},
        "loader": {"samples_per_epoch": 8},
        "train": {"epochs": 2, "batch_size": 2, "num_workers": 2, "use_gpu": False, "val_samples": 2, "lr": 5e-3,
                  "loader_workers": 0, "allow_random_base": True, "max_failures": 1, "keep_checkpoints": 5,
                  "storage_path": str(shared / "runs"), "output": str(shared / name / "adapter"),
                  "metrics_dir": str(shared / name / "metrics"), "staging_dir": "/tmp/segevo/data", **train},
        "tracking": {"tracking_uri": env["mlflow_uri"], "system_metrics": True},
        "tune": {"storage": env["postgres"] or f"sqlite:///{shared / 'optuna.db'}", "trials": 2,
                 "output": str(shared / "tune"), "heartbeat_s": 2, "grace_s": 20, "pruner": {"kind": "none"}},
    }
    path = shared / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def submit(env: dict, key: str, profile_path: Path, **subs: str) -> subprocess.CompletedProcess:
    """The README's command named ``key``, with this cluster's address, profile and values, run on the head."""
    command = readme_commands()[key]
    command = command.replace("<head-ip>", env["cluster"].head.address)
    command = command.replace("configs/cluster.yaml", str(profile_path))
    for old, new in subs.items():
        command = command.replace(old, new)
    start = time.monotonic()
    out = env["cluster"].head.run(shlex.split(command), cwd=REPO, timeout=600)
    (env["logs"] / f"{key}.log").write_text(out.stdout + out.stderr)
    print(f"[cluster] {command}: exit {out.returncode} in {time.monotonic() - start:.1f} s")  # shown with -s
    return out


def mlflow_runs(env: dict, name: str) -> list:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{env['base'] / 'mlflow.db'}")
    exp = client.get_experiment_by_name("segevo")
    return client.search_runs([exp.experiment_id], f"tags.mlflow.runName = '{name}'"), client


def _tail(log: Path, chars: int = 3000) -> str:
    """The end of a job's log without Ray's upload chatter."""
    return "\n".join(line for line in log.read_text().splitlines() if "packaging.py" not in line)[-chars:]


def history(metrics_dir: Path) -> list[int]:
    rows = (metrics_dir / "train_curve.csv").read_text().splitlines()[1:]
    return [int(float(r.split(",")[0])) for r in rows]


def test_readme_shows_the_commands_this_test_runs():
    assert set(readme_commands()) == {"mri-lora-1", "mri-lora-staged", "rank-sweep"}


def test_train_on_shared_storage_one_worker_per_node(cluster):
    # long enough (a few seconds) for the 1 s system-metrics sampler of every node to log
    out = submit(cluster, "mri-lora-1", profile(cluster, "shared", steps_per_epoch=12))
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    text = out.stdout + out.stderr
    assert "Failed to query Ray Train Controller" not in text
    nodes = set(re.findall(r"\[rank \d\] on node (\S+)", text))
    assert nodes == {"198.51.100.2", "198.51.100.3"}, text[-3000:]
    shared = cluster["shared"]
    assert (shared / "shared" / "adapter" / "adapters.json").is_file()
    assert history(shared / "shared" / "metrics") == [0, 1]
    assert list((shared / "runs" / "mri-lora-1").glob("checkpoint_*/state"))
    (run,), client = mlflow_runs(cluster, "mri-lora-1")
    assert run.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_dice")) == [0, 1]
    system = {k.split("/")[1] for k in run.data.metrics if k.startswith("system/") and k.count("/") >= 2}
    assert {"198.51.100.2", "198.51.100.3"} <= system, sorted(run.data.metrics)


def test_train_with_data_staged_from_the_dvc_remote(cluster):
    remote, lock = _push_data(cluster)
    out = submit(cluster, "mri-lora-staged", profile(cluster, "staged", data_lock=str(lock)),
                 **{"s3://<bucket>/segevo-dvc": str(remote)})
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    text = out.stdout + out.stderr
    assert re.search(r"staged data .* on 3 nodes", text), text[-3000:]
    for node in cluster["cluster"].nodes:
        staged = list((node.tmp / "segevo" / "data").glob("*/prep/manifest.json"))
        assert len(staged) == 1, f"node {node.address}: {staged}"
    assert history(cluster["shared"] / "staged" / "metrics") == [0, 1]


def _push_data(env: dict) -> tuple[Path, Path]:
    """The prepared data under DVC in a project of its own, pushed to a local remote, as a user would."""
    project = env["base"] / "project"
    shutil.copytree(env["shared"] / "data", project / "data")
    remote = env["base"] / "dvc-remote"
    dvc = str(BIN / "dvc")
    run = lambda *a: subprocess.run(a, cwd=project, check=True, capture_output=True, timeout=120)  # noqa: E731
    run("git", "init", "-q")
    run(dvc, "init", "-q")
    run(dvc, "remote", "add", "-d", "store", str(remote))
    run(dvc, "add", "data/prep", "data/split.json")
    run(dvc, "push", "-q")
    lock = project / "data.lock"
    outs = [yaml.safe_load((project / "data" / f"{n}.dvc").read_text())["outs"][0] for n in ("prep", "split.json")]
    lock.write_text(yaml.safe_dump({"outs": outs}))
    return remote, lock


def test_a_killed_worker_node_resumes_from_its_last_checkpoint(cluster):
    c = cluster["cluster"]
    cfg = profile(cluster, "fault", epochs=6, steps_per_epoch=8, max_failures=3)
    victim = c.nodes[2]
    runs = cluster["shared"] / "runs" / "fault-1"
    command = readme_commands()["mri-lora-1"].replace("<head-ip>", c.head.address).replace(
        "configs/cluster.yaml", str(cfg)).replace("train.run_id=mri-lora-1", "train.run_id=fault-1")
    job = c.head.popen(shlex.split(command), cluster["logs"] / "fault-1.log", cwd=REPO)
    deadline = time.monotonic() + 300
    while not list(runs.glob("checkpoint_*")) and time.monotonic() < deadline and job.poll() is None:
        time.sleep(0.5)
    before = sorted(json.loads(p.read_text())["history"][-1]["epoch"] for p in runs.glob("checkpoint_*/progress.json"))
    raylet = victim.pid_of("raylet")
    assert raylet is not None and before, "the run reported a checkpoint and the raylet runs"
    os.kill(raylet, 9)
    time.sleep(8)  # the head marks the node dead; its worker is gone
    victim.kill_all()
    _join(victim, c.head)
    assert job.wait(timeout=420) == 0, _tail(cluster["logs"] / "fault-1.log")
    epochs = history(cluster["shared"] / "fault" / "metrics")
    print(f"[cluster] fault: checkpointed epochs before the kill {before}, epochs of the finished run {epochs}")
    assert epochs == list(range(6)), f"checkpointed before the kill: {before}; epochs after: {epochs}"
    assert "resumed after epoch" in (cluster["logs"] / "fault-1.log").read_text()


@pytest.mark.parametrize(("sets", "message"), [
    (["train.storage_path=runs"], "train.storage_path 'runs' is relative"),
    (["train.allow_random_base=false", "train.base_weights=/var/tmp/segevo-missing/pytorch_model.bin"],
     "train.base_weights /var/tmp/segevo-missing/pytorch_model.bin"),
    (["tracking.tracking_uri=http://198.51.100.1:9"], "tracking.tracking_uri http://198.51.100.1:9"),
    (["train.use_gpu=null"], "train.use_gpu is not set"),
    (["train.use_gpu=true", "train.gpu_wait_s=3"], "the run needs 2 GPUs and the cluster had 0 after waiting 3 s"),
])
def test_refusals_come_before_any_training(cluster, sets, message):
    c = cluster["cluster"]
    cfg = profile(cluster, "refused")
    argv = ["segevo", "train", "--config", str(cfg)] + [a for s in sets for a in ("--set", s)]
    start = time.monotonic()
    out = c.head.run(argv, cwd=REPO, env={"RAY_ADDRESS": f"{c.head.address}:6379"}, timeout=120)
    seconds = time.monotonic() - start
    errors = [line for line in out.stderr.splitlines() if line.startswith("segevo: error:")]
    assert out.returncode != 0 and len(errors) == 1 and message in errors[0], out.stderr[-3000:]
    assert "Traceback" not in out.stderr and seconds < 60
    assert not (cluster["shared"] / "refused" / "metrics").exists()


def test_two_tune_jobs_share_one_postgresql_study(cluster):
    if cluster["postgres"] is None:
        pytest.skip("PostgreSQL server not installed (.ci/run installs it)")
    cfg = profile(cluster, "study", num_workers=1, epochs=1)
    c = cluster["cluster"]
    command = readme_commands()["rank-sweep"].replace("<head-ip>", c.head.address).replace(
        "configs/cluster.yaml", str(cfg))
    jobs = [c.head.popen(shlex.split(command), cluster["logs"] / f"tune-{i}.log", cwd=REPO) for i in range(2)]
    assert [j.wait(timeout=540) for j in jobs] == [0, 0], [_tail(cluster["logs"] / f"tune-{i}.log") for i in range(2)]
    check = (f"import optuna, json; s = optuna.load_study(study_name='rank-sweep', storage={cluster['postgres']!r}); "
             "print(json.dumps([t.state.name for t in s.trials]))")
    states = json.loads(c.head.run([sys.executable, "-c", check], timeout=60).stdout.splitlines()[-1])
    assert sorted(states) == ["COMPLETE", "COMPLETE"]
    (parent,), client = mlflow_runs(cluster, "rank-sweep")
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 2
