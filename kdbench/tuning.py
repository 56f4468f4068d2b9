"""``kdbench tune``: equal-budget hyperparameter search with Optuna, on the validation split only.

One Optuna study per track, pair and method, named ``<suite>:<track>:<teacher>:<student>:<method>``, in Optuna's
RDB storage: an sqlite file under ``$KDBENCH_HOME`` by default, or any database URL (e.g. PostgreSQL), so a killed
search resumes where it was and several processes, on one machine or many, share a study (Optuna's own distributed
mode). A trial suggests the suite's training hyperparameters (``tune.train_space``, the same for every method) and
the method's own (its ``search_space``), trains the row's run once per tuning seed through the normal pipeline with
the test split sealed, and scores the mean final validation top-1. TPE samples (its first half of the budget at
random); a median pruner stops a trial whose validation curve falls below the median of earlier trials at the same
seed and epoch (never in the first half of a seed's epochs). A trial whose loss diverges counts as pruned.

Every row gets the suite's budget: its outcome is the best of the study's first ``budget`` trials by number that did
not fail (completed or pruned), even if processes sharing the study ran a few more; a process waits for the others'
trials among those before it computes the outcome, so every process computes the same one. The outcome goes to the suite's tuning file
(kdbench.tuned), with plots of the study beside it; every trial is an MLflow run nested under its study's run.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import optuna
import sqlalchemy
from filelock import FileLock
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState
from scipy import stats

from kdbench.config import RunSpec, sha256_of
from kdbench.errors import KdbenchError
from kdbench.method import METHODS, validate_config
from kdbench.paths import kdbench_home
from kdbench.records import git_state, write_atomic
from kdbench.runner import Placement, track_data, validation_curve
from kdbench.suite import Suite
from kdbench.tracking import log_trial
from kdbench.train import DivergedError
from kdbench.tuned import (
    TuneSpec,
    TunedValues,
    TuningEntry,
    TuningFile,
    load_tuning,
    tuned_sha256,
    with_train_values,
)

HEARTBEAT_SECONDS, GRACE_SECONDS = 10, 30  # a trial without a heartbeat for GRACE_SECONDS is failed and retried
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED)
HEARTBEAT = "heartbeat_recorded"  # user attribute: the number of the trial whose first heartbeat was written


def default_storage() -> str:
    return f"sqlite:///{kdbench_home() / 'tuning.db'}"


def study_name(spec: RunSpec) -> str:
    return f"{spec.suite}:{spec.track}:{spec.pair}:{spec.method}"


class _MarkingStorage(optuna.storages.RDBStorage):
    """Optuna's RDB storage that marks a trial (user attribute HEARTBEAT: its number) once its first heartbeat is
    written. Optuna's stale-trial check never fails a running trial without a heartbeat, and its heartbeat thread
    runs beside the objective, so a process killed early in a trial can leave one; the mark, written after the
    heartbeat, tells ``fail_dead_trials`` which trials have none."""

    def record_heartbeat(self, trial_id: int) -> None:
        super().record_heartbeat(trial_id)
        marked = self.__dict__.setdefault("_marked", set())
        if trial_id not in marked:
            try:
                self.set_trial_user_attr(trial_id, HEARTBEAT, self.get_trial_number_from_id(trial_id))
            except optuna.exceptions.UpdateFinishedTrialError:
                pass  # the trial ended before its heartbeat thread first ran
            marked.add(trial_id)


def _rdb_storage(storage: str, attempts: int = 5) -> optuna.storages.RDBStorage:
    """Optuna's RDB storage at ``storage``. Processes opening a new database at the same moment all create its
    schema, and all but one fail ("table … already exists", "UNIQUE constraint failed: alembic_version"): the
    schema is there when they try again."""
    for attempt in range(1, attempts + 1):
        try:
            return _MarkingStorage(
                storage, heartbeat_interval=HEARTBEAT_SECONDS, grace_period=GRACE_SECONDS,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2))
        except sqlalchemy.exc.DatabaseError as exc:
            error = exc
            time.sleep(0.2 * attempt)
        except Exception as exc:  # noqa: BLE001 - a bad URL or an unreachable server, in one line
            error = exc
            break
    first_line = str(error).splitlines()[0] if str(error) else ""
    raise KdbenchError(f"--storage {storage}: cannot open it ({type(error).__name__}: {first_line})") from None


def open_study(name: str, storage: str, budget: int) -> optuna.Study:
    """The study ``name`` in ``storage``, created if new; a trial left running by a killed process is failed after
    GRACE_SECONDS without a heartbeat and enqueued again with the same parameters."""
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rdb = _rdb_storage(storage)
    try:
        started = rdb.get_n_trials(rdb.get_study_id_from_name(name))
    except KeyError:
        started = 0
    # seeded by the study and how far it got: an uninterrupted search repeats exactly, a resumed or second
    # process does not redraw the trials already made
    seed = int(sha256_of({"study": name, "trials": started})[:8], 16)
    return optuna.create_study(
        study_name=name, storage=rdb, direction="maximize", load_if_exists=True,
        sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(1, budget // 2)),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=max(1, budget // 4)))


def counted_trials(study: optuna.Study, budget: int) -> list[FrozenTrial]:
    """The study's first ``budget`` trials by number that did not fail, those already finished: what the outcome
    is chosen from once all of them are (``wait_for_counted``)."""
    first = [t for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
             if t.state != TrialState.FAIL][:budget]
    return [t for t in first if t.state in COUNTED]


def wait_for_counted(study: optuna.Study, budget: int, log: Callable[[str], None]) -> None:
    """Wait until the first ``budget`` trials by number are all finished (another process may still be running one
    of them), so the outcome does not depend on which process computes it, or when. A trial of a killed process
    fails (``fail_dead_trials``) and the next trial takes its place."""
    announced = False
    while len(counted_trials(study, budget)) < budget:
        if not announced:
            log(f"  waiting for another process's trial(s) among the study's first {budget}")
            announced = True
        fail_dead_trials(study)
        time.sleep(HEARTBEAT_SECONDS / 2)


def fail_dead_trials(study: optuna.Study) -> None:
    """Fail the running trials whose process died: those whose heartbeat is GRACE_SECONDS old (Optuna's check,
    which enqueues them again), and those whose process died between creating the trial and its first heartbeat,
    which Optuna's check never fails: running for GRACE_SECONDS without the mark of a heartbeat (_MarkingStorage)."""
    optuna.storages.fail_stale_trials(study)
    now = datetime.datetime.now()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        beating = trial.user_attrs.get(HEARTBEAT) == trial.number  # a retried trial inherits its first try's mark
        if not beating and (now - trial.datetime_start).total_seconds() > GRACE_SECONDS:
            study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)


def suggest(trial: optuna.Trial, name: str, space) -> float | int | str | bool:
    if isinstance(space, FloatDistribution):
        return trial.suggest_float(name, space.low, space.high, log=space.log, step=space.step)
    if isinstance(space, IntDistribution):
        return trial.suggest_int(name, space.low, space.high, log=space.log, step=space.step)
    if isinstance(space, CategoricalDistribution):
        return trial.suggest_categorical(name, space.choices)
    raise KdbenchError(f"{name}: unsupported search space {space!r}")


def trial_spec(base: RunSpec, values: TunedValues) -> RunSpec:
    """``base`` with a trial's (or an outcome's) values."""
    method_config = validate_config(METHODS.get(base.method), {**base.method_config, **values.method})
    return dataclasses.replace(base, method_config=method_config.model_dump(mode="json"),
                               train=with_train_values(base.train, values.train))


def _values(params: dict) -> TunedValues:
    return TunedValues(method={k.removeprefix("method."): v for k, v in params.items() if k.startswith("method.")},
                       train={k.removeprefix("train."): v for k, v in params.items() if k.startswith("train.")})


class Objective:
    """One trial: suggest, train on every tuning seed (validation only), report the curve, score the mean."""

    def __init__(self, base: RunSpec, tune: TuneSpec, place: Placement):
        self.base, self.tune, self.place = base, tune, place
        self.seeds = tune.seeds[base.track]
        self.space = METHODS.get(base.method).search_space

    def __call__(self, trial: optuna.Trial) -> float:
        params = {f"train.{k}": suggest(trial, f"train.{k}", r.distribution()) for k, r in self.tune.train_space.items()}
        params |= {f"method.{k}": suggest(trial, f"method.{k}", space) for k, space in self.space.items()}
        spec = trial_spec(self.base, _values(params))
        trial.set_user_attr("pid", os.getpid())
        epochs, finals, curve = spec.train.epochs, [], []

        def report(seed_index: int, row: dict) -> None:
            curve.append(row["val_top1"])
            trial.report(row["val_top1"], seed_index * epochs + row["epoch"])
            if row["epoch"] > epochs // 2 and trial.should_prune():  # never in a seed's first half
                raise optuna.TrialPruned(f"validation top-1 {row['val_top1']:.2f} % at epoch {row['epoch']} of seed "
                                         f"{self.seeds[seed_index]}: below the median of earlier trials")

        try:
            for i, seed in enumerate(self.seeds):
                history = validation_curve(dataclasses.replace(spec, seed=seed), self.place,
                                           lambda row, i=i: report(i, row))
                finals.append(history[-1]["val_top1"])
        except DivergedError as exc:
            trial.set_user_attr("diverged", str(exc))
            raise optuna.TrialPruned(f"diverged: {exc}") from None
        finally:
            trial.set_user_attr("val_top1", finals)
            log_trial(study_name(self.base), trial.number, params, curve, finals)
        return statistics.fmean(finals)


def tune_row(base: RunSpec, tune: TuneSpec, budget: int, storage: str, place: Placement,
             log: Callable[[str], None]) -> tuple[TuningEntry, optuna.Study]:
    """Run (or resume, or join) the row's study until it has ``budget`` finished trials; its outcome."""
    name = study_name(base)
    study = open_study(name, storage, budget)
    done = len(counted_trials(study, budget))
    if done < budget:
        log(f"{name}: {done} of {budget} trials finished; tuning on seeds {list(tune.seeds[base.track])}")

        def progress(study: optuna.Study, trial: FrozenTrial) -> None:
            finished = len(counted_trials(study, budget))
            value = f"validation top-1 {trial.value:.2f} %" if trial.value is not None else trial.state.name.lower()
            log(f"  [{finished}/{budget}] trial {trial.number}: {value}  {_short(trial.params)}")

        study.optimize(Objective(base, tune, place), gc_after_trial=False, callbacks=[
            optuna.study.MaxTrialsCallback(budget, states=COUNTED), progress])
    wait_for_counted(study, budget, log)
    return outcome(study, base, tune, budget, place), study


def outcome(study: optuna.Study, base: RunSpec, tune: TuneSpec, budget: int, place: Placement) -> TuningEntry:
    """The best completed trial among the first ``budget`` finished ones, as a tuning-file entry."""
    counted = counted_trials(study, budget)
    complete = [t for t in counted if t.state == TrialState.COMPLETE]
    if not complete:
        raise KdbenchError(f"{study.study_name}: all {len(counted)} counted trials were pruned or diverged; widen "
                           "the search space or raise the budget")
    best = max(complete, key=lambda t: (t.value, -t.number))
    finals = best.user_attrs["val_top1"]
    low, high = _t_interval(finals)
    seeds = tune.seeds[base.track]
    method_space = METHODS.get(base.method).search_space
    return TuningEntry(
        track=base.track, pair=base.pair, method=base.method, values=_values(best.params), study=study.study_name,
        budget=budget, trials=len(counted), seeds=seeds, best_val_top1=best.value, interval=(low, high),
        study_sha256=sha256_of([{"number": t.number, "state": t.state.name, "params": t.params, "value": t.value,
                                 "curve": {str(k): v for k, v in sorted(t.intermediate_values.items())}}
                                for t in counted]),
        tuned_sha256=tuned_sha256(track_data(base, place).description, base.pair, base.train, base.method,
                                  base.method_version, base.method_config, method_space, tune.train_space, budget,
                                  seeds),
        code_version=git_state()[0])


def _t_interval(values: list[float]) -> tuple[float, float]:
    """95 % Student-t interval of the mean (the mean twice for a single seed)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, mean
    low, high = stats.t.interval(0.95, len(values) - 1, loc=mean, scale=stats.sem(values))
    return (mean, mean) if math.isnan(low) else (float(low), float(high))


def _params(values: TunedValues) -> dict:
    return {f"method.{k}": v for k, v in values.method.items()} | {f"train.{k}": v for k, v in values.train.items()}


def _short(params: dict) -> str:
    return ", ".join(f"{k.split('.', 1)[1]} {v:.3g}" if isinstance(v, float) else f"{k.split('.', 1)[1]} {v}"
                     for k, v in params.items())


def write_entry(path: Path, suite: str, entry: TuningEntry) -> None:
    """Add or replace the row's entry in the tuning file (processes sharing it take turns).

    An entry that differs only in ``code_version`` is the same study's outcome re-read by a later checkout: the
    file keeps the commit it was tuned from."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(path.with_name(f".{path.name}.lock")):
        entries = load_tuning(path, suite)
        key = (entry.track, entry.pair, entry.method)
        if key not in entries or entries[key].model_copy(update={"code_version": entry.code_version}) != entry:
            entries[key] = entry
        tuning = TuningFile(suite=suite, entries=tuple(entries[k] for k in sorted(entries)))
        write_atomic(path, tuning.model_dump_json(indent=1) + "\n")


def write_plots(study: optuna.Study, entry: TuningEntry, folder: Path) -> list[Path]:
    """Optuna's optimisation history and parameter importances of the study, as PNGs under ``folder``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as plots

    stem = folder / entry.track / entry.pair.replace(":", "--") / entry.method
    stem.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for kind, plot in (("history", plots.plot_optimization_history), ("importance", plots.plot_param_importances)):
        try:
            with warnings.catch_warnings():  # e.g. "too few trials to compute importances": said below instead
                warnings.simplefilter("ignore")
                axes = plot(study)
        except (ValueError, RuntimeError) as exc:  # e.g. importances of a study with fewer than two completed trials
            print(f"  no {kind} plot for {study.study_name}: {exc}", file=sys.stderr)
            continue
        path = stem.with_name(f"{stem.name}.{kind}.png")
        axes.figure.savefig(path, dpi=80, bbox_inches="tight", metadata={"Software": None})
        plt.close(axes.figure)
        written.append(path)
    return written


def tune(suite: Suite, specs: list[RunSpec], trials: int | None, storage: str | None, output: Path,
         place: Placement, log: Callable[[str], None]) -> list[TuningEntry]:
    """Tune every row of ``specs`` (one spec per row; its seed is ignored) with the same budget, writing each
    outcome to ``output`` as soon as its study is done."""
    if suite.tune is None:
        raise KdbenchError(f"suite {suite.name} has no tune section (budget, tuning seeds, training search space); "
                           "add one as benchmarks/suites/cpu.yaml does")
    missing = sorted({s.track for s in specs} - set(suite.tune.seeds))
    if missing:
        raise KdbenchError(f"suite {suite.name}: tune.seeds names no tuning seeds for track {missing[0]}")
    budget = trials or suite.tune.trials
    storage = storage or default_storage()
    if storage == default_storage():
        kdbench_home().mkdir(parents=True, exist_ok=True)
    entries = []
    for base in specs:
        entry, study = tune_row(base, suite.tune, budget, storage, place, log)
        write_entry(output, suite.name, entry)
        write_plots(study, entry, output.with_suffix(""))
        low, high = entry.interval
        log(f"{entry.study}: best validation top-1 {entry.best_val_top1:.2f} % [{low:.2f}, {high:.2f}] of "
            f"{entry.trials} trials, with {_short(_params(entry.values))}")
        entries.append(entry)
    return entries
