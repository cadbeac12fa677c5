"""``segevo tune``: an Optuna study over the config (LoRA rank, prior pool size, learning rate, any key), each trial
one Ray Train run of ``segevo train``'s launcher, tracked in MLflow as a child run of the study's parent run.

The study lives in an RDB (``tune.storage``: a SQLite file by default, PostgreSQL across machines), so several
``segevo tune`` processes share it and a killed one resumes it: the study is loaded, sampler and pruner rebuilt from
the config, and a dead process's RUNNING trial is failed once its heartbeat goes stale, then retried from its Ray
run's last checkpoint. Validation Dice goes from the Ray Train controller to this driver every epoch
(``segevo_pipeline.report_relay``); the driver reports it to Optuna, and a pruned trial's workers stop after that epoch.
"""

from __future__ import annotations

import argparse
import threading
import time
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any

from segevo.errors import UserError
from segevo_pipeline.common import config_from_args, preflight, pyplot
from segevo_pipeline.flags import int_at_least, positive_seconds, run_name
from segevo_pipeline.study import load_study, open_storage, sqlite_file, storage_name

MAX_FAILURES_IN_A_ROW = 3  # a study whose trials keep failing is broken, not unlucky: stop instead of spinning


def add_parser(sub: argparse._SubParsersAction, name: str, help_text: str) -> None:
    p = sub.add_parser(name, help=help_text, description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int_at_least(1),
                   help="finished trials the study should hold, counting every process's (default: tune.trials)")
    p.add_argument("--study", type=run_name, help="study name (default: tune.study)")
    p.add_argument("--storage", help="RDB URL: sqlite:///optuna.db, postgresql://user@host/db (default: tune.storage)")
    p.add_argument("--timeout", type=positive_seconds, metavar="SECONDS", help="start no new trial after this long")
    p.add_argument("--report", action="store_true", help="print the best trial and every trial; run nothing")
    p.add_argument("--write-profile", metavar="YAML", help="write the best trial's configuration as a profile")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from optuna.exceptions import ExperimentalWarning

    from segevo.config import parse_config

    cfg, source = config_from_args(args)
    overrides = {"study": args.study, "storage": args.storage, "trials": args.trials}
    tune = {**cfg.tune.model_dump(), **{k: v for k, v in overrides.items() if v is not None}}
    cfg = parse_config({**cfg.model_dump(), "tune": tune}, f"{source} with the command line")
    warnings.filterwarnings("ignore", category=ExperimentalWarning)  # heartbeats, matplotlib plots
    database = sqlite_file(cfg.tune.storage)
    if not args.report:
        from segevo_pipeline.launch import training_data

        training_data(cfg)  # bad data fails here, before a study database is created
    preflight(args, outputs=[("--write-profile", args.write_profile)], inputs=[("tune.storage", database)],
              folders=[] if args.report else [("tune.output", cfg.tune.output)])
    storage = open_storage(cfg.tune, create=not args.report)
    study = load_study(cfg.tune.study, storage) if args.report else optimize(cfg, storage, args.timeout)
    print_report(study, storage_name(cfg.tune.storage))
    if args.write_profile:
        write_profile(cfg, study, Path(args.write_profile))
    return 0


def _sampler(tune, trial_number: int = 0) -> Any:
    """Rebuilt from the config on every start. A seeded one is re-seeded per trial with ``seed + trial number``:
    one process replays exactly, and processes sharing a study (or a resumed one) never repeat a proposal."""
    import optuna

    seed = None if tune.seed is None else tune.seed + trial_number
    if tune.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def _pruner(cfg) -> Any:
    import optuna

    p = cfg.tune.pruner
    if p.kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=p.startup_trials, n_warmup_steps=p.warmup_epochs)
    if p.kind == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=p.min_epochs, reduction_factor=p.reduction_factor)
    if p.kind == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=p.min_epochs, max_resource=cfg.train.epochs,
                                              reduction_factor=p.reduction_factor)
    if p.kind == "threshold":
        return optuna.pruners.ThresholdPruner(lower=p.min_dice, n_warmup_steps=p.warmup_epochs)
    return optuna.pruners.NopPruner()


def optimize(cfg, storage: Any, timeout: float | None) -> Any:
    """Run trials until the study holds ``tune.trials`` finished ones (whoever ran them) or time runs out."""
    import optuna
    from optuna.trial import TrialState

    from segevo_pipeline.cluster import PathUse
    from segevo_pipeline.launch import prepare
    from segevo_pipeline.tracking import StudyRuns

    t = cfg.tune
    database = sqlite_file(t.storage)
    writes = [PathUse("tune.output", t.output, True)]
    if database is not None:
        writes.append(PathUse("tune.storage", str(Path(database).parent), True))
    root, split, tracking_uri, _ = prepare(cfg, writes=writes)
    study = optuna.create_study(study_name=t.study, storage=storage, direction="maximize", load_if_exists=True,
                                sampler=_sampler(t), pruner=_pruner(cfg))
    runs = StudyRuns(tracking_uri, cfg.tracking.experiment, t.study)
    out = Path(t.output) / t.study
    objective = Objective(cfg, root, split, tracking_uri, runs, out)
    deadline = None if timeout is None else time.monotonic() + timeout
    finished: list[Any] = []
    failures = 0
    waiting = False
    while True:
        optuna.storages.fail_stale_trials(study)  # a dead process's trial is failed (and queued for a retry)
        states = [tr.state for tr in study.get_trials(deepcopy=False)]
        done = sum(s in (TrialState.COMPLETE, TrialState.PRUNED) for s in states)
        running = states.count(TrialState.RUNNING)
        if done >= t.trials:
            break
        if deadline is not None and time.monotonic() > deadline:
            print(f"study {t.study}: --timeout reached, no new trial started")
            break
        if done + running >= t.trials:
            # Enough trials are running elsewhere; one may belong to a process that just died (it goes stale
            # within grace_s), so wait and look again rather than leave a dead trial unfinished.
            if not waiting:
                print(f"study {t.study}: waiting for {running} running trial(s) of other processes", flush=True)
                waiting = True
            time.sleep(t.heartbeat_s)
            continue
        waiting = False
        study.optimize(objective, n_trials=1, catch=(Exception,), callbacks=[lambda _, tr: finished.append(tr)])
        failures = failures + 1 if finished[-1].state == TrialState.FAIL else 0
        if failures >= MAX_FAILURES_IN_A_ROW:
            raise RuntimeError(f"study {t.study}: {failures} trials in a row failed; the last: {objective.last_error}")
    runs.finish_study(_best(study), write_plots(study, out), done=done >= t.trials)
    return study


class Objective:
    """One trial: the trial's config, one Ray Train run watched from here, its outputs, its MLflow child run."""

    def __init__(self, cfg, root: Path, split: dict, tracking_uri: str, runs: Any, out: Path):
        from segevo.config import search_space

        self.cfg, self.root, self.split, self.out = cfg, root, split, out
        self.tracking_uri, self.runs = tracking_uri, runs
        self.space = search_space(cfg)
        self.last_error = ""

    def __call__(self, trial: Any) -> float:
        import optuna
        from optuna.trial import TrialState

        from segevo.config import with_values
        from segevo_pipeline.launch import storage_uri
        from segevo_pipeline.results import export

        if self.cfg.tune.seed is not None:
            trial.study.sampler = _sampler(self.cfg.tune, trial.number)  # before the first suggestion samples
        values = {key: _suggest(trial, key, spec) for key, spec in self.space.items()}
        # A retried trial takes over the dead trial's run id, so Ray resumes its run from the last checkpoint.
        frozen = next(t for t in trial.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                      if t.number == trial.number)
        origin = optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(frozen)
        run_id = f"{self.cfg.tune.study}-t{trial.number if origin is None else origin}"
        trial.set_user_attr("run_id", run_id)
        folder = self.out / "trials" / run_id
        cfg = with_values(self.cfg, {**values, "train.run_id": run_id, "train.output": str(folder / "adapter")})
        self.runs.start_trial(run_id, trial.number, cfg.model_dump(mode="json"))
        start = time.perf_counter()
        try:
            result, timings, pruned_at = self._train(trial, cfg, run_id, storage_uri(cfg))
            summary = export(cfg, result, run_id, self.tracking_uri, timings, metrics_dir=folder)
        except BaseException as err:
            self.last_error = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
            self.runs.finish_trial(run_id, trial.number, "FAIL", None)
            raise
        wall = time.perf_counter() - start
        trial.set_user_attr("wall_s", round(wall, 1))
        trial.set_user_attr("epochs", summary["epochs_run"])
        trial.set_user_attr("fit_s", timings["fit_s"])
        value = summary["best_val_dice"]
        state = "PRUNED" if pruned_at is not None else "COMPLETE"
        print(f"trial {trial.number} ({run_id}): {state.lower()}, {summary['epochs_run']} epochs, best val_dice "
              f"{value:.4f}, {wall:.1f} s (Ray fit {timings['fit_s']} s)", flush=True)
        self.runs.finish_trial(run_id, trial.number, state, None if pruned_at is not None else value)
        if pruned_at is not None:
            raise optuna.TrialPruned(f"pruned after epoch {pruned_at}")
        return value

    def _train(self, trial: Any, cfg, run_id: str, storage: str) -> tuple[Any, dict, int | None]:
        """``launch`` in a thread; here, every epoch's Dice goes to Optuna and the prune verdict back to the run."""
        import ray

        from segevo_pipeline.launch import ensure_ray, launch
        from segevo_pipeline.report_relay import ReportRelay

        ensure_ray(cfg)
        relay = ReportRelay.remote()
        outcome: dict[str, Any] = {}

        def fit() -> None:
            try:
                outcome["result"] = launch(cfg, self.root, self.split, run_id, storage, self.tracking_uri, relay)
            except BaseException as err:  # handed to the driver thread below
                outcome["error"] = err

        thread = threading.Thread(target=fit, name=f"fit-{run_id}", daemon=True)
        thread.start()
        pruned_at = None
        while thread.is_alive():
            report = ray.get(relay.next_report.remote(1.0))
            if report is None:
                continue
            epoch = report["epoch"]
            trial.report(report["val_dice"], epoch)
            stop = trial.should_prune()
            if stop:
                pruned_at = epoch
                print(f"trial {trial.number} ({run_id}): pruned after epoch {epoch} "
                      f"(val_dice {report['val_dice']:.4f})", flush=True)
            relay.decide.remote(epoch, stop)
        thread.join()
        ray.kill(relay)
        if "error" in outcome:
            raise outcome["error"]
        result, timings = outcome["result"]
        return result, timings, pruned_at


def _suggest(trial: Any, key: str, spec) -> Any:
    if spec.type == "categorical":
        return trial.suggest_categorical(key, spec.choices)
    if spec.type == "int":
        return trial.suggest_int(key, spec.low, spec.high, log=spec.log)
    return trial.suggest_float(key, spec.low, spec.high, log=spec.log)


def _best(study: Any) -> dict[str, Any] | None:
    try:
        best = study.best_trial
    except ValueError:  # no complete trial yet
        return None
    return {"trial": best.number, "run_id": best.user_attrs.get("run_id"), "value": best.value,
            "params": best.params}


def _short_names(keys: list[str]) -> dict[str, str]:
    """The shortest dotted suffix that tells each key apart: ``adapters.experts.MRI.rank`` -> ``rank``."""
    names = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            suffix = ".".join(parts[-n:])
            if sum(k == suffix or k.endswith("." + suffix) for k in keys) == 1 or n == len(parts):
                names[key] = suffix
                break
    return names


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def print_report(study: Any, storage: str) -> None:
    """The best trial and a table of every trial: number, state, value, epochs, duration, parameters."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    counts = {s.name.lower(): n for s in TrialState if (n := sum(t.state == s for t in trials))}
    print(f"study {study.study_name} ({storage}): {len(trials)} trials"
          + (": " + ", ".join(f"{n} {s}" for s, n in counts.items()) if counts else ""))
    keys = sorted({k for t in trials for k in t.params}, key=lambda k: (k.count("."), k), reverse=True)
    names = _short_names(keys)
    best = _best(study)
    if best is not None:
        params = ", ".join(f"{names[k]}={_format(v)}" for k, v in best["params"].items())
        print(f"best: trial {best['trial']} ({best['run_id']}), val_dice {best['value']:.4f}: {params}")
    header = ["#", "state", "val_dice", "epochs", "time_s", *(names[k] for k in keys)]
    rows = []
    for t in trials:
        seconds = None if t.datetime_start is None else (
            (t.datetime_complete or datetime.now()) - t.datetime_start).total_seconds()
        last = t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None
        rows.append([str(t.number), t.state.name, _format(t.value if t.value is not None else last),
                     _format(t.user_attrs.get("epochs")), "-" if seconds is None else f"{seconds:.1f}",
                     *(_format(t.params.get(k)) for k in keys)])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  " + "  ".join(c.rjust(w) if i != 1 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths,
                                                                                                     strict=True))))


def write_profile(cfg, study: Any, path: Path) -> None:
    """The base config with the best trial's values: a full profile that ``load_config`` accepts."""
    import yaml

    from segevo.config import load_config, with_values
    from segevo.io import atomic_write_bytes

    best = _best(study)
    if best is None:
        raise UserError(f"study {study.study_name} has no complete trial yet: no profile written")
    profile = with_values(cfg, best["params"])
    header = (f"# Written by segevo tune: study {study.study_name}, trial {best['trial']} ({best['run_id']}), "
              f"val_dice {best['value']:.4f}.\n# Tuned: "
              + ", ".join(f"{k}={v}" for k, v in best["params"].items()) + "\n")
    text = header + yaml.safe_dump(profile.model_dump(mode="json"), sort_keys=False)
    atomic_write_bytes(path, text.encode())
    load_config(path)  # what was written is a valid profile
    print(f"profile -> {path}")


def write_plots(study: Any, out: Path) -> list[Path]:
    """Optimisation history, parameter importances, slice, contour (LoRA rank x pool size), per-epoch Dice: HTML
    (plotly, one shared plotly.min.js so it opens offline) and PNG (matplotlib), plus trials.csv."""
    import optuna.visualization as plotly_vis
    import optuna.visualization.matplotlib as mpl_vis

    plt = pyplot()
    out.mkdir(parents=True, exist_ok=True)
    keys = sorted({k for t in study.get_trials(deepcopy=False) for k in t.params})
    rank = next((k for k in keys if k.startswith("adapters.experts.") and k.endswith(".rank")), None)
    pair = [rank, "priors.pool_size"] if rank and "priors.pool_size" in keys else keys[:2]
    plots = {"history": ("plot_optimization_history", {}), "importances": ("plot_param_importances", {}),
             "slice": ("plot_slice", {}), "contour": ("plot_contour", {"params": pair}),
             "intermediate": ("plot_intermediate_values", {})}
    files = []
    study.trials_dataframe().to_csv(out / "trials.csv", index=False)
    files.append(out / "trials.csv")
    for name, (function, kwargs) in plots.items():
        try:
            getattr(plotly_vis, function)(study, **kwargs).write_html(out / f"{name}.html",
                                                                      include_plotlyjs="directory")
            axes = getattr(mpl_vis, function)(study, **kwargs)
            figure = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
            figure.savefig(out / f"{name}.png", dpi=100, bbox_inches="tight")
            plt.close(figure)
            files += [out / f"{name}.html", out / f"{name}.png"]
        except Exception as err:  # too few trials for a plot is normal early on; it never fails the study
            print(f"plot {name} skipped: {str(err).splitlines()[0] if str(err) else type(err).__name__}")
    if (out / "plotly.min.js").is_file():
        files.append(out / "plotly.min.js")
    print(f"plots -> {out}")
    return files
