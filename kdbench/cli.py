"""The ``kdbench`` command (docs/architecture.md: the data flow)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from contextlib import closing
from pathlib import Path

from tabulate import tabulate

from kdbench.errors import KdbenchError

EXAMPLES = {  # shown under "examples:" in each command's --help
    "list": [
        "kdbench list methods    # one line each: version, teacher needed, taps, summary",
        "kdbench list pairs      # teacher:student pairs per track and suite (for run --pair)",
        "kdbench list models     # every model with its parameter count",
    ],
    "run": [
        "kdbench run --suite cpu    # the CPU tier: every method, 3 students per track, 15 seeds (digits: 5×5 folds)",
        "kdbench run --suite cpu --track mnist1d --method vanilla_kd --seeds 0 --results-dir /tmp/r",
        "kdbench run --suite cifar100 --data-root ~/data --pair resnet32x4:resnet8x4 --method fitnets --device cuda:0",
        "kdbench run --suite cifar100-smoke --data-root ~/data --download --device cpu    # one epoch, a few batches",
        "kdbench run --suite cpu --executor ray --address auto    # the grid as tasks on a running Ray cluster",
    ],
    "tune": [
        "kdbench tune --suite cpu --track mnist1d --method vanilla_kd    # the suite's budget; writes its tuning file",
        "kdbench tune --suite cpu --track mnist1d --method vanilla_kd --trials 4 --output /tmp/tuning.json",
        "kdbench tune --suite cpu --storage postgresql://user:pw@db/kdbench    # run this on several machines at once",
    ],
    "leaderboard": [
        "kdbench leaderboard            # regenerate leaderboard.md from results/",
        "kdbench leaderboard --check    # what CI runs: exit 1 if leaderboard.md is stale",
        "kdbench leaderboard --results-dir /tmp/r --output /tmp/r/leaderboard.md",
    ],
    "verify": [
        "kdbench verify results/cpu/mnist1d/cnn1d_w32--cnn1d_w8/vanilla_kd/seed0.json",
        ("kdbench verify results/cifar100/cifar100/resnet32x4--resnet8x4/fitnets/seed0.json --data-root ~/data "
         "--device cuda"),
    ],
    "reproduce": [
        "kdbench reproduce    # re-train the cpu suite from a cold teacher cache; compare with results/ exactly",
        "kdbench reproduce --track digits --method fitnets --seeds 0 --scratch /tmp/kd-repro    # keep what it trains",
        "kdbench reproduce --suite cifar100-smoke --data-root ~/data --results-dir /tmp/r",
    ],
    "compare": [
        "kdbench compare results/cpu/mnist1d/cnn1d_w32--cnn1d_w8/vanilla_kd results/cpu/mnist1d/cnn1d_w32--cnn1d_w8/baseline",
        "kdbench compare results/cpu/digits/cnn2d_w32--cnn2d_w8/fitnets results/cpu/digits/cnn2d_w32--cnn2d_w8/dkd",
    ],
    "sync": [
        "kdbench sync                   # into the local store (.kdbench/mlflow.db)",
        "MLFLOW_TRACKING_URI=http://mlflow.example:5000 kdbench sync --results-dir results",
    ],
    "ui": [
        "kdbench ui                     # http://127.0.0.1:5000 on the local store",
        "KDBENCH_HOME=/tmp/kd kdbench ui --port 5001",
    ],
    "new-method": [
        "kdbench new-method my_kd                       # writes methods/my_kd.py; then CONTRIBUTING.md",
        "kdbench new-method my_kd --dir ~/kd_methods    # then export KDBENCH_METHODS_PATH=~/kd_methods",
    ],
    "methods-page": [
        "kdbench methods-page            # regenerate methods/README.md from the method docstrings",
        "kdbench methods-page --check    # what CI runs: exit 1 if methods/README.md is stale",
        "kdbench methods-page --output /tmp/methods.md",
    ],
}


def _split_list(values: list[str] | None) -> list[str] | None:
    return [v for value in values for v in value.split(",") if v] if values else None


def cmd_list(args) -> int:
    from kdbench.method import METHODS
    from kdbench.models import MODELS, count_params, create_model
    from kdbench.suite import load_suite, suite_files
    from kdbench.tracks import TRACKS

    if args.what == "methods":
        from kdbench.methods_page import summary, taps_text, teacher_text

        rows = [(c.name, c.version, teacher_text(c), taps_text(c), summary(c)) for c in map(METHODS.get, METHODS)]
        headers = ["method", "version", "teacher", "taps (default config)", "summary"]
    elif args.what == "models":
        rows = []
        for name in MODELS:
            entry = MODELS.get(name)
            shape = "×".join(map(str, entry.in_shape))
            n = count_params(create_model(name, random_init=True))
            start = f"pretrained/{entry.pretrained}" if entry.pretrained else "random init"
            rows.append((name, f"{n:,}", f"{n / 1e6:.2f}M", f"{entry.num_classes} classes, input {shape}", start))
        headers = ["model", "params", "", "counted for", "starts from"]
    elif args.what == "tracks":
        rows = [(n, TRACKS.get(n).tier, TRACKS.get(n).summary) for n in TRACKS]
        headers = ["track", "tier", "data"]
    elif args.what == "suites":
        suites = [load_suite(n) for n in suite_files()]
        rows = [(s.name, s.tier, ", ".join(s.tracks), len(s.seeds), s.description) for s in suites]
        headers = ["suite", "tier", "tracks", "seeds", "description"]
    else:  # pairs
        rows = [
            (f"{p.teacher}:{p.student}", track, s.name)
            for s in (load_suite(n) for n in suite_files())
            for track, spec in s.tracks.items()
            for p in spec.pairs
        ]
        headers = ["pair (teacher:student)", "track", "suite"]
    print(tabulate(rows, headers=headers, tablefmt="simple"))
    return 0


def cmd_run(args) -> int:
    """``kdbench run``; under torchrun every process runs it, and leaves the process group at the end."""
    from kdbench.distributed import leave

    try:
        return _run(args)
    finally:
        leave()


def _run(args) -> int:
    from kdbench.distributed import is_main
    from kdbench.executor import auto_workers, execute, execute_on_ray
    from kdbench.records import would_dirty_checkout
    from kdbench.runner import is_finished, preflight, run_one, track_data
    from kdbench.suite import expand, load_suite, parse_seeds
    from kdbench.timing import time_architectures

    if args.executor == "ray" and args.workers != "auto":
        raise KdbenchError("--workers is for the local executor; on Ray each run takes the CPUs its threads need")
    if args.executor == "local" and args.address:
        raise KdbenchError("--address names a Ray cluster: add --executor ray")
    if would_dirty_checkout(Path(args.results_dir)):
        raise KdbenchError(f"--results-dir {args.results_dir} is inside the checkout but outside results/ and not "
                           "ignored by git: its records would mark every later record as made from a dirty tree; "
                           "use a folder under results/ or outside the checkout")
    suite = load_suite(args.suite)
    seeds = parse_seeds(args.seeds) if args.seeds else None
    specs = expand(suite, _split_list(args.method), _split_list(args.track), _split_list(args.pair), seeds)
    specs, place = _distributed(args, specs, _context(args, suite.tier))
    preflight(specs, place)
    results_dir = Path(args.results_dir)
    log = (lambda msg: print(msg, file=sys.stderr, flush=True))
    todo = [s for s in specs if args.force or not is_finished(results_dir, s)]
    if not is_main(place.ranks):  # the other DDP processes train each run with the main one, which reports
        for spec in todo:
            run_one(spec, results_dir, place)
        return 0
    outcome = {}
    for spec in specs:
        if spec not in todo:
            log(f"skipped {spec.label()}: a finished record with this config exists (--force redoes it)")
            outcome[spec.label()] = ("skipped", "")
    if args.executor == "ray":
        log(f"{len(todo)} run(s) to train as Ray tasks")
        runs = execute_on_ray(todo, results_dir, place, args.address, log)
    else:
        workers = auto_workers(todo, place) if args.workers == "auto" else _positive(args.workers, "--workers")
        log(f"{len(todo)} run(s) to train, {min(workers, len(todo))} at a time")
        runs = execute(todo, results_dir, place, workers, log if args.verbose else None)
    started, done = time.perf_counter(), 0
    try:
        with closing(runs):  # stops the workers however the loop ends, wherever a signal lands
            for done, (spec, record) in enumerate(runs, 1):
                top1 = record["metrics"]["test_top1"] if record["metrics"] else None
                log(_progress_line(done, len(todo), spec, record, time.perf_counter() - started))
                outcome[spec.label()] = (record["status"], f"{top1:.2f}" if top1 is not None else record["error"])
    except KeyboardInterrupt:
        log(f"stopped after {done} of {len(todo)} runs: their records are kept; the same command trains the rest "
            "(a run stopped midway resumes from its last epoch)")
        raise
    time_architectures(specs, results_dir, lambda spec: track_data(spec, place), place.device, args.force, log,
                       place.data_root)
    summary = [(s.label(), *outcome[s.label()]) for s in specs]
    print(tabulate(summary, headers=["run", "status", "test top-1 %"], tablefmt="simple", disable_numparse=True))
    print(f"{len(todo)} of {len(specs)} runs trained in {time.perf_counter() - started:.1f}s; records under {results_dir}")
    return 0


def _progress_line(done: int, total: int, spec, record: dict, elapsed: float) -> str:
    """"[i/n] run: status, test top-1 … (…s elapsed; ETA …s)", printed as each run finishes."""
    top1 = record["metrics"]["test_top1"] if record["metrics"] else None
    eta = f"; ETA {elapsed / done * (total - done):.0f}s" if done < total else ""
    result = f"test top-1 {top1:.2f}%" if top1 is not None else record["error"]
    return f"[{done}/{total}] {spec.label()}: {record['status']}, {result} ({elapsed:.0f}s elapsed{eta})"


def cmd_tune(args) -> int:
    """``kdbench tune``: the rows' Optuna studies (kdbench.tuning), resumed or joined where they exist."""
    from kdbench.suite import expand, load_suite
    from kdbench.tuned import tuning_path
    from kdbench.tuning import tune

    suite = load_suite(args.suite)
    specs = expand(suite, _split_list(args.method), _split_list(args.track), _split_list(args.pair), tuned=False)
    rows = list({(s.track, s.pair, s.method): s for s in specs}.values())  # one spec per row; seeds come from tune
    trials = _positive(args.trials, "--trials") if args.trials else None
    output = Path(args.output) if args.output else suite.tune and tuning_path(suite.tune)
    log = (lambda msg: print(msg, file=sys.stderr, flush=True))
    started = time.perf_counter()
    entries = tune(suite, rows, trials, args.storage, output, _context(args, suite.tier), log)
    table = [(e.track, e.pair, e.method, f"{e.best_val_top1:.2f}", f"[{e.interval[0]:.2f}, {e.interval[1]:.2f}]",
              e.trials, ", ".join(f"{k} {v:.3g}" for k, v in {**e.values.method, **e.values.train}.items()))
             for e in entries]
    print(tabulate(table, headers=["track", "pair", "method", "best val top-1 %", "95 % (tuning seeds)", "trials",
                                   "chosen"], tablefmt="simple", disable_numparse=True))
    print(f"{len(entries)} row(s) tuned in {time.perf_counter() - started:.1f}s; outcomes in {output}")
    return 0


def cmd_reproduce(args) -> int:
    """``kdbench reproduce``: re-train the selected runs into a scratch folder from a cold teacher cache and
    compare each with its committed record (kdbench.reproduce)."""
    import shutil
    import tempfile

    from kdbench.distributed import launched_world_size
    from kdbench.executor import auto_workers
    from kdbench.reproduce import check_scratch, cold_home, reproduce, row_verdicts, split_unrun_rows
    from kdbench.runner import preflight
    from kdbench.suite import expand, load_suite, parse_seeds

    if launched_world_size() > 1:
        raise KdbenchError("kdbench reproduce runs in one process: start it without torchrun")
    suite = load_suite(args.suite)
    seeds = parse_seeds(args.seeds) if args.seeds else None
    specs = expand(suite, _split_list(args.method), _split_list(args.track), _split_list(args.pair), seeds)
    if args.scratch:
        check_scratch(Path(args.scratch))
    specs, unrun = split_unrun_rows(specs, Path(args.results_dir))
    if unrun:
        print(f"{len(unrun)} row(s) have no committed records under {args.results_dir} yet, so nothing to reproduce "
              f"(`kdbench run` adds them): {', '.join(unrun)}", file=sys.stderr)
    if not specs:
        raise KdbenchError(f"no run of the selection has a committed record under {args.results_dir}")
    place = _context(args, suite.tier)
    workers = auto_workers(specs, place) if args.workers == "auto" else _positive(args.workers, "--workers")
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="kdbench-reproduce-")).resolve()
    log = (lambda msg: print(msg, file=sys.stderr, flush=True))
    try:
        runs = reproduce(specs, Path(args.results_dir), scratch, place, workers, log if args.verbose else None)
        with cold_home(scratch) as home, closing(runs):
            preflight(specs, place)
            log(f"{len(specs)} run(s) to re-train into {scratch / 'results'}, {min(workers, len(specs))} at a time, "
                f"teachers from a cold cache in {home}")
            outcomes, started = [], time.perf_counter()
            for done, outcome in enumerate(runs, 1):
                line = _progress_line(done, len(specs), outcome.spec, outcome.fresh, time.perf_counter() - started)
                log(f"{line}: {outcome.verdict()}")
                outcomes.append(outcome)
    finally:
        if not args.scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    table = row_verdicts(outcomes, specs)
    print(tabulate(table, headers=["track", "pair", "method", "reproduced"], tablefmt="simple", disable_numparse=True))
    exact = sum(o.reproduced for o in outcomes)
    print(f"{exact}/{len(outcomes)} records reproduced bit-exactly")
    if args.scratch:
        print(f"fresh records under {scratch / 'results'}, their teachers and MLflow store under {scratch / 'home'}",
              file=sys.stderr)
    return 0 if exact == len(outcomes) else 1


def _distributed(args, specs, place):
    """Under torchrun with several processes: every run trains with DDP on all of them, one run at a time, so
    each global batch must split evenly; joins the process group (kdbench.distributed). Else (specs, place) as given."""
    from dataclasses import replace

    from kdbench.distributed import init, launched_world_size, per_rank_batch

    world_size = launched_world_size()
    if world_size == 1:
        return specs, place
    if args.executor != "local" or args.workers not in ("auto", "1"):
        raise KdbenchError("under torchrun all processes train each run together, one run at a time: "
                           "drop --workers and --executor")
    for spec in specs:
        per_rank_batch(spec.train.batch_size, world_size)
    ranks = init(place.device)
    return [replace(s, world_size=world_size) for s in specs], replace(place, device=ranks.device, ranks=ranks)


def _positive(text: str, flag: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise KdbenchError(f"{flag} {text!r}: expected a whole number ≥ 1 or 'auto'")
    return int(text)


def _context(args, tier: str):
    """Data root, download flag and device from the command line; ``auto`` takes the GPU for GPU-tier suites only,
    so a CPU-tier run never moves to a GPU. On Ray the cluster's GPUs count, not this machine's."""
    import torch

    from kdbench.runner import Placement

    if args.data_root and not Path(args.data_root).is_dir():
        raise KdbenchError(f"--data-root {args.data_root} is not a folder")
    device = args.device
    if device == "auto":
        device = "cuda" if tier == "gpu" and torch.cuda.is_available() else "cpu"
    elif device.startswith("cuda") and not torch.cuda.is_available() and getattr(args, "executor", "") != "ray":
        raise KdbenchError(f"--device {device}: this machine has no CUDA GPU; use --device cpu")
    return Placement(Path(args.data_root) if args.data_root else None, getattr(args, "download", False), device)


def cmd_leaderboard(args) -> int:
    from kdbench.leaderboard import write_or_check
    from kdbench.plots import PLOT_DIR

    wrong = write_or_check(Path(args.results_dir), Path(args.output), args.check)
    if not args.check:
        print(f"wrote {args.output} and its plots under {Path(args.output).parent / PLOT_DIR}")
    elif wrong == "rows":
        print(f"{args.results_dir} has rows that cannot be published (above): finish their seeds with `kdbench run`, "
              "re-run rows made with an older method version, and re-run records made from uncommitted code after "
              "committing it")
    elif wrong == "stale":
        print(f"{args.output} or its plots differ from what {args.results_dir} gives; run `kdbench leaderboard`")
    else:
        print(f"{args.output} and its plots are up to date; every row is complete and made from committed code")
    return 0 if wrong is None else 1


def _in_checkout(folder: Path, option: str) -> Path:
    """A repository folder to write into; an installed wheel has none, so the user names one."""
    from kdbench.paths import CHECKOUT

    if CHECKOUT is None:
        raise KdbenchError(f"kdbench runs from an installed package, not a repository checkout, so it has no "
                           f"methods/ folder to write into; pass {option} with a folder of your own")
    return folder


def cmd_new_method(args) -> int:
    from kdbench.method import DEFAULT_METHODS_DIR
    from kdbench.template import write_method_file

    directory = Path(args.dir).resolve() if args.dir else _in_checkout(DEFAULT_METHODS_DIR, "--dir")
    path = write_method_file(args.name, directory)
    n = args.name
    found = "" if directory == DEFAULT_METHODS_DIR else f"  0. export KDBENCH_METHODS_PATH={directory}\n"
    print(f"wrote {path}: method {n}, registered but unfinished (its loss raises NotImplementedError).\n"
          f"Next (CONTRIBUTING.md):\n{found}"
          "  1. fill in the docstring (paper, reference implementation, formula, defaults and their sources,\n"
          "     Deviations:), the Config fields, taps and loss\n"
          f"  2. pytest tests/test_method_contract.py -k {n}    # then once with --update-golden\n"
          f"  3. tests/test_{n}.py: your loss's values computed by hand on fixed tensors\n"
          f"  4. kdbench tune --suite cpu --method {n}    # the suite's trial budget, validation split only\n"
          f"  5. kdbench run --suite cpu --method {n}    # every CPU pair and seed, records under results/\n"
          "  6. kdbench leaderboard && kdbench methods-page    # commit both with the records")
    return 0


def cmd_methods_page(args) -> int:
    from kdbench.method import DEFAULT_METHODS_DIR
    from kdbench.methods_page import write_or_check

    output = Path(args.output) if args.output else _in_checkout(DEFAULT_METHODS_DIR, "--output") / "README.md"
    ok = write_or_check(output, args.check)
    if args.check:
        print(f"{output} is up to date" if ok else f"{output} is stale; run `kdbench methods-page`")
    else:
        print(f"wrote {output}")
    return 0 if ok else 1


def cmd_verify(args) -> int:
    from kdbench.records import environment, load_record
    from kdbench.verify import format_pair, other_machine, teacher_note, unnamed_instructions, verify

    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if args.verbose else None
    record = load_record(Path(args.record))
    print(f"re-running {record.track} {record.method} seed {record.seed} from {args.record} …", file=sys.stderr, flush=True)
    place = _context(args, "gpu" if record.env.gpu else "cpu")
    rows = verify(Path(args.record), place, log)
    table = [(name, *format_pair(old, new), "match" if ok else "MISMATCH") for name, old, new, ok in rows]
    print(tabulate(table, headers=["metric", "recorded", "re-run", ""], tablefmt="simple", disable_numparse=True))
    mismatches = sum(not ok for *_, ok in rows)
    # on another machine a re-trained teacher differs too: the machine is the explanation, not the cache
    here = {"env": environment(record.env.threads, place.device)}
    machine = other_machine(record.model_dump(), here)
    notes = [machine or teacher_note(record, rows), unnamed_instructions(record.model_dump(), here)] if mismatches else []
    print("verified: every deterministic metric matches" if not mismatches
          else "; ".join([f"{mismatches} metric(s) differ", *filter(None, notes)]))
    return 0 if not mismatches else 1


def cmd_compare(args) -> int:
    """``kdbench compare A B``: is the row in folder A better than the row in folder B (same analysis as the
    leaderboard's Δ: runs paired by seed, two-way bootstrap over seeds and test samples)?"""
    from kdbench.predictions import outcomes
    from kdbench.records import load_records
    from kdbench.stats import ALPHA, compare

    rows = []
    for folder in (args.a, args.b):
        records = [rec.model_dump() for _, rec in load_records(Path(folder)) if rec.status == "finished"]
        if not records:
            raise KdbenchError(f"{folder}: no finished run records (seed*.json) in it or below it")
        if any(not r.get("predictions") for r in records):
            raise KdbenchError(f"{folder}: its records have no per-sample predictions (made before schema 2); "
                               "re-run them with `kdbench run --force`")
        names = {(r["track"], r["teacher"], r["student"], r["method"], r["config_sha256"]) for r in records}
        if len(names) > 1:
            raise KdbenchError(f"{folder}: holds records of {len(names)} different rows; name one row's folder")
        rows.append((records, names.pop()))
    (recs_a, name_a), (recs_b, name_b) = rows
    if name_a[0] != name_b[0]:
        raise KdbenchError(f"the rows are on different tracks ({name_a[0]}, {name_b[0]}): their test sets differ")
    common = sorted({r["seed"] for r in recs_a} & {r["seed"] for r in recs_b})
    if not common:
        raise KdbenchError("the two rows share no seed: runs are paired by seed number")
    diff = compare(outcomes(recs_a), outcomes(recs_b))
    label_a, label_b = (f"{n[3]} ({n[1]}→{n[2]})" for n in (name_a, name_b))
    print(f"{label_a} − {label_b} on {name_a[0]}: Δ {diff.delta:+.2f} points, 95 % interval "
          f"[{diff.low:+.2f}, {diff.high:+.2f}], p = {diff.p_value:.4f} ({diff.seeds} paired seeds × "
          f"{diff.samples:,} test samples)")
    if diff.p_value < ALPHA:
        print(f"{label_a} is {'better' if diff.delta > 0 else 'worse'} than {label_b} (significant at α = {ALPHA})")
    else:
        print(f"no significant difference at α = {ALPHA}")
    return 0


def cmd_sync(args) -> int:
    from kdbench.records import load_records
    from kdbench.tracking import sync, tracking_uri

    records = [rec.model_dump(mode="json") for _, rec in load_records(Path(args.results_dir))]
    logged = sync(records)
    print(f"{logged} run(s) logged to {tracking_uri()}; {len(records)} record(s) under {args.results_dir}")
    return 0


def cmd_ui(args) -> int:
    from kdbench.tracking import artifacts_uri, tracking_uri

    uri = tracking_uri()
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--port", str(args.port)]
    if artifacts_uri(uri):
        cmd += ["--default-artifact-root", artifacts_uri(uri)]
    print(f"MLflow UI on http://127.0.0.1:{args.port} for {uri}", file=sys.stderr)
    os.execv(sys.executable, cmd)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdbench", description="A reproducible benchmark for knowledge distillation.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name, help_):
        epilog = "examples:\n" + "\n".join(f"  {example}" for example in EXAMPLES[name])
        return sub.add_parser(name, help=help_.replace("%", "%%"), description=help_, epilog=epilog,  # help is %-formatted
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    p = add("list", "list registered methods, models, tracks, suites or pairs")
    p.add_argument("what", choices=["methods", "models", "tracks", "suites", "pairs"])
    p.set_defaults(func=cmd_list)

    def add_selection(p, results_help: str) -> None:
        """The grid's selection and where its data and device are: shared by run and reproduce."""
        p.add_argument("--suite", default="cpu", help="suite name (benchmarks/suites/<name>.yaml) or a YAML path (default: cpu)")
        p.add_argument("--method", action="append", help="only these methods (repeat or comma-separate)")
        p.add_argument("--track", action="append", help="only these tracks")
        p.add_argument("--pair", action="append", help="only these pairs, as teacher:student")
        p.add_argument("--seeds", help="comma-separated seeds, e.g. 0,1,2 (default: the suite's)")
        p.add_argument("--results-dir", default="results", help=results_help)
        p.add_argument("--data-root", help="folder with the datasets of full-tier tracks (see README, Full tier)")
        p.add_argument("--device", default="auto", help="cpu, cuda or cuda:N (default auto: cuda for GPU-tier "
                       "suites when one is present, else cpu)")
        p.add_argument("--workers", default="auto", help="runs at once on this machine (default auto: one per share "
                       "of the CPUs that a run's training threads need; 1 on a GPU)")
        p.add_argument("-v", "--verbose", action="store_true", help="print every epoch")

    p = add("run", "run a suite (or part of it), writing one record per run")
    add_selection(p, "where records go (default: results)")
    p.add_argument("--download", action="store_true", help="download a missing dataset where the track can (CIFAR)")
    p.add_argument("--executor", choices=["local", "ray"], default="local", help="local: this machine (default); "
                   "ray: one Ray task per run, records written here (README, Scaling out)")
    p.add_argument("--address", help="with --executor ray: the cluster to join, e.g. ray://head:10001 or auto "
                   "(default: start a local Ray instance)")
    p.add_argument("--force", action="store_true", help="redo runs that already have a finished record")
    p.set_defaults(func=cmd_run)

    p = add("tune", "equal-budget hyperparameter search with Optuna on the validation split; writes the tuning file")
    p.add_argument("--suite", default="cpu", help="suite name or YAML path (default: cpu); its tune section sets the "
                   "budget, the tuning seeds and the training search space")
    p.add_argument("--method", action="append", help="only these methods (repeat or comma-separate)")
    p.add_argument("--track", action="append", help="only these tracks")
    p.add_argument("--pair", action="append", help="only these pairs, as teacher:student")
    p.add_argument("--trials", help="trials per row (default: the suite's budget; a row tuned with another budget "
                   "is reported stale by leaderboard --check)")
    p.add_argument("--storage", help="Optuna storage URL (default: sqlite under $KDBENCH_HOME, tuning.db); a "
                   "database server lets several machines share the studies")
    p.add_argument("--output", help="the tuning file to write (default: the suite's, benchmarks/tuning/<file>.json)")
    p.add_argument("--data-root", help="folder with the datasets of full-tier tracks")
    p.add_argument("--device", default="auto", help="cpu, cuda or cuda:N (default auto: cuda for GPU-tier suites)")
    p.set_defaults(func=cmd_tune)

    p = add("leaderboard", "regenerate leaderboard.md from the records")
    p.add_argument("--results-dir", default="results")
    p.add_argument("--output", default="leaderboard.md")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if the file is out of date")
    p.set_defaults(func=cmd_leaderboard)

    p = add("new-method", "write methods/NAME.py from the method template (registered, unfinished)")
    p.add_argument("name", help="the method's name: a Python identifier, also its file name")
    p.add_argument("--dir", help="folder to write into (default: the repository's methods/)")
    p.set_defaults(func=cmd_new_method)

    p = add("methods-page", "regenerate methods/README.md from each method's docstring and Config")
    p.add_argument("--output", help="default: methods/README.md in the repository")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if the file is out of date")
    p.set_defaults(func=cmd_methods_page)

    p = add("verify", "re-run a record's config and seed; compare accuracy and agreement exactly (exit 1 on mismatch)")
    p.add_argument("record", help="path of a run record (JSON)")
    p.add_argument("--data-root", help="folder with the datasets of full-tier tracks")
    p.add_argument("--device", default="auto", help="cpu, cuda or cuda:N (default auto: where the record was made)")
    p.add_argument("-v", "--verbose", action="store_true", help="print every epoch")
    p.set_defaults(func=cmd_verify)

    p = add("reproduce", "re-train a suite's runs into a scratch folder from a cold teacher cache and compare each "
            "with its committed record exactly (exit 1 unless all match)")
    add_selection(p, "the committed records to compare with (default: results)")
    p.add_argument("--scratch", help="a new or empty folder for the fresh records, teachers and MLflow store, kept "
                   "afterwards (default: a temporary folder, deleted at the end)")
    p.set_defaults(func=cmd_reproduce)

    p = add("compare", "is row A better than row B? Δ with its 95 % interval and p-value, runs paired by seed")
    p.add_argument("a", help="folder of row A's records (e.g. results/cpu/mnist1d/cnn1d_w32--cnn1d_w8/vanilla_kd)")
    p.add_argument("b", help="folder of row B's records")
    p.set_defaults(func=cmd_compare)

    p = add("sync", "log to MLflow the records it does not have yet (after the server was unreachable)")
    p.add_argument("--results-dir", default="results")
    p.set_defaults(func=cmd_sync)

    p = add("ui", "open the MLflow UI on the local tracking store")
    p.add_argument("--port", type=int, default=5000)
    p.set_defaults(func=cmd_ui)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a scheduler's time limit), raised like Ctrl-C so that the same clean-up runs: worker
    processes end with kdbench, not after their queued runs."""


def _terminate(signum, frame):
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    on_sigterm = signal.signal(signal.SIGTERM, _terminate)
    try:
        return args.func(args)
    except KdbenchError as exc:
        if args.debug:
            raise
        print(f"kdbench: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        terminated = isinstance(exc, Terminated)
        print(f"kdbench: {'terminated' if terminated else 'interrupted'}", file=sys.stderr)
        return 128 + (signal.SIGTERM if terminated else signal.SIGINT)
    finally:
        signal.signal(signal.SIGTERM, on_sigterm)


if __name__ == "__main__":
    sys.exit(main())
