"""Side-by-side benchmark: the canonical Optuna + PyTorch loop vs. this engine and service.

Same data, search space (`default`), seeded random sampler, trial count, epoch count and median
pruner for every contender; early stopping is off everywhere so epochs are comparable.

    python -m bench.run            # full run (MNIST 10k if ../shared has it, else digits)
    python -m bench.run --quick    # < 3 minutes on 2 CPU cores
    python -m bench.run --repeats 3  # each contender 3 times, reported by its median run

Writes bench/results/<timestamp>.json and ends with one line:
    population_vs_baseline=<ratio>x service_vs_baseline=<ratio>x quality_delta=<pp>
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import optuna
import torch
from optuna.trial import TrialState

from hpo.client import Api, follow

REPO = Path(__file__).resolve().parents[1]
SHARED_MNIST = REPO.parent / "shared" / "datasets" / "mnist-10k"
# The target for the population against the canonical loop (trials per minute).
TARGET_SPEEDUP = 5.0


@dataclass
class Setup:
    dataset: dict[str, Any]
    data_dir: str | None
    n_trials: int
    epochs: int
    batch_size: int
    hidden: list[int]
    validation_split: float
    test_split: float
    split_note: str


@dataclass
class Result:
    name: str
    wall_s: float
    trials: int
    model_epochs: int
    best_val_accuracy: float
    trials_per_min: float
    model_epochs_per_s: float
    time_to_baseline_best_s: float | None = None
    overhead_share: float | None = None
    gflops: float | None = None
    peak_share: float | None = None
    population: int | None = None
    notes: dict[str, Any] = field(default_factory=dict)


def make_setup(quick: bool) -> Setup:
    if (SHARED_MNIST / "t10k-images-idx3-ubyte.gz").is_file():
        # 10,000 real MNIST test images, split 7,000 / 1,500 / 1,500 (seeded, stratified).
        return Setup(
            dataset={"name": "mnist", "split": "test"},
            data_dir=str(SHARED_MNIST),
            n_trials=16 if quick else 48,
            epochs=4 if quick else 10,
            batch_size=128,
            hidden=[128],
            validation_split=0.15,
            test_split=0.15,
            split_note="MNIST t10k: 7,000 train / 1,500 val / 1,500 test",
        )
    return Setup(
        dataset={"name": "digits"},
        data_dir=None,
        n_trials=20 if quick else 60,
        epochs=10 if quick else 20,
        batch_size=128,
        hidden=[128],
        validation_split=0.2,
        test_split=0.1,
        split_note="digits: 1,258 train / 360 val / 179 test",
    )


def job_spec(setup: Setup, name: str, precision: str = "fp32") -> dict[str, Any]:
    return {
        "name": name,
        "dataset": setup.dataset,
        "model": {"hidden_layers": setup.hidden},
        "search_space": "default",
        "sampler": {"type": "random", "seed": 0},
        "n_trials": setup.n_trials,
        "objective": "val_accuracy",
        "training": {
            "max_epochs": setup.epochs,
            "batch_size": setup.batch_size,
            "validation_split": setup.validation_split,
            "test_split": setup.test_split,
            "early_stopping": None,
            "device": "cpu",
            "precision": precision,
        },
        "pruner": {"type": "median", "n_startup_trials": 5, "n_warmup_steps": 2},
    }


def measure_matmul_peak(dtype: torch.dtype = torch.float32) -> float:
    """GFLOP/s of a large matmul with all intra-op threads: the CPU's practical peak."""
    from worker.training.matmul_speed import matmul_gflops

    return matmul_gflops(dtype, n=1024, repeats=5, inner=10)


def flops_per_model_epoch(
    n_features: int,
    hidden: list[int],
    n_classes: int,
    n_train: int,
    n_val: int,
    n_live: int | None = None,
) -> float:
    """Matmul FLOPs of one model-epoch, counting only what training needs.

    Per training row: the forward pass (2 FLOPs per weight), the weight gradients (2 per
    weight) and the input gradients of every layer but the first (nobody needs the gradient
    with respect to the data, and neither autograd nor the population trainer computes it);
    per validation row, the forward pass. ``n_live``: the features nonzero in some training
    row (default all); the others add exactly 0 to every training product, so the first
    layer's training FLOPs count only the live ones (the canonical loop multiplies them all
    the same; the population trainer skips them when enough are dead: ``live_feature_mask``,
    which is how the caller counts ``n_live``); validation counts every feature.
    """
    widths = [n_features, *hidden, n_classes]
    macs = [a * b for a, b in itertools.pairwise(widths)]
    train_macs = [(n_features if n_live is None else n_live) * widths[1], *macs[1:]]
    per_train_row = 2 * sum(train_macs) + 2 * sum(train_macs) + 2 * sum(macs[1:])
    return float(per_train_row * n_train + 2 * sum(macs) * n_val)


# Contender 1: the canonical Optuna PyTorch example ------------------------------------------------
def run_baseline(setup: Setup, spec: dict[str, Any]) -> tuple[Result, list[tuple[float, float]]]:
    from torch.utils.data import DataLoader, TensorDataset

    from search_spaces.sampling import suggest
    from service.spec import JobSpec
    from service.studies import make_sampler
    from worker.training import build_mlp, build_optimizer
    from worker.trial_config import resolve_config

    js = JobSpec.model_validate(spec)
    data = load_data(setup, js)
    space = js.resolved_space()
    train_ds = TensorDataset(data.X_train, data.y_train)
    n_classes = int(data.n_classes)
    epochs_run = 0

    def objective(trial: optuna.Trial) -> float:
        nonlocal epochs_run
        params = suggest(space, trial)
        cfg = resolve_config(js, params, seed=trial.number)
        torch.manual_seed(cfg.seed)
        model = build_mlp(data.X_train.shape[1], n_classes, cfg)
        # fused=False: torch's default implementation, what the canonical example's
        # getattr(optim, name)(model.parameters(), lr=lr) runs (the engine uses fused kernels)
        opt = build_optimizer(model.parameters(), cfg, fused=False)
        loader = DataLoader(train_ds, batch_size=cfg.batch_size, shuffle=True)
        loss_fn = torch.nn.CrossEntropyLoss()
        acc = 0.0
        for epoch in range(cfg.max_epochs):
            model.train()
            for xb, yb in loader:
                opt.zero_grad()
                loss = loss_fn(model(xb), yb)
                loss.backward()
                opt.step()
            model.eval()
            with torch.no_grad():
                acc = (model(data.X_val).argmax(1) == data.y_val).float().mean().item()
            epochs_run += 1
            trial.report(acc, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return acc

    study = optuna.create_study(
        direction="maximize",
        # The job's own seeded random sampler (make_sampler: RandomSampler drawing per trial),
        # so trial k has the same parameters here as in every other contender.
        sampler=make_sampler(js),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=2),
    )
    t0 = time.time()
    start = time.perf_counter()
    study.optimize(objective, n_trials=setup.n_trials)
    wall = time.perf_counter() - start
    # Pruned trials' last value is a candidate too (the canonical example ranks only COMPLETE).
    best = study.best_value
    curve = _curve(study.get_trials(deepcopy=False), t0)
    return _result("baseline", wall, study.get_trials(deepcopy=False), epochs_run, best), curve


def load_data(setup: Setup, js: Any) -> Any:
    from service.datasets import load_dataset, make_splits
    from worker.training import to_tensors

    data_dir = Path(setup.data_dir) if setup.data_dir else Path(tempfile.gettempdir())
    ds = load_dataset(
        js.dataset, data_dir=data_dir, upload_dir=data_dir, allow_local_paths=False, download=False
    )
    sp = make_splits(
        ds,
        validation_split=js.training.validation_split,
        test_split=js.training.test_split,
        seed=js.training.split_seed,
    )
    return to_tensors(
        sp.X_train,
        sp.y_train,
        sp.X_val,
        sp.y_val,
        sp.X_test,
        sp.y_test,
        "cpu",
        n_classes=sp.n_classes,
    )


def _curve(trials: list[optuna.trial.FrozenTrial], t0: float) -> list[tuple[float, float]]:
    """(seconds since start, best val accuracy so far) after each COMPLETE trial."""
    done = sorted(
        (t.datetime_complete.timestamp(), float(t.value or 0.0))
        for t in trials
        if t.state == TrialState.COMPLETE and t.datetime_complete is not None
    )
    pts = []
    best = -1.0
    for ts, value in done:
        best = max(best, value)
        pts.append((ts - t0, best))
    return pts


def _result(
    name: str, wall: float, trials: list[optuna.trial.FrozenTrial], model_epochs: int, best: float
) -> Result:
    n = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    return Result(
        name=name,
        wall_s=wall,
        trials=n,
        model_epochs=model_epochs,
        best_val_accuracy=best,
        trials_per_min=n / wall * 60,
        model_epochs_per_s=model_epochs / wall,
        # Every trial's reported epochs, last validation accuracy and parameters, for the paired
        # comparison (trial k has the same parameters in every contender: the job's sampler
        # draws per trial).
        notes={
            "last_val_by_trial": {
                t.number: (
                    len(t.intermediate_values),
                    t.intermediate_values[max(t.intermediate_values)],
                    repr(sorted(t.params.items())),
                )
                for t in trials
                if t.intermediate_values
            }
        },
    )


def paired_delta(r: Result, base: Result, epochs: int) -> tuple[float, int] | None:
    """Mean last-epoch validation accuracy of ``r`` minus the baseline's, in points, over the
    trials both trained for all ``epochs`` with the same parameters (different initial
    weights), and how many. Unlike best-of-N it is not decided by the luckiest initialisation."""
    mine, theirs = r.notes["last_val_by_trial"], base.notes["last_val_by_trial"]
    diffs = [
        mine[k][1] - theirs[k][1]
        for k in mine.keys() & theirs.keys()
        if mine[k][0] == theirs[k][0] == epochs and mine[k][2] == theirs[k][2]
    ]
    return (sum(diffs) / len(diffs) * 100, len(diffs)) if diffs else None


# Contenders 2 and 3: the engine (hpo run's code path) ---------------------------------------------
def run_engine(
    setup: Setup, spec: dict[str, Any], population: int | None, workdir: Path
) -> tuple[Result, list[tuple[float, float]]]:
    from rich.console import Console

    from hpo.local import run_local
    from service.config import Settings
    from service.spec import JobSpec

    js = JobSpec.model_validate(spec)
    settings = Settings(
        data_root=workdir,
        data_dir=Path(setup.data_dir) if setup.data_dir else None,
        population=population,
        device="cpu",
    )
    t0 = time.time()
    start = time.perf_counter()
    run_local(js, settings, Console(file=open(os.devnull, "w")))  # noqa: SIM115
    wall = time.perf_counter() - start
    return _from_storage(spec["name"], settings.resolved_database_url, wall, t0)


def _from_storage(
    name: str, url: str, wall: float, t0: float
) -> tuple[Result, list[tuple[float, float]]]:
    study_name = next(s for s in optuna.get_all_study_names(url) if s.startswith(name + "."))
    study = optuna.load_study(study_name=study_name, storage=url)
    trials = study.get_trials(deepcopy=False)
    epochs = sum(
        len(t.intermediate_values)
        for t in trials
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
    )
    r = _result(name, wall, trials, epochs, study.best_value)
    # Overhead = everything but training and validation compute: each epoch's own seconds (a
    # population member's share of the stack's epoch) summed over every trial, pruned ones
    # included. What is left is storage, sampling, pruning checks, the service and set-up.
    # With several worker processes the time available is wall x processes.
    computed = sum(float(h["seconds"]) for t in trials for h in t.user_attrs.get("history", []))
    processes = len({t.system_attrs.get("hpo_worker") for t in trials} - {None}) or 1
    r.overhead_share = max(0.0, 1 - computed / (wall * processes))
    r.notes["worker_processes"] = processes
    r.notes["sum_epoch_compute_s"] = computed
    r.notes["sum_trial_duration_s"] = sum(
        float(t.user_attrs.get("duration_s", 0.0)) for t in trials
    )
    return r, _curve(trials, t0)


# Contender 4: the service over HTTP with one `hpo worker` ----------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_service(
    setup: Setup, spec: dict[str, Any], workdir: Path, processes: str
) -> tuple[Result, list[tuple[float, float]]]:
    """One ``hpo serve`` and one ``hpo worker --processes <processes>``; the job is submitted
    once the worker (all its processes) said it is ready, as to a deployed, long-lived one."""
    port = _free_port()
    env = {**os.environ, "HPO_DATA_ROOT": str(workdir), "HPO_DEVICE": "cpu", "HPO_OFFLINE": "1"}
    if setup.data_dir:
        env["HPO_DATA_DIR"] = setup.data_dir
    hpo = [sys.executable, "-c", "from hpo.cli import main; main()"]
    api = subprocess.Popen(
        [*hpo, "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    worker_log = workdir / "worker.log"
    workdir.mkdir(parents=True, exist_ok=True)
    with worker_log.open("w") as log:
        worker = subprocess.Popen(
            [*hpo, "worker", "--processes", processes], env=env, stdout=log, stderr=log
        )
    base = f"http://127.0.0.1:{port}"
    try:
        client = Api(base)
        with client.http as c:
            # A deployed worker is long-lived: the job starts once it is up, as in production.
            for _ in range(300):
                try:
                    ready = c.get("/readyz").status_code == 200
                except httpx.HTTPError:
                    ready = False
                text = worker_log.read_text()
                supervised = re.search(r"worker supervisor: (\d+) processes", text)
                n_ready = int(supervised.group(1)) if supervised else 1
                if ready and text.count("worker ready") >= n_ready:
                    break
                time.sleep(0.1)
            else:
                raise RuntimeError(f"service did not start: {worker_log.read_text()[-2000:]}")
            # The one-off costs the engine contenders pay in their untimed warm-up (the dataset
            # read and split into each worker process's cache, first calls into torch's
            # kernels), paid here the way a long-lived worker paid them for earlier jobs on
            # the same data: a short job first, two one-epoch trials per worker process (in
            # the checks made, every process took some; nothing forces it).
            warm_up = _warm_up_spec(spec)
            warm_up["n_trials"] = max(warm_up["n_trials"], 2 * n_ready)
            _submit_and_wait(client, warm_up)
            t0 = time.time()
            start = time.perf_counter()
            _submit_and_wait(client, spec)
            wall = time.perf_counter() - start
        url = f"sqlite:///{workdir / 'hpo.db'}"
        return _from_storage(spec["name"], url, wall, t0)
    finally:
        for p in (worker, api):
            p.send_signal(signal.SIGTERM)
        for p in (worker, api):
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


def _submit_and_wait(api: Api, spec: dict[str, Any]) -> None:
    """POST the job and follow it as `hpo submit --wait` does (``hpo.client.follow``)."""
    job = api.json("POST", "/jobs", json=spec)
    *_, last = follow(api, job["id"])
    if last["state"] != "succeeded":
        raise RuntimeError(f"service job {spec['name']!r} ended {last['state']}")


Curve = list[tuple[float, float]]


def isolated(
    contender: Callable[..., tuple[Result, Curve]],
    setup: Setup,
    spec: dict[str, Any],
    *args: Any,
    flush: bool,
) -> tuple[Result, Curve]:
    """``contender(setup, spec, *args)`` in a new interpreter, as a long-lived worker runs it.

    The child takes this process's torch thread count and switches denormal flushing to
    ``flush`` before its first torch op, so every intra-op thread runs in that mode (it is a
    per-thread CPU mode that threads inherit when they start; worker.training.numerics). Then
    it pays its one-off costs outside the timed part, as the service's worker does before it
    says it is ready and as the baseline does (its data is loaded once, its modules imported):
    it runs the contender once on a two-trial, one-epoch job first (lazy imports, storage
    schema checks, the dataset into the process's cache, first calls into torch's kernels).
    """
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=spawn) as pool:
        job = pool.submit(
            _run_isolated, contender.__name__, setup, spec, args, torch.get_num_threads(), flush
        )
        result, curve = job.result()
    return Result(**result), curve


def _run_isolated(
    name: str,
    setup: Setup,
    spec: dict[str, Any],
    args: tuple[Any, ...],
    threads: int,
    flush: bool,
) -> tuple[dict[str, Any], Curve]:
    import warnings

    torch.set_num_threads(threads)
    torch.set_flush_denormal(flush)  # before any parallel op: every pool thread inherits it
    warnings.filterwarnings("ignore")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    contender = globals()[name]
    with tempfile.TemporaryDirectory(prefix="hpo-bench-warm-up-") as scratch:
        # the same arguments, but a scratch directory for any the contender writes into
        warm_args = [Path(scratch) if isinstance(a, Path) else a for a in args]
        contender(setup, _warm_up_spec(spec), *warm_args)
    result, curve = contender(setup, spec, *args)
    return asdict(result), curve


def _warm_up_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """``spec`` cut to two trials of one epoch: a contender's one-off costs, paid untimed."""
    return {
        **spec,
        "name": "warm-up",
        "n_trials": 2,
        "training": {**spec["training"], "max_epochs": 1},
    }


def time_to(curve: list[tuple[float, float]], target: float) -> float | None:
    return next((t for t, best in curve if best >= target), None)


def run_round(setup: Setup, index: int) -> list[tuple[Result, list[tuple[float, float]]]]:
    """Every contender once, in the same order: baseline x2, engine x3, service x3."""
    from service.config import Settings

    runs = []
    worker_flush = Settings().flush_denormals  # HPO_FLUSH_DENORMALS, as the workers read it
    work = Path(tempfile.mkdtemp(prefix=f"hpo-bench-{index}-"))
    try:
        r, c = run_baseline(setup, job_spec(setup, "baseline"))
        runs.append((r, c))
        print(f"  baseline: {r.wall_s:.1f} s", flush=True)
        # The canonical loop again, with the CPU mode the engine's workers run in (denormal
        # floats flushed to zero): how much of the engine's lead that mode alone explains.
        r, c = isolated(run_baseline, setup, job_spec(setup, "baseline_flushed"), flush=True)
        r.name = "baseline_flushed"
        runs.append((r, c))
        print(f"  baseline_flushed: {r.wall_s:.1f} s", flush=True)
        for name, pop, precision in (
            ("engine_sequential", 1, "fp32"),
            ("engine_population", None, "fp32"),
            ("engine_population_bf16", None, "bf16"),
        ):
            # In a fresh process, as a worker runs: it switches denormal flushing on before
            # torch's thread pool starts (worker.training.numerics); this process's pool began
            # with the matmul peak measurement and keeps denormals on all threads but the main.
            spec = job_spec(setup, name, precision)
            r, c = isolated(run_engine, setup, spec, pop, work / name, flush=worker_flush)
            r.name = name
            runs.append((r, c))
            print(f"  {name}: {r.wall_s:.1f} s", flush=True)
        # `service` is the deployment README recommends on one machine (--processes auto: one
        # single-threaded worker process per core); service_1proc is one process, all cores.
        for name, precision, processes in (
            ("service_1proc", "fp32", "1"),
            ("service", "fp32", "auto"),
            ("service_bf16", "bf16", "auto"),
        ):
            spec = job_spec(setup, name, precision)
            r, c = run_service(setup, spec, work / name, processes)
            r.name = name
            runs.append((r, c))
            print(f"  {name}: {r.wall_s:.1f} s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return runs


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="small budget: under 3 minutes on 2 cores")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    ap.add_argument(
        "--repeats",
        type=int,
        default=1,
        metavar="N",
        help="run every contender N times (interleaved rounds) and report each by its median "
        "wall time; this machine's speed drifts by 10-20%% between runs",
    )
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    os.environ.setdefault("HPO_OFFLINE", "1")
    import warnings

    warnings.filterwarnings("ignore")
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    setup = make_setup(args.quick)
    # The peak is measured at the start and again after every round: the machine's speed
    # drifts, and the highest measurement is the denominator of "% of peak" (conservative).
    peaks = {torch.float32: [measure_matmul_peak()]}
    peaks[torch.bfloat16] = [measure_matmul_peak(torch.bfloat16)]
    print(
        f"data: {setup.split_note}; {setup.n_trials} trials x {setup.epochs} epochs; "
        f"torch threads {torch.get_num_threads()}; matmul peak {peaks[torch.float32][0]:.1f} "
        f"GFLOP/s fp32, {peaks[torch.bfloat16][0]:.1f} GFLOP/s bf16",
        flush=True,
    )
    # Every round runs every contender once, so machine drift hits all of them alike; each
    # contender is then reported by its median-wall run (walls of all rounds in the JSON).
    # The in-process baseline pays this process's one-off costs (torch._dynamo's import with
    # the first optimizer, the dataset) here, not in round 1, as the isolated contenders do.
    run_baseline(setup, _warm_up_spec(job_spec(setup, "warm-up")))
    rounds: list[list[tuple[Result, list[tuple[float, float]]]]] = []
    for i in range(args.repeats):
        if args.repeats > 1:
            print(f"round {i + 1}/{args.repeats}", flush=True)
        rounds.append(run_round(setup, i))
        for dtype, measured in peaks.items():
            measured.append(measure_matmul_peak(dtype))
    peak, peak_bf16 = max(peaks[torch.float32]), max(peaks[torch.bfloat16])
    print(
        "matmul peak at the start and after each round: fp32 "
        + ", ".join(f"{p:.1f}" for p in peaks[torch.float32])
        + "; bf16 "
        + ", ".join(f"{p:.1f}" for p in peaks[torch.bfloat16])
        + f" GFLOP/s: % of peak is against the highest ({peak:.1f}, {peak_bf16:.1f})",
        flush=True,
    )
    results: list[Result] = []
    curves: dict[str, list[tuple[float, float]]] = {}
    for runs in zip(*rounds, strict=True):
        r, c = sorted(runs, key=lambda rc: rc[0].wall_s)[len(runs) // 2]
        r.notes["walls_s"] = [round(x.wall_s, 2) for x, _ in runs]
        results.append(r)
        curves[r.name] = c

    from service.spec import JobSpec

    data = load_data(setup, JobSpec.model_validate(job_spec(setup, "x")))
    from worker.population.trainer import live_feature_mask

    live = live_feature_mask(data)  # the features the population trainer trains on
    n_live = int(data.X_train.shape[1]) if live is None else int(live.sum())
    fpe = flops_per_model_epoch(
        int(data.X_train.shape[1]),
        setup.hidden,
        int(data.n_classes),
        int(data.X_train.shape[0]),
        int(data.X_val.shape[0]),
        n_live,
    )
    base = results[0]
    for r in results:
        r.gflops = r.model_epochs * fpe / r.wall_s / 1e9
        # Against the peak of the precision the contender's matmuls run in.
        r.peak_share = r.gflops / (peak_bf16 if r.name.endswith("_bf16") else peak)
        r.time_to_baseline_best_s = time_to(curves[r.name], base.best_val_accuracy)

    print(
        f"\n{'contender':23} {'wall s':>8} {'trials/min':>11} {'epochs/s':>9} {'best val':>9} "
        f"{'paired':>13} {'t->base best':>12} {'overhead':>9} {'GFLOP/s':>8} {'of peak':>8}"
    )
    for r in results:
        ttb = (
            f"{r.time_to_baseline_best_s:.1f}" if r.time_to_baseline_best_s is not None else "never"
        )
        ov = f"{r.overhead_share:.1%}" if r.overhead_share is not None else "-"
        paired = paired_delta(r, base, setup.epochs) if r is not base else None
        r.notes["paired_delta_pp"] = paired
        pd = f"{paired[0]:+.2f}pp/{paired[1]}" if paired else "-"
        print(
            f"{r.name:23} {r.wall_s:8.1f} {r.trials_per_min:11.1f} {r.model_epochs_per_s:9.1f} "
            f"{r.best_val_accuracy:9.4f} {pd:>13} {ttb:>12} {ov:>9} {r.gflops:8.2f} "
            f"{r.peak_share:8.1%}"
        )
    print(
        "paired: mean last-epoch val accuracy minus the baseline's over the trials both trained "
        "for every epoch (same parameters)/how many"
    )
    summary = _summary(results, "")
    summary_bf16 = _summary(results, "_bf16")
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"bench-{time.strftime('%Y%m%d-%H%M%S')}{'-quick' if args.quick else ''}.json"
    out.write_text(
        json.dumps(
            {
                "setup": asdict(setup),
                "matmul_peak_gflops": peak,
                "live_features": n_live,
                "flops_per_model_epoch": fpe,
                "matmul_peak_gflops_bf16": peak_bf16,
                "matmul_peak_measurements_gflops": peaks[torch.float32],
                "matmul_peak_measurements_gflops_bf16": peaks[torch.bfloat16],
                "torch_threads": torch.get_num_threads(),
                "device": "cpu",
                "repeats": args.repeats,
                "results": [asdict(r) for r in results],
                "summary": summary,
                "summary_bf16": summary_bf16,
            },
            indent=2,
        )
    )
    print(f"\nwrote {out}")
    if args.repeats > 1:
        print(f"each round against its own baseline: {_by_round_line(summary)}")
        print(f"  with training.precision bf16: {_by_round_line(summary_bf16)}")
    print(_ceiling_line(summary))
    print(f"with training.precision bf16: {_summary_line(summary_bf16)}")
    print(_summary_line(summary))  # the default precision (fp32) is the headline
    return 0


def _summary(results: list[Result], suffix: str) -> dict[str, Any]:
    """Population and service against the baseline, for the contenders named with ``suffix``."""
    base = results[0]
    pop_r = next(r for r in results if r.name == "engine_population" + suffix)
    svc = next(r for r in results if r.name == "service" + suffix)
    return {
        "population_vs_baseline": pop_r.trials_per_min / base.trials_per_min,
        "service_vs_baseline": svc.trials_per_min / base.trials_per_min,
        "quality_delta_pp": (pop_r.best_val_accuracy - base.best_val_accuracy) * 100,
        "paired_quality_delta_pp": (pop_r.notes.get("paired_delta_pp") or (float("nan"),))[0],
        # The same ratios within each round (the contenders ran minutes apart, so a machine
        # that drifts between rounds moves these less than the medians' ratio).
        "population_vs_baseline_by_round": _by_round(base, pop_r),
        "service_vs_baseline_by_round": _by_round(base, svc),
        # What the population would reach if everything but its epochs' own training and
        # validation (storage, sampling, pruning checks, set-up, the results table) took no
        # time: the ceiling that cutting overhead alone can approach.
        "population_vs_baseline_without_overhead": base.wall_s / pop_r.notes["sum_epoch_compute_s"],
        # The share of the matmul peak the population needs end to end for TARGET_SPEEDUP at
        # its model-epochs (and how much of it the run reached: its peak_share).
        "peak_share_needed_for_target": (pop_r.peak_share or 0.0)
        * TARGET_SPEEDUP
        / (pop_r.trials_per_min / base.trials_per_min),
    }


def _ceiling_line(summary: dict[str, Any]) -> str:
    return (
        f"population without any overhead (its epochs' training and validation alone): "
        f"{summary['population_vs_baseline_without_overhead']:.2f}x; "
        f"{TARGET_SPEEDUP:g}x at its model-epochs needs "
        f"{summary['peak_share_needed_for_target']:.0%} of the matmul peak end to end"
    )


def _by_round(base: Result, other: Result) -> list[float]:
    """Baseline wall / contender wall in each round (equal trial counts: the trials/min ratio)."""
    walls = zip(base.notes["walls_s"], other.notes["walls_s"], strict=True)
    return [round(b / o, 2) for b, o in walls]


def _summary_line(summary: dict[str, Any]) -> str:
    return (
        f"population_vs_baseline={summary['population_vs_baseline']:.2f}x "
        f"service_vs_baseline={summary['service_vs_baseline']:.2f}x "
        f"quality_delta={summary['quality_delta_pp']:+.2f}pp"
    )


def _by_round_line(summary: dict[str, Any]) -> str:
    pop = ", ".join(f"{x:.2f}x" for x in summary["population_vs_baseline_by_round"])
    svc = ", ".join(f"{x:.2f}x" for x in summary["service_vs_baseline_by_round"])
    return f"population {pop}; service {svc}"


if __name__ == "__main__":
    sys.exit(main())
