"""kdbench tune: search spaces, the validation-only objective, the tuning file, resuming, sharing, staleness."""

from __future__ import annotations

import datetime
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from conftest import run_suite_once
from kdbench.errors import KdbenchError
from kdbench.method import METHODS, Method, MethodConfig, register_method
from kdbench.suite import expand, load_suite

SUITE = """\
name: tunetiny
tier: cpu
seeds: [0]
methods: {baseline: {}, vanilla_kd: {}}
measure: {threads: 1, throughput_batch: 16, min_run_time: 0.01}
tune:
  trials: 2
  file: tuning.json
  seeds: {mnist1d: [100]}
  train_space:
    lr: {low: 0.002, high: 0.05}
tracks:
  mnist1d:
    pairs: [{teacher: cnn1d_w8, student: cnn1d_w4}]
    limit: {train: 400, val: 200}
    teacher_train: {epochs: 2, batch_size: 100, lr: 0.01, threads: 1}
    train: {epochs: 3, batch_size: 100, lr: 0.01, threads: 1}
"""
PAIR = "cnn1d_w8:cnn1d_w4"


def test_every_search_space_holds_its_methods_defaults():
    for name in METHODS.names():
        cls = METHODS.get(name)
        defaults = cls.Config()
        for field, space in cls.search_space.items():
            assert space.low <= getattr(defaults, field) <= space.high, (name, field)
        if name != "baseline":
            assert cls.search_space, f"{name} declares nothing to tune"


def test_a_default_outside_the_search_space_is_refused():
    class OutsideConfig(MethodConfig):
        weight: float = 50.0

    with pytest.raises(KdbenchError, match="default of 'weight' .*outside its search space"):
        @register_method("outside_space")
        class Outside(Method):  # noqa: F841 - refused at registration
            Config = OutsideConfig
            search_space = {"weight": FloatDistribution(0.1, 10.0, log=True)}

            def loss(self, student, teacher, target, progress):
                return {}


def test_tuning_seeds_must_not_be_reported_seeds(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(SUITE.replace("seeds: {mnist1d: [100]}", "seeds: {mnist1d: [0, 100]}"))
    with pytest.raises(KdbenchError, match=r"tune.seeds of mnist1d include reported seed\(s\) \[0\]"):
        load_suite(str(path))


class Tripwire:
    """A test split that fails the test on any use."""

    def __getattr__(self, name):
        raise AssertionError(f"the test split was read while tuning (.{name})")

    def __len__(self):
        raise AssertionError("the test split was read while tuning (len)")


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, session_home):
    """The tiny suite tuned once (2 rows × 2 trials) with the test split a tripwire and the production seal off,
    then its tuned rows run; (folder, storage URL, captured log)."""
    from dataclasses import replace

    import kdbench.runner
    from kdbench.cli import main

    root = tmp_path_factory.mktemp("tune")
    (root / "suite.yaml").write_text(SUITE)
    storage = f"sqlite:///{root / 'optuna.db'}"
    load = kdbench.runner.load_track
    mp = pytest.MonkeyPatch()
    mp.setenv("KDBENCH_HOME", str(session_home))
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    mp.setattr("kdbench.runner.sealed", lambda data: data)  # whatever reads the test split now trips the wire
    mp.setattr("kdbench.runner.load_track", lambda *a: replace(load(*a), test=Tripwire()))
    kdbench.runner._loaded.cache_clear()
    try:
        assert main(["tune", "--suite", str(root / "suite.yaml"), "--storage", storage]) == 0
    finally:
        mp.undo()
        kdbench.runner._loaded.cache_clear()
    run_suite_once(root, SUITE, session_home)  # the tuned rows, records as from a clean checkout
    return root, storage


def test_tuning_file_has_every_row_with_the_budget(tuned):
    root, storage = tuned
    data = json.loads((root / "tuning.json").read_text())
    assert data["suite"] == "tunetiny"
    entries = {e["method"]: e for e in data["entries"]}
    assert set(entries) == {"baseline", "vanilla_kd"}
    for method, entry in entries.items():
        study = optuna.load_study(study_name=entry["study"], storage=storage)
        finished = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
        assert entry["budget"] == entry["trials"] == 2 == len(finished)
        best = max((t for t in finished if t.value is not None), key=lambda t: t.value)
        assert entry["best_val_top1"] == best.value
        assert entry["interval"] == [best.value, best.value]  # one tuning seed: no spread to estimate
        assert set(entry["values"]["train"]) == {"lr"}
        assert set(entry["values"]["method"]) == set(METHODS.get(method).search_space)
        for kind in ("history", "importance"):
            assert (root / "tuning" / "mnist1d" / "cnn1d_w8--cnn1d_w4" / f"{method}.{kind}.png").stat().st_size > 0


def test_tuned_rows_run_with_the_chosen_values_and_say_so(tuned):
    root, _ = tuned
    entry = next(e for e in json.loads((root / "tuning.json").read_text())["entries"] if e["method"] == "vanilla_kd")
    (spec,) = expand(load_suite(str(root / "suite.yaml")), methods=["vanilla_kd"])
    assert spec.train.lr == entry["values"]["train"]["lr"]
    assert spec.method_config["temperature"] == entry["values"]["method"]["temperature"]
    assert spec.tuning == {"study": entry["study"], "budget": 2, "study_sha256": entry["study_sha256"]}
    record = json.loads((root / "results" / "tunetiny" / "mnist1d" / "cnn1d_w8--cnn1d_w4" / "vanilla_kd" /
                         "seed0.json").read_text())
    assert record["config"]["tuning"] == spec.tuning
    (untuned,) = expand(load_suite(str(root / "suite.yaml")), methods=["vanilla_kd"], tuned=False)
    assert untuned.tuning is None and untuned.train.lr == 0.01


def test_every_trial_is_a_nested_mlflow_run(tuned):
    import mlflow

    root, _ = tuned
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["kdbench-tune"], output_format="list")
    studies = {r.data.tags["study"]: r.info.run_id for r in runs if r.data.tags["kind"] == "study"}
    trials = [r for r in runs if r.data.tags["kind"] == "trial"]
    assert len(studies) == 2 and len(trials) == 4
    assert all(r.data.tags["mlflow.parentRunId"] == studies[r.data.tags["study"]] for r in trials)
    assert all("train.lr" in r.data.params and "val_top1" in r.data.metrics for r in trials)


def _problems(root, suite_text):
    """The leaderboard's tuning problems and notes for the tuned records, against the suite as ``suite_text`` has it
    (its tuning file: root/tuning.json)."""
    from kdbench import leaderboard

    (root / "changed.yaml").write_text(suite_text)
    frame = leaderboard._frame(root / "results")
    mp = pytest.MonkeyPatch()
    mp.setattr(leaderboard, "load_suite", lambda name: load_suite(str(root / "changed.yaml")))
    try:
        return leaderboard._tuning_problems("tunetiny", "mnist1d", frame)
    finally:
        mp.undo()


def test_leaderboard_marks_tuned_rows(tuned, monkeypatch):
    from kdbench import leaderboard

    root, _ = tuned
    monkeypatch.setattr(leaderboard, "load_suite", lambda name: load_suite(str(root / "suite.yaml")))
    text = leaderboard.render(root / "results")
    assert "| vanilla_kd (tuned, 2 trials)" in text and "| baseline (tuned, 2 trials)" in text
    assert _problems(root, SUITE) == ([], {})


@pytest.mark.parametrize("old, new, why", [
    ("train: {epochs: 3, batch_size: 100, lr: 0.01", "train: {epochs: 3, batch_size: 100, lr: 0.02",
     "training config"),
    ("trials: 2", "trials: 3", "tuned with 2 trials, the suite's budget is 3"),
    ("high: 0.05}", "high: 0.1}", "search spaces"),
])
def test_stale_tuning_is_named(tuned, old, new, why):
    root, _ = tuned
    assert old in SUITE
    problems, _ = _problems(root, SUITE.replace(old, new))
    assert len(problems) == 2 and all("its tuning is stale" in p and why in p for p in problems)


def test_a_pair_is_tuned_only_when_every_row_is(tuned, tmp_path):
    """With one of the two rows' outcomes left, the suite runs both on its own settings and the leaderboard says
    the tuned records no longer match, and that the pair's tuning is under way."""
    root, _ = tuned
    entries = json.loads((root / "tuning.json").read_text())
    entries["entries"] = [e for e in entries["entries"] if e["method"] == "baseline"]
    (tmp_path / "tuning.json").write_text(json.dumps(entries))
    (tmp_path / "results").symlink_to(root / "results")
    specs = expand(load_suite(str(_suite_in(tmp_path))))
    assert all(s.tuning is None for s in specs) and {s.train.lr for s in specs} == {0.01}
    problems, notes = _problems(tmp_path, SUITE)
    assert len(problems) == 2 and all("the suite now gives None" in p for p in problems)
    assert "tune the pair's untuned rows (vanilla_kd)" in problems[0]
    assert notes == {("cnn1d_w8", "cnn1d_w4"): "- Tuning under way: 1 of this pair's 2 rows have a `kdbench tune` "
                     "outcome; the table keeps the suite file's settings until every row has one (equal budgets)."}


def test_tuning_effect_compares_each_tuned_table_with_its_untuned_records(tuned, tmp_path, session_home):
    """benchmarks/tuning_effect.py: the untuned records from a git revision, the tuned ones from results/."""
    import shutil
    import statistics

    repo = run_suite_once(tmp_path, SUITE, session_home)  # no tuning file here: the suite's own settings
    untuned = json.loads((repo / "results/tunetiny/mnist1d/cnn1d_w8--cnn1d_w4/vanilla_kd/seed0.json").read_text())
    assert "tuning" not in untuned["config"] or untuned["config"]["tuning"] is None
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(repo)]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "results"], check=True)
    subprocess.run([*git, "commit", "-qm", "untuned"], check=True)
    shutil.rmtree(repo / "results")
    shutil.copytree(tuned[0] / "results", repo / "results")
    script = os.path.join(os.getcwd(), "benchmarks", "tuning_effect.py")
    out = subprocess.run([sys.executable, script, "--before", "HEAD", "--suite", "tunetiny"], cwd=repo,
                         capture_output=True, text=True, check=True).stdout
    assert out.startswith("### mnist1d: cnn1d_w8 → cnn1d_w4")
    row = next(line for line in out.splitlines() if line.startswith("| vanilla_kd |"))
    top1 = lambda root: statistics.fmean(
        json.loads(p.read_text())["metrics"]["test_top1"]
        for p in (root / "results/tunetiny/mnist1d/cnn1d_w8--cnn1d_w4/vanilla_kd").glob("seed*.json"))
    assert f"| {untuned['metrics']['test_top1']:.2f} → {top1(tuned[0]):.2f} |" in row
    assert "of 1 with the suite's settings" in out
    missing = subprocess.run([sys.executable, script, "--before", "nosuchrev", "--suite", "tunetiny"], cwd=repo,
                             capture_output=True, text=True)
    assert missing.returncode != 0 and "--before nosuchrev: git archive failed" in missing.stderr


def _suite_in(folder):
    (folder / "suite.yaml").write_text(SUITE)
    return folder / "suite.yaml"


def _tune_process(root, storage, *args):
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    return subprocess.Popen([sys.executable, "-m", "kdbench", "tune", "--suite", str(root / "suite.yaml"),
                             "--method", "vanilla_kd", "--storage", storage, *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finished(storage, name):
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        return []
    return [t for t in study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))]


def _wait_for(condition, timeout=240, poll=0.5):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(poll)


STUDY = f"tunetiny:mnist1d:{PAIR}:vanilla_kd"


def test_a_killed_search_resumes_the_same_study(tmp_path):
    # trials long enough (no pruning before epoch 20) that the kill lands while the second one runs
    (tmp_path / "suite.yaml").write_text(SUITE.replace("epochs: 3, batch_size: 100, lr: 0.01", "epochs: 40, "
                                                       "batch_size: 100, lr: 0.01"))
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    first = _tune_process(tmp_path, storage, "--trials", "3")
    _wait_for(lambda: len(_finished(storage, STUDY)) >= 1 or first.poll() is not None, poll=0.1)
    first.send_signal(signal.SIGKILL)
    first.wait()
    before = {t.number: t.params for t in _finished(storage, STUDY)}
    assert 1 <= len(before) < 3
    second = _tune_process(tmp_path, storage, "--trials", "3")
    out, _ = second.communicate(timeout=300)
    assert second.returncode == 0, out
    assert f"{len(before)} of 3 trials finished" in out  # it found the study where the first left it
    after = {t.number: t.params for t in _finished(storage, STUDY)}
    assert len(after) >= 3 and all(after[n] == p for n, p in before.items())
    assert len(optuna.get_all_study_names(storage)) == 1


def test_two_processes_share_one_study(tmp_path):
    (tmp_path / "suite.yaml").write_text(SUITE)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    first = _tune_process(tmp_path, storage, "--trials", "4")
    _wait_for(lambda: len(_finished(storage, STUDY)) >= 1 or first.poll() is not None)
    second = _tune_process(tmp_path, storage, "--trials", "4")
    outs = [p.communicate(timeout=300)[0] for p in (first, second)]
    assert first.returncode == 0 and second.returncode == 0, outs
    assert optuna.get_all_study_names(storage) == [STUDY]
    finished = _finished(storage, STUDY)
    assert 4 <= len(finished) <= 5  # a process stops after its own trial once the study has the budget
    entry = json.loads((tmp_path / "tuning.json").read_text())["entries"][0]
    assert entry["trials"] == 4  # the outcome counts the budget's first finished trials only


def test_a_trial_orphaned_before_its_first_heartbeat_is_failed_and_replaced(tmp_path):
    # a process killed between creating a trial and its first heartbeat leaves it running with no heartbeat, which
    # Optuna's stale-trial check never fails: the next process must fail it, not wait for it for ever
    from kdbench.tuning import open_study

    _suite_in(tmp_path)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    orphan = optuna.trial.create_trial(state=TrialState.RUNNING)
    orphan.datetime_start -= datetime.timedelta(hours=1)
    open_study(STUDY, storage, budget=2).add_trial(orphan)
    process = _tune_process(tmp_path, storage, "--trials", "2")
    try:
        out, _ = process.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail(f"kdbench tune waited for the orphaned trial: {process.communicate()[0]}")
    assert process.returncode == 0, out
    trials = optuna.load_study(study_name=STUDY, storage=storage).get_trials()
    assert trials[0].state == TrialState.FAIL
    assert [t.state for t in trials[1:]] == [TrialState.COMPLETE] * 2
    assert json.loads((tmp_path / "tuning.json").read_text())["entries"][0]["trials"] == 2


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
def test_only_a_heartbeat_marks_a_trial_alive_and_a_dead_one_is_failed(tmp_path, monkeypatch):
    # the mark is written after the first heartbeat, never before: a process killed once its objective had begun but
    # before its heartbeat thread first wrote left a marked trial that no check failed (CI waited on it for ever)
    import kdbench.tuning as tuning

    monkeypatch.setattr(tuning, "GRACE_SECONDS", 2)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = tuning.open_study(STUDY, storage, budget=3)
    rdb = tuning._rdb_storage(storage)
    study_id = rdb.get_study_id_from_name(STUDY)
    orphan, stale, alive = (study.ask({"x": FloatDistribution(0, 1)}) for _ in range(3))
    assert all(tuning.HEARTBEAT not in t.study.trials[t.number].user_attrs for t in (orphan, stale, alive))
    rdb.record_heartbeat(rdb.get_trial_id_from_study_id_trial_number(study_id, stale.number))
    time.sleep(3.5)  # the orphan and the stale heartbeat are now older than GRACE_SECONDS (the clock is in seconds)
    rdb.record_heartbeat(rdb.get_trial_id_from_study_id_trial_number(study_id, alive.number))
    tuning.fail_dead_trials(study)
    trials = optuna.load_study(study_name=STUDY, storage=storage).get_trials()
    assert [t.user_attrs.get(tuning.HEARTBEAT) for t in trials[:3]] == [None, stale.number, alive.number]
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.FAIL, TrialState.RUNNING, TrialState.WAITING]
    assert trials[3].params == trials[1].params  # Optuna enqueued the stale one again (it had a heartbeat)


def _open_when_all_are_ready(storage, ready, errors):
    from kdbench.tuning import open_study

    ready.wait()
    try:
        open_study(STUDY, storage, budget=2)
    except KdbenchError as exc:
        errors.put(str(exc))


def test_processes_opening_a_new_storage_at_once_all_open_it(tmp_path):
    # each creates the schema of the new database; all but one used to fail ("table … already exists",
    # "UNIQUE constraint failed: alembic_version.version_num")
    processes = 4
    context = multiprocessing.get_context("fork")
    ready, errors = context.Barrier(processes), context.Queue()
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    workers = [context.Process(target=_open_when_all_are_ready, args=(storage, ready, errors))
               for _ in range(processes)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    assert [w.exitcode for w in workers] == [0] * processes
    assert errors.empty(), errors.get()
    assert optuna.get_all_study_names(storage) == [STUDY]


def test_a_suite_without_a_tune_section_is_refused(tiny_suite, capsys):
    from kdbench.cli import main

    assert main(["tune", "--suite", str(tiny_suite)]) == 2
    assert "has no tune section" in capsys.readouterr().err


def test_the_sealed_test_split_refuses_every_use():
    from kdbench.tracks import SealedSplit

    with pytest.raises(KdbenchError, match="sealed while tuning"):
        SealedSplit().x
    with pytest.raises(KdbenchError, match="sealed while tuning"):
        len(SealedSplit())


def test_a_finished_study_re_read_later_keeps_the_commit_it_was_tuned_from(tmp_path):
    from kdbench.tuned import TunedValues, TuningEntry, load_tuning
    from kdbench.tuning import write_entry

    entry = TuningEntry(track="mnist1d", pair=PAIR, method="baseline", values=TunedValues(method={}, train={"lr": 0.02}),
                        study="s", budget=2, trials=2, seeds=(100,), best_val_top1=90.0, interval=(90.0, 90.0),
                        study_sha256="a" * 64, tuned_sha256="b" * 64, code_version="1" * 40)
    path = tmp_path / "tuning.json"
    write_entry(path, "tunetiny", entry)
    write_entry(path, "tunetiny", entry.model_copy(update={"code_version": "2" * 40}))  # resumed from a later commit
    assert load_tuning(path, "tunetiny")[("mnist1d", PAIR, "baseline")].code_version == "1" * 40
    retuned = entry.model_copy(update={"code_version": "2" * 40, "study_sha256": "c" * 64})
    write_entry(path, "tunetiny", retuned)
    assert load_tuning(path, "tunetiny")[("mnist1d", PAIR, "baseline")] == retuned
