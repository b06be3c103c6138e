"""Side-by-side benchmark: the canonical Optuna + PyTorch loop vs. this engine and service.

Same data, search space (`default`), seeded random sampler, trial count, epoch count and median
pruner for every contender; early stopping is off everywhere so epochs are comparable.

    python -m bench.run            # full run (MNIST 10k if ../shared has it, else digits)
    python -m bench.run --quick    # < 3 minutes on 2 CPU cores
    python -m bench.run --repeats 3  # each contender 3 times, reported by its median run
    python -m bench.run --device cuda  # on a GPU: 512 trials, P in the hundreds (see --help)

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
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import optuna
import torch
from optuna.trial import TrialState

from bench.storage_clock import ENV_DIR, StorageClock, read_dir
from hpo.client import Api, follow

REPO = Path(__file__).resolve().parents[1]
SHARED_MNIST = REPO.parent / "shared" / "datasets" / "mnist-10k"
STORAGE_HOOK = REPO / "bench" / "storage_hook"
# The target for the population against the canonical loop (trials per minute): on a
# 2-core CPU, and on a GPU.
TARGET_SPEEDUP = 5.0
TARGET_SPEEDUP_CUDA = 100.0


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
    device: str = "cpu"
    # The canonical loop and the sequential engine run the job's first ``baseline_trials``
    # trials (the same parameters: the sampler draws per trial number) when a run of all
    # ``n_trials`` one model at a time would take too long (a GPU's hundreds of trials); their
    # trials/minute is measured over those. None: every contender runs all ``n_trials``.
    baseline_trials: int | None = None

    @property
    def n_baseline_trials(self) -> int:
        return self.n_trials if self.baseline_trials is None else self.baseline_trials


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
    # Of the overhead: the training threads' time in storage code (bench.storage_clock), and
    # for the service the latency around the job (POST to its first trial's start, its last
    # trial's end to the client seeing it succeed), each as a share of wall x processes.
    storage_share: float | None = None
    service_share: float | None = None
    gflops: float | None = None
    peak_share: float | None = None
    population: int | None = None
    notes: dict[str, Any] = field(default_factory=dict)


# On CUDA: enough trials for a population in the hundreds (sizing.CUDA_MAX is 512), and the
# one-model-at-a-time contenders on the first BASELINE_TRIALS_CUDA of them.
TRIALS_CUDA = 512
BASELINE_TRIALS_CUDA = 64


def make_setup(
    quick: bool,
    device: str = "cpu",
    mnist_dir: Path = SHARED_MNIST,
    trials: int | None = None,
    epochs: int | None = None,
    baseline_trials: int | None = None,
) -> Setup:
    setup = _data_setup(quick, mnist_dir)
    setup.device = device
    if device == "cuda":
        setup.n_trials = TRIALS_CUDA // 4 if quick else TRIALS_CUDA
        setup.baseline_trials = BASELINE_TRIALS_CUDA // 4 if quick else BASELINE_TRIALS_CUDA
    if trials is not None:
        setup.n_trials = trials
    if epochs is not None:
        setup.epochs = epochs
    if baseline_trials is not None:
        setup.baseline_trials = baseline_trials
    if setup.baseline_trials is not None and setup.baseline_trials >= setup.n_trials:
        setup.baseline_trials = None
    return setup


def _data_setup(quick: bool, mnist_dir: Path) -> Setup:
    if (mnist_dir / "t10k-images-idx3-ubyte.gz").is_file():
        # 10,000 real MNIST test images, split 7,000 / 1,500 / 1,500 (seeded, stratified).
        return Setup(
            dataset={"name": "mnist", "split": "test"},
            data_dir=str(mnist_dir),
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


def job_spec(
    setup: Setup, name: str, precision: str = "fp32", n_trials: int | None = None
) -> dict[str, Any]:
    return {
        "name": name,
        "dataset": setup.dataset,
        "model": {"hidden_layers": setup.hidden},
        "search_space": "default",
        "sampler": {"type": "random", "seed": 0},
        "n_trials": setup.n_trials if n_trials is None else n_trials,
        "objective": "val_accuracy",
        "training": {
            "max_epochs": setup.epochs,
            "batch_size": setup.batch_size,
            "validation_split": setup.validation_split,
            "test_split": setup.test_split,
            "early_stopping": None,
            "device": setup.device,
            "precision": precision,
        },
        "pruner": {"type": "median", "n_startup_trials": 5, "n_warmup_steps": 2},
    }


def measure_matmul_peak(precision: str = "fp32", device: str = "cpu") -> float:
    """GFLOP/s of a large matmul in ``precision`` (fp32, tf32 or bf16): the device's practical
    peak. CPU: all intra-op threads. CUDA: an 8192^3 product on random data (CUDA events)."""
    if device == "cuda":
        return _cuda_matmul_gflops(precision)
    from worker.training.matmul_speed import matmul_gflops

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    return matmul_gflops(dtype, n=1024, repeats=5, inner=10)


def slow_bf16_reason(device: str, speedup: float | None = None) -> str | None:
    """Why the bf16 contenders are left out on this machine, or None: a CPU whose bf16
    matmuls are slower than its fp32 ones (no AVX-512 BF16 or AMX) runs them through a
    reference kernel, measured at 0.7 GFLOP/s against 154 fp32 on an AVX2-only AMD EPYC,
    where the bf16 peak measurement took minutes and a bf16 contender would take hours. The
    reason is the warning a worker logs for a bf16 job on such a CPU (``bf16_warning``).
    ``speedup``: bf16 over fp32 matmul speed; measured here when not given."""
    if device != "cpu":
        return None
    from worker.training.matmul_speed import bf16_warning, cpu_bf16_speedup

    return bf16_warning(cpu_bf16_speedup() if speedup is None else speedup)


def _cuda_matmul_gflops(precision: str, n: int = 8192, repeats: int = 10) -> float:
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    try:
        for _ in range(3):
            torch.mm(a, b)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            torch.mm(a, b)
        end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 1e3 / repeats
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    del a, b
    torch.cuda.empty_cache()
    return 2 * n**3 / seconds / 1e9


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
    # The example's way on a GPU: the loader yields CPU batches, each moved to the device.
    device = torch.device(setup.device)
    train_ds = TensorDataset(data.X_train, data.y_train)
    X_val, y_val = data.X_val.to(device), data.y_val.to(device)
    n_classes = int(data.n_classes)
    epochs_run = 0

    def objective(trial: optuna.Trial) -> float:
        nonlocal epochs_run
        params = suggest(space, trial)
        cfg = resolve_config(js, params, seed=trial.number)
        torch.manual_seed(cfg.seed)
        model = build_mlp(data.X_train.shape[1], n_classes, cfg).to(device)
        # fused=False: torch's default implementation, what the canonical example's
        # getattr(optim, name)(model.parameters(), lr=lr) runs (the engine uses fused kernels)
        opt = build_optimizer(model.parameters(), cfg, fused=False)
        loader = DataLoader(train_ds, batch_size=cfg.batch_size, shuffle=True)
        loss_fn = torch.nn.CrossEntropyLoss()
        acc = 0.0
        for epoch in range(cfg.max_epochs):
            model.train()
            for xb, yb in loader:
                xb, yb = xb.to(device), yb.to(device)
                opt.zero_grad()
                loss = loss_fn(model(xb), yb)
                loss.backward()
                opt.step()
            model.eval()
            with torch.no_grad():
                acc = (model(X_val).argmax(1) == y_val).float().mean().item()
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
    study.optimize(objective, n_trials=spec["n_trials"])
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
            },
            # The values best_val_accuracy ranks, by trial number: the best among the first k
            # trials is compared with a baseline that ran only those (Setup.baseline_trials).
            "complete_value_by_trial": {
                t.number: float(t.value)
                for t in trials
                if t.state == TrialState.COMPLETE and t.value is not None
            },
        },
    )


def best_of_first(r: Result, k: int) -> float:
    """``r``'s best validation accuracy among its trials numbered below ``k``."""
    values = r.notes["complete_value_by_trial"]
    return max((v for n, v in values.items() if int(n) < k), default=float("nan"))


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
        device=setup.device,
    )
    clock = StorageClock().start()
    t0 = time.time()
    start = time.perf_counter()
    run_local(js, settings, Console(file=open(os.devnull, "w")))  # noqa: SIM115
    wall = time.perf_counter() - start
    clock.stop()
    r, curve = _from_storage(spec["name"], settings.resolved_database_url, wall, t0)
    _storage_share(r, clock.storage_s)
    return r, curve


def _storage_share(r: Result, storage_s: float) -> None:
    r.notes["storage_s"] = storage_s
    r.storage_share = storage_s / (r.wall_s * r.notes["worker_processes"])


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
    starts = [t.datetime_start.timestamp() for t in trials if t.datetime_start is not None]
    ends = [t.datetime_complete.timestamp() for t in trials if t.datetime_complete is not None]
    if starts and ends:  # the job's first trial start and last end, against the timed span
        r.notes["head_s"] = min(starts) - t0
        r.notes["tail_s"] = t0 + wall - max(ends)
    r.notes["worker_processes"] = processes
    r.notes["sum_epoch_compute_s"] = computed
    r.notes["sum_trial_duration_s"] = sum(
        float(t.user_attrs.get("duration_s", 0.0)) for t in trials
    )
    # The stacks the trials trained in (worker.population_runner's ``population`` attribute;
    # none for trials trained alone): how many members each had.
    stacks = {
        t.user_attrs["population"]["first"]: t.user_attrs["population"]["size"]
        for t in trials
        if "population" in t.user_attrs
    }
    r.notes["stack_sizes"] = sorted(stacks.values(), reverse=True)
    r.population = max(stacks.values(), default=1)
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
    env = {
        **os.environ,
        "HPO_DATA_ROOT": str(workdir),
        "HPO_DEVICE": setup.device,
        "HPO_OFFLINE": "1",
    }
    if setup.data_dir:
        env["HPO_DATA_DIR"] = setup.data_dir
    # The worker processes run a storage clock each (bench.storage_clock), started by Python.
    clocks = workdir / "storage-clocks"
    clocks.mkdir(parents=True, exist_ok=True)
    path = os.pathsep.join(p for p in (str(STORAGE_HOOK), env.get("PYTHONPATH")) if p)
    worker_env = {
        **env,
        "PYTHONPATH": path,
        ENV_DIR: str(clocks),
        "STORAGE_CLOCK_REPO": str(REPO),
    }
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
            [*hpo, "worker", "--processes", processes], env=worker_env, stdout=log, stderr=log
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
            time.sleep(0.1)  # the clocks write every 50 ms
            before = read_dir(clocks)["storage_s"]
            t0 = time.time()
            start = time.perf_counter()
            _submit_and_wait(client, spec)
            wall = time.perf_counter() - start
            time.sleep(0.1)
            storage_s = read_dir(clocks)["storage_s"] - before
        url = f"sqlite:///{workdir / 'hpo.db'}"
        r, curve = _from_storage(spec["name"], url, wall, t0)
        _storage_share(r, storage_s)
        latency = sum(max(0.0, r.notes.get(k, 0.0)) for k in ("head_s", "tail_s"))
        r.service_share = latency / wall
        return r, curve
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


def record_partial(path: Path | None, round_index: int, result: Result) -> None:
    """Append one contender's result to ``path`` (JSON lines) as soon as it is measured, so
    that a run that stops later (a contender that cannot start, a machine taken back) keeps
    what it measured: the full JSON is written only once every round has run."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps({"round": round_index + 1, "result": asdict(result)}) + "\n")


def read_partial(path: Path) -> list[tuple[int, Result]]:
    """The (round, result) pairs ``record_partial`` wrote."""
    lines = path.read_text().splitlines()
    return [(d["round"], Result(**d["result"])) for d in map(json.loads, lines) if d]


def run_round(
    setup: Setup,
    index: int,
    partial: Path | None = None,
    precisions: Sequence[str] | None = None,
) -> list[tuple[Result, list[tuple[float, float]]]]:
    """Every contender once, in the same order (``contenders``), those of ``precisions``
    only when given; each result also goes to ``partial`` as it comes (``record_partial``)."""
    from service.config import Settings

    runs = []
    worker_flush = Settings().flush_denormals  # HPO_FLUSH_DENORMALS, as the workers read it
    work = Path(tempfile.mkdtemp(prefix=f"hpo-bench-{index}-"))
    try:
        for name, kind, precision, arg in contenders(setup.device, precisions):
            # The one-model-at-a-time contenders run the first baseline_trials (Setup).
            alone = kind == "baseline" or (kind == "engine" and arg == 1)
            spec = job_spec(setup, name, precision, setup.n_baseline_trials if alone else None)
            if kind == "baseline" and arg is None:
                r, c = run_baseline(setup, spec)
            elif kind == "baseline":
                # The canonical loop again, with the CPU mode the engine's workers run in
                # (denormal floats flushed to zero): how much of the engine's lead that mode
                # alone explains.
                r, c = isolated(run_baseline, setup, spec, flush=True)
            elif kind == "engine":
                # In a fresh process, as a worker runs: it switches denormal flushing on before
                # torch's thread pool starts (worker.training.numerics); this process's pool
                # began with the matmul peak measurement and keeps denormals on all threads but
                # the main.
                r, c = isolated(run_engine, setup, spec, arg, work / name, flush=worker_flush)
            else:
                r, c = run_service(setup, spec, work / name, str(arg))
            r.name = name
            runs.append((r, c))
            record_partial(partial, index, r)
            print(f"  {name}: {r.wall_s:.1f} s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return runs


def contenders(
    device: str, precisions: Sequence[str] | None = None
) -> list[tuple[str, str, str, Any]]:
    """(name, kind, precision, argument) of each contender, in the order they run; only
    those of ``precisions`` when given.

    kind ``baseline``: the canonical loop (argument None: in this process; "flushed": in a
    fresh one with denormals flushed); ``engine``: ``hpo run``'s code path with the argument as
    ``--population`` (None: automatic); ``service``: ``hpo serve`` + ``hpo worker`` with the
    argument as ``--processes``. ``service`` is the deployment README recommends on one
    machine (--processes auto: one single-threaded worker process per core on CPU, one
    process on CUDA); service_1proc is one process, all cores.
    On CUDA denormal flushing is a CPU mode that changes nothing, and ``--processes auto`` is
    one process, so those two contenders are left out; tf32 (CUDA's fast fp32 matmuls) is in.
    """
    every = _CUDA_CONTENDERS if device == "cuda" else _CPU_CONTENDERS
    return [c for c in every if precisions is None or c[2] in precisions]


_CUDA_CONTENDERS: list[tuple[str, str, str, Any]] = [
    ("baseline", "baseline", "fp32", None),
    ("engine_sequential", "engine", "fp32", 1),
    ("engine_population", "engine", "fp32", None),
    ("engine_population_tf32", "engine", "tf32", None),
    ("engine_population_bf16", "engine", "bf16", None),
    ("service", "service", "fp32", "auto"),
    ("service_tf32", "service", "tf32", "auto"),
    ("service_bf16", "service", "bf16", "auto"),
]
_CPU_CONTENDERS: list[tuple[str, str, str, Any]] = [
    ("baseline", "baseline", "fp32", None),
    ("baseline_flushed", "baseline", "fp32", "flushed"),
    ("engine_sequential", "engine", "fp32", 1),
    ("engine_population", "engine", "fp32", None),
    ("engine_population_bf16", "engine", "bf16", None),
    ("service_1proc", "service", "fp32", "1"),
    ("service", "service", "fp32", "auto"),
    ("service_bf16", "service", "bf16", "auto"),
]


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
    ap.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="where every contender trains; cuda also sets the defaults of --trials "
        f"({TRIALS_CUDA}; --quick {TRIALS_CUDA // 4}) and --baseline-trials "
        f"({BASELINE_TRIALS_CUDA}; --quick {BASELINE_TRIALS_CUDA // 4})",
    )
    ap.add_argument("--trials", type=int, metavar="N", help="the job's trial budget")
    ap.add_argument("--epochs", type=int, metavar="E", help="epochs per trial")
    ap.add_argument(
        "--baseline-trials",
        type=int,
        metavar="K",
        help="the canonical loop and the sequential engine train only the job's first K trials "
        "(the same parameters as the others' first K) and are rated by their trials/minute over "
        "those; best validation accuracy is then compared over the first K trials",
    )
    ap.add_argument(
        "--mnist-dir",
        type=Path,
        default=SHARED_MNIST,
        help="the MNIST IDX files (t10k-*-ubyte.gz); digits when they are not there",
    )
    args = ap.parse_args()
    for name in ("repeats", "trials", "epochs", "baseline_trials"):
        value = getattr(args, name)
        if value is not None and value < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no usable CUDA device on this machine")
    os.environ.setdefault("HPO_OFFLINE", "1")
    import warnings

    warnings.filterwarnings("ignore")
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    setup = make_setup(
        args.quick, args.device, args.mnist_dir, args.trials, args.epochs, args.baseline_trials
    )
    # The peak is measured at the start and again after every round: the machine's speed
    # drifts, and the highest measurement is the denominator of "% of peak" (conservative).
    precisions = ["fp32", "tf32", "bf16"] if setup.device == "cuda" else ["fp32", "bf16"]
    skipped = slow_bf16_reason(setup.device)
    if skipped is not None:  # its peak alone would take minutes, a bf16 contender hours
        precisions.remove("bf16")
        print(f"bf16 contenders skipped: {skipped}", flush=True)
    peaks = {p: [measure_matmul_peak(p, setup.device)] for p in precisions}
    print(
        f"data: {setup.split_note}; {setup.n_trials} trials x {setup.epochs} epochs"
        + (
            f" (one model at a time: the first {setup.baseline_trials})"
            if setup.baseline_trials
            else ""
        )
        + f"; device {_device_name(setup.device)}; torch threads {torch.get_num_threads()}; "
        "matmul peak " + ", ".join(f"{peaks[p][0]:.1f} GFLOP/s {p}" for p in precisions),
        flush=True,
    )
    # Every round runs every contender once, so machine drift hits all of them alike; each
    # contender is then reported by its median-wall run (walls of all rounds in the JSON).
    # The in-process baseline pays this process's one-off costs (torch._dynamo's import with
    # the first optimizer, the dataset) here, not in round 1, as the isolated contenders do.
    run_baseline(setup, _warm_up_spec(job_spec(setup, "warm-up")))
    tag = ("-quick" if args.quick else "") + ("-cuda" if setup.device == "cuda" else "")
    out = args.out / f"bench-{time.strftime('%Y%m%d-%H%M%S')}{tag}.json"
    partial = out.with_suffix(".partial.jsonl")
    rounds: list[list[tuple[Result, list[tuple[float, float]]]]] = []
    try:
        for i in range(args.repeats):
            if args.repeats > 1:
                print(f"round {i + 1}/{args.repeats}", flush=True)
            rounds.append(run_round(setup, i, partial, precisions))
            for p, measured in peaks.items():
                measured.append(measure_matmul_peak(p, setup.device))
    except BaseException:
        if partial.exists():
            print(f"stopped; what was measured until then is in {partial}", flush=True)
        raise
    peak = {p: max(measured) for p, measured in peaks.items()}
    print(
        "matmul peak at the start and after each round: "
        + "; ".join(f"{p} " + ", ".join(f"{x:.1f}" for x in peaks[p]) for p in precisions)
        + " GFLOP/s: % of peak is against the highest ("
        + ", ".join(f"{peak[p]:.1f}" for p in precisions)
        + ")",
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
        r.peak_share = r.gflops / peak[_precision_of(r.name)]
        r.time_to_baseline_best_s = time_to(curves[r.name], base.best_val_accuracy)

    print(
        f"\n{'contender':23} {'wall s':>8} {'trials':>6} {'P':>4} {'trials/min':>11} "
        f"{'epochs/s':>9} {'best val':>9} {'paired':>13} {'t->base best':>12} {'overhead':>9} "
        f"{'storage':>8} {'service':>8} {'GFLOP/s':>8} {'of peak':>8}"
    )
    for r in results:
        ttb = (
            f"{r.time_to_baseline_best_s:.1f}" if r.time_to_baseline_best_s is not None else "never"
        )
        ov = f"{r.overhead_share:.1%}" if r.overhead_share is not None else "-"
        st = f"{r.storage_share:.1%}" if r.storage_share is not None else "-"
        sv = f"{r.service_share:.1%}" if r.service_share is not None else "-"
        paired = paired_delta(r, base, setup.epochs) if r is not base else None
        r.notes["paired_delta_pp"] = paired
        pd = f"{paired[0]:+.2f}pp/{paired[1]}" if paired else "-"
        print(
            f"{r.name:23} {r.wall_s:8.1f} {r.trials:6d} {r.population or 1:4d} "
            f"{r.trials_per_min:11.1f} {r.model_epochs_per_s:9.1f} {r.best_val_accuracy:9.4f} "
            f"{pd:>13} {ttb:>12} {ov:>9} {st:>8} {sv:>8} {r.gflops:8.2f} {r.peak_share:8.1%}"
        )
    print(
        "P: the largest stack a contender's trials trained in; paired: mean last-epoch val "
        "accuracy minus the baseline's over the trials both trained for every epoch (same "
        "parameters)/how many; overhead: the share of wall x processes outside the epochs' "
        "training and validation; storage: of that, the training threads' time in storage "
        "code; service: the latency around a service job (POST to its first trial, its last "
        "trial to the client)"
    )
    if setup.baseline_trials:
        print(
            f"the canonical loop and the sequential engine ran the first {setup.baseline_trials} "
            f"of the {setup.n_trials} trials: trials/minute over those; quality_delta compares "
            f"the best of the first {setup.baseline_trials} trials"
        )
    k = setup.n_baseline_trials
    target = TARGET_SPEEDUP_CUDA if setup.device == "cuda" else TARGET_SPEEDUP
    summaries = {
        p: _summary(results, "" if p == "fp32" else "_" + p, k, target) for p in precisions
    }
    args.out.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "setup": asdict(setup),
                "matmul_peak_gflops": peak["fp32"],
                "live_features": n_live,
                "flops_per_model_epoch": fpe,
                "matmul_peak_gflops_bf16": peak.get("bf16"),
                "matmul_peak_gflops_tf32": peak.get("tf32"),
                "matmul_peak_measurements_gflops": peaks["fp32"],
                "matmul_peak_measurements_gflops_bf16": peaks.get("bf16"),
                "matmul_peak_measurements_gflops_tf32": peaks.get("tf32"),
                "torch_threads": torch.get_num_threads(),
                "torch_version": torch.__version__,
                "device": _device_name(setup.device),
                "repeats": args.repeats,
                "results": [asdict(r) for r in results],
                "summary": summaries["fp32"],
                "summary_bf16": summaries.get("bf16"),
                "bf16_skipped": skipped,
                "summary_tf32": summaries.get("tf32"),
            },
            indent=2,
        )
    )
    partial.unlink(missing_ok=True)  # all of it is in the full JSON now
    print(f"\nwrote {out}")
    if args.repeats > 1:
        print(f"each round against its own baseline: {_by_round_line(summaries['fp32'])}")
        for p in precisions[1:]:
            print(f"  with training.precision {p}: {_by_round_line(summaries[p])}")
    print(_ceiling_line(summaries["fp32"]))
    print(_service_overhead_line(summaries["fp32"]))
    for p in precisions[1:]:
        print(f"with training.precision {p}: {_summary_line(summaries[p])}")
    print(_summary_line(summaries["fp32"]))  # the default precision (fp32) is the headline
    return 0


def _precision_of(contender: str) -> str:
    """The precision a contender's matmuls run in, from its name's suffix."""
    return next((p for p in ("bf16", "tf32") if contender.endswith("_" + p)), "fp32")


def _device_name(device: str) -> str:
    if device == "cuda":
        return f"cuda ({torch.cuda.get_device_name()})"
    return "cpu"


def _summary(
    results: list[Result],
    suffix: str,
    first: int | None = None,
    target: float = TARGET_SPEEDUP,
) -> dict[str, Any]:
    """Population and service against the baseline, for the contenders named with ``suffix``.

    ``first``: the baseline ran only the job's first ``first`` trials (Setup.baseline_trials),
    so the population's best validation accuracy is taken over those same trials.
    """
    base = results[0]
    pop_r = next(r for r in results if r.name == "engine_population" + suffix)
    svc = next(r for r in results if r.name == "service" + suffix)
    pop_best = pop_r.best_val_accuracy if first is None else best_of_first(pop_r, first)
    return {
        "population_vs_baseline": pop_r.trials_per_min / base.trials_per_min,
        "service_vs_baseline": svc.trials_per_min / base.trials_per_min,
        "quality_delta_pp": (pop_best - base.best_val_accuracy) * 100,
        # The population's best over all its trials (more than the baseline's when it ran
        # only the first ones).
        "quality_delta_all_trials_pp": (pop_r.best_val_accuracy - base.best_val_accuracy) * 100,
        "population_size": pop_r.population,
        "paired_quality_delta_pp": (pop_r.notes.get("paired_delta_pp") or (float("nan"),))[0],
        # The same ratios within each round (the contenders ran minutes apart, so a machine
        # that drifts between rounds moves these less than the medians' ratio).
        "population_vs_baseline_by_round": _by_round(base, pop_r),
        "service_vs_baseline_by_round": _by_round(base, svc),
        # What the population would reach if everything but its epochs' own training and
        # validation (storage, sampling, pruning checks, set-up, the results table) took no
        # time: the ceiling that cutting overhead alone can approach.
        # (Trials per second each: the baseline may have run fewer trials.)
        "population_vs_baseline_without_overhead": (
            pop_r.trials / pop_r.notes["sum_epoch_compute_s"] / (base.trials / base.wall_s)
        ),
        # The share of the matmul peak the population needs end to end for the ``target``
        # ratio at its model-epochs (and how much of it the run reached: its peak_share).
        # The service run's overhead and, of it, storage + service (the issue's <= 5%).
        "service_overhead_share": svc.overhead_share,
        "service_storage_share": svc.storage_share,
        "service_latency_share": svc.service_share,
        "target_speedup": target,
        "peak_share_needed_for_target": (pop_r.peak_share or 0.0)
        * target
        / (pop_r.trials_per_min / base.trials_per_min),
    }


def _ceiling_line(summary: dict[str, Any]) -> str:
    return (
        f"population without any overhead (its epochs' training and validation alone): "
        f"{summary['population_vs_baseline_without_overhead']:.2f}x; "
        f"{summary.get('target_speedup', TARGET_SPEEDUP):g}x at its model-epochs needs "
        f"{_share(summary['peak_share_needed_for_target'])} of the matmul peak end to end"
    )


def _service_overhead_line(summary: dict[str, Any]) -> str:
    overhead = summary["service_overhead_share"] or 0.0
    storage = summary["service_storage_share"] or 0.0
    latency = summary["service_latency_share"] or 0.0
    return (
        f"service run: overhead {overhead:.1%} of its wall x processes; storage {storage:.1%} "
        f"+ service latency {latency:.1%} = {storage + latency:.1%}; the rest of the overhead "
        f"({max(0.0, overhead - storage - latency):.1%}): sampling, pruning checks, building "
        "models, evaluating and saving finished ones, idle processes"
    )


def _share(x: float) -> str:
    """A share of the peak: whole percent, one decimal under 10% (a GPU's are small)."""
    return f"{x:.1%}" if x < 0.1 else f"{x:.0%}"


def _by_round(base: Result, other: Result) -> list[float]:
    """The trials/minute ratio in each round: baseline wall / contender wall, times the ratio
    of their trial counts (which every round shares; 1 unless the baseline ran fewer)."""
    walls = zip(base.notes["walls_s"], other.notes["walls_s"], strict=True)
    return [round(b / o * other.trials / base.trials, 2) for b, o in walls]


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
