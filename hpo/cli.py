"""The ``hpo`` command: run searches locally, serve the API, run workers, talk to a server."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from service.config import Settings
from service.errors import HPOError

app = typer.Typer(
    help="Hyperparameter search for PyTorch MLPs: local runs, a REST service and its workers.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console(width=None if sys.stdout.isatty() else 160)
# soft_wrap: an error is one line however long (scripts grep it); rich would wrap at 80 columns.
err_console = Console(stderr=True, soft_wrap=True)

StorageOpt = Annotated[
    str | None,
    typer.Option(
        "--storage", help="Database URL (default: HPO_DATABASE_URL or ./hpo-data/hpo.db)."
    ),
]


def _settings(storage: str | None = None) -> Settings:
    try:
        s = Settings()
    except ValidationError as e:  # a bad HPO_* environment variable: say which, no traceback
        raise fail(settings_error(e), 2) from None
    if storage:
        s = s.model_copy(update={"database_url": storage})
    return s


def settings_error(e: ValidationError) -> str:
    """``HPO_<NAME>='value': reason`` for each invalid setting."""
    return "; ".join(
        f"HPO_{'_'.join(str(p) for p in err['loc']).upper()}={err.get('input')!r}: "
        f"{err['msg'].removeprefix('Value error, ')}"
        for err in e.errors()
    )


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print ``error: <message>`` as one line on stderr; the caller raises the returned Exit."""
    err_console.print(f"[bold red]error:[/] {escape(_one_line(message))}")
    return typer.Exit(code)


def _one_line(message: str) -> str:
    return " ".join(message.split())


@app.command()
def run(
    spec_file: Annotated[Path, typer.Argument(help="Job spec, YAML or JSON.")],
    storage: StorageOpt = None,
) -> None:
    """Run a complete search on this machine (no server), then print the best trials."""
    from hpo.local import run_local
    from service.spec import load_spec_file

    settings = _settings(storage)
    try:
        spec = load_spec_file(spec_file)
        code = run_local(spec, settings, console)
    except HPOError as e:
        raise fail(str(e), 2) from None
    raise typer.Exit(code)


@app.command()
def worker(
    storage: StorageOpt = None,
    once: Annotated[bool, typer.Option("--once", help="Exit when no job is runnable.")] = False,
    max_trials: Annotated[
        int | None, typer.Option("--max-trials", help="Exit after this many trials.")
    ] = None,
    population: Annotated[
        int | None, typer.Option("--population", help="Trials trained together.")
    ] = None,
    processes: Annotated[
        str | None,
        typer.Option(
            "--processes",
            help="Worker processes, each with its share of the cores: a number, or 'auto' (one "
            "per CPU on CPU, one with CUDA). Default: HPO_WORKER_PROCESSES or 1.",
        ),
    ] = None,
) -> None:
    """Take trials of runnable jobs from the shared database until stopped (SIGTERM exits 0)."""
    settings = _settings(storage)
    if population is not None:
        settings = settings.model_copy(update={"population": population})
    if processes is not None:
        settings = settings.model_copy(update={"worker_processes": processes})
    from worker.supervisor import resolve_processes

    try:
        n = resolve_processes(settings.worker_processes, settings.device)
    except ValueError as e:
        raise fail(str(e), 2) from None
    if n > 1:
        raise typer.Exit(_supervise(n, settings, storage, once, max_trials))

    from worker.loop import Worker

    size = "auto" if settings.population is None else str(settings.population)
    ready = f"worker ready: polling every {settings.poll_interval_s:g} s, population {size}"
    w = Worker(
        settings,
        once=once,
        max_trials=max_trials,
        on_ready=lambda: err_console.print(f"{ready}, denormals {w.denormals}", highlight=False),
    )
    w.install_signal_handlers()
    n_trials = w.run()
    err_console.print(f"worker stopped after {n_trials} trials")


def _supervise(
    n: int, settings: Settings, storage: str | None, once: bool, max_trials: int | None
) -> int:
    """``hpo worker --processes n``: n single-worker children, restarted when they die."""
    from worker.supervisor import Supervisor, child_commands, child_env

    env = child_env(n, settings.torch_threads, storage)
    commands = child_commands(n, population=settings.population, once=once, max_trials=max_trials)
    err_console.print(
        f"worker supervisor: {len(commands)} processes x {env['HPO_TORCH_THREADS']} torch "
        "threads each",
        highlight=False,
    )
    sup = Supervisor(
        commands,
        env,
        stop_grace_s=settings.stop_grace_s,
        on_event=lambda msg: err_console.print(f"worker supervisor: {msg}", highlight=False),
    )
    sup.install_signal_handlers()
    return sup.run()


@app.command()
def serve(
    host: Annotated[
        str | None, typer.Option(help="Bind address (default HPO_HOST or 127.0.0.1).")
    ] = None,
    port: Annotated[int | None, typer.Option(help="Port (default HPO_PORT or 8000).")] = None,
    storage: StorageOpt = None,
) -> None:
    """Start the REST API (FastAPI on uvicorn); OpenAPI docs at /docs."""
    import uvicorn

    from service.api.app import create_app
    from service.api.security import check_bind_allowed

    settings = _settings(storage)
    settings = settings.model_copy(
        update={k: v for k, v in {"host": host, "port": port}.items() if v is not None}
    )
    try:
        check_bind_allowed(settings)
    except HPOError as e:
        raise fail(str(e), 2) from None
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level="info",
        timeout_keep_alive=settings.keep_alive_s,
    )


@app.command()
def spaces(name: Annotated[str | None, typer.Argument(help="Show one preset.")] = None) -> None:
    """List the search-space presets, or show one."""
    import yaml

    from search_spaces import PRESET_DIR, list_presets, load_preset

    if name is None:
        table = Table("preset", "parameters", "description")
        for n in list_presets():
            s = load_preset(n)
            table.add_row(n, ", ".join(s.parameters), s.description)
        console.print(table)
        return
    try:
        load_preset(name)
    except KeyError as e:
        raise fail(str(e), 2) from None
    console.print(
        yaml.safe_dump(yaml.safe_load((PRESET_DIR / f"{name}.yaml").read_text()), sort_keys=False)
    )


@app.command()
def dashboard(
    storage: StorageOpt = None,
    port: Annotated[int, typer.Option(help="Port for optuna-dashboard.")] = 8080,
    host: Annotated[
        str, typer.Option(help="Bind address (loopback by default: the dashboard has no auth).")
    ] = "127.0.0.1",
) -> None:
    """Start optuna-dashboard on the configured database."""
    settings = _settings(storage)
    url = settings.resolved_database_url
    console.print(f"optuna-dashboard on http://{host}:{port} reading {url}")
    settings.resolved_artifact_dir.mkdir(parents=True, exist_ok=True)
    code = "import sys; from optuna_dashboard._cli import main; sys.argv[0] = 'optuna-dashboard'; sys.exit(main())"
    argv = [
        url,
        "--host",
        host,
        "--port",
        str(port),
        "--artifact-dir",
        str(settings.resolved_artifact_dir),
    ]
    os.execv(sys.executable, [sys.executable, "-c", code, *argv])


def main() -> None:
    import warnings

    import optuna

    # Heartbeats and the retry callback are "experimental" in Optuna 5; we rely on them knowingly.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    logging.basicConfig(
        level=os.environ.get("HPO_LOG_LEVEL", "WARNING"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from hpo import client  # noqa: F401  (registers the client commands on `app`)

    try:
        app()
    except HPOError as e:
        fail(str(e))  # prints the one-line reason; outside the typer app, exit directly
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
