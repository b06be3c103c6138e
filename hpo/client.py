"""Client commands for a running ``hpo serve``: submit, jobs, show, trials, best, cancel, download,
report, datasets. Tables for humans by default, ``--json`` for scripts; failures exit non-zero with
a one-line reason taken from the server's problem details."""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.table import Table

from hpo.cli import app, console, err_console, fail

ServerOpt = Annotated[
    str, typer.Option("--server", envvar="HPO_SERVER", help="Base URL of the API.")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]
DEFAULT_SERVER = "http://127.0.0.1:8000"
WAIT_S = 10  # the longest a follow request waits for a change (the server caps it too)

datasets_app = typer.Typer(help="Built-in and uploaded datasets.", no_args_is_help=True)
app.add_typer(datasets_app, name="datasets")


class Api:
    def __init__(self, server: str) -> None:
        headers = {}
        token = os.environ.get("HPO_TOKEN")
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self.base = server.rstrip("/")
        self.http = httpx.Client(base_url=self.base, headers=headers, timeout=60.0)

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            r = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as e:
            raise fail(f"cannot reach the server at {self.base}: {e}") from None
        if r.status_code >= 400:
            raise fail(_problem_text(r))
        return r

    def json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self.request(method, path, **kwargs).json()


def _problem_text(r: httpx.Response) -> str:
    try:
        body = r.json()
    except ValueError:
        return f"HTTP {r.status_code}: {r.text[:200]}"
    detail = body.get("detail") or body.get("title") or r.reason_phrase
    return f"HTTP {r.status_code} {body.get('title', '')}: {detail}".replace("  ", " ")


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if v is None:
        return "-"
    return str(v)


@app.command()
def submit(
    spec_file: Annotated[Path, typer.Argument(help="Job spec, YAML or JSON.")],
    server: ServerOpt = DEFAULT_SERVER,
    wait: Annotated[
        bool, typer.Option("--wait", help="Show live progress until the job ends.")
    ] = False,
    idempotency_key: Annotated[
        str | None, typer.Option("--idempotency-key", help="Safe retries.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Submit a job spec to the server (validated locally first, with file and line in errors)."""
    from service.errors import HPOError
    from service.spec import load_spec_file

    try:
        spec = load_spec_file(spec_file)
    except HPOError as e:
        raise fail(str(e), 2) from None
    api = Api(server)
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
    job = api.json("POST", "/jobs", json=spec.model_dump(mode="json"), headers=headers)
    if not wait:
        if as_json:
            _print_json(job)
        else:
            console.print(
                f"submitted job [bold]{job['id']}[/] ({job['name']}, {job['n_trials']} trials): {job['state']}"
            )
        return
    final = _wait(api, job["id"], spec.objective)
    if as_json:
        _print_json(final)
    else:
        _print_best(api, final)
    if final["state"] != "succeeded":
        raise fail(
            f"job {final['id']} ended {final['state']}"
            + (f": {final['error']}" if final.get("error") else "")
        )


TERMINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})


def follow(api: Api, job_id: str) -> Iterator[dict[str, Any]]:
    """The job as the server reports it, once at first and then after each change, until it
    ends (the last one yielded). Each request is a long poll (``Prefer: wait``): the server
    answers when the job changes, so this moves as trials finish and stops as soon as the job
    ends, with one request per change or per wait rather than per second. (A server without
    ETags is asked once a second, and each answer is yielded.)"""
    r = api.request("GET", f"/jobs/{job_id}")
    job, etag = r.json(), r.headers.get("etag")
    yield job
    while job["state"] not in TERMINAL_STATES:
        headers = {"Prefer": f"wait={WAIT_S:g}"}
        if etag:
            headers["If-None-Match"] = etag
        else:  # a server without long polling answers at once: do not spin
            time.sleep(1.0)
        r = api.request("GET", f"/jobs/{job_id}", headers=headers)
        if r.status_code == 304:  # no change within the wait
            continue
        job, etag = r.json(), r.headers.get("etag")
        yield job


def _wait(api: Api, job_id: str, objective: str) -> dict[str, Any]:
    """Show the job's progress until it ends; the job as it ended."""
    from hpo.progress import JobProgress

    updates = follow(api, job_id)
    job = first = next(updates)
    with JobProgress(first["n_trials"], objective=objective, console=err_console) as progress:
        for job in itertools.chain([first], updates):
            c = job["trial_counts"]
            best = job["best"]["value"] if job.get("best") else None
            progress.update(
                done=job["finished_trials"],
                pruned=c["pruned"],
                failed=c["fail"],
                best=best,
                status=f"{job['state']} running {c['running']}",
            )
    return job


def _print_best(api: Api, job: dict[str, Any]) -> None:
    console.print(
        f"job [bold]{job['id']}[/] {job['state']}: {job['finished_trials']}/{job['n_trials']} trials"
    )
    if job.get("best"):
        best = api.json("GET", f"/jobs/{job['id']}/best")
        _show_best(best)


def _show_best(best: dict[str, Any]) -> None:
    console.print(
        f"[bold green]best trial #{best['trial_number']}[/]: {best['objective']} = {best['value']:.4f}"
        + (
            f", test accuracy = {best['test_accuracy']:.4f}"
            if best.get("test_accuracy") is not None
            else ""
        )
    )
    for k, v in best["config"].items():
        console.print(f"  {k}: {_fmt(v)}")


@app.command()
def jobs(
    server: ServerOpt = DEFAULT_SERVER,
    state: Annotated[str | None, typer.Option(help="Only jobs in this state.")] = None,
    limit: Annotated[int, typer.Option(help="Page size.")] = 50,
    as_json: JsonOpt = False,
) -> None:
    """List jobs, newest first."""
    params: dict[str, Any] = {"limit": limit}
    if state:
        params["state"] = state
    data = Api(server).json("GET", "/jobs", params=params)
    if as_json:
        _print_json(data)
        return
    table = Table("id", "name", "state", "trials", "created")
    for j in data["items"]:
        table.add_row(
            j["id"],
            j["name"],
            j["state"],
            f"{j['finished_trials']}/{j['n_trials']}",
            j["created_at"][:19],
        )
    console.print(table)


@app.command()
def show(job_id: str, server: ServerOpt = DEFAULT_SERVER, as_json: JsonOpt = False) -> None:
    """A job's state, trial counts, best so far, elapsed and ETA."""
    job = Api(server).json("GET", f"/jobs/{job_id}")
    if as_json:
        _print_json(job)
        return
    c = job["trial_counts"]
    console.print(
        f"[bold]{job['name']}[/] ({job['id']}) [bold]{job['state']}[/]"
        + (f": {job['error']}" if job.get("error") else "")
    )
    console.print(
        f"  trials {job['finished_trials']}/{job['n_trials']}: complete {c['complete']}, pruned {c['pruned']} "
        f"(diverged {c['diverged']}), failed {c['fail']}, running {c['running']}, waiting {c['waiting']}"
    )
    if job.get("best"):
        console.print(
            f"  best so far: trial #{job['best']['trial_number']} = {job['best']['value']:.4f}"
        )
    console.print(
        f"  elapsed {_fmt(job.get('elapsed_s'))} s, ETA {_fmt(job.get('eta_s'))} s; study {job['study_name']}"
    )


@app.command()
def trials(
    job_id: str,
    server: ServerOpt = DEFAULT_SERVER,
    state: Annotated[
        str | None, typer.Option(help="complete | pruned | fail | running | waiting")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """All trials of a job (follows pagination)."""
    api = Api(server)
    items: list[dict[str, Any]] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 500}
        if state:
            params["state"] = state
        if cursor:
            params["cursor"] = cursor
        page = api.json("GET", f"/jobs/{job_id}/trials", params=params)
        items += page["items"]
        cursor = page.get("next_cursor")
        if not cursor:
            break
    if as_json:
        _print_json(items)
        return
    names = sorted({n for t in items for n in t["params"]})
    table = Table("#", "state", "value", *names, "epochs", "note")
    for t in items:
        note = "diverged" if t.get("diverged") else (t.get("reason") or "")
        table.add_row(
            str(t["number"]),
            t["state"],
            _fmt(t.get("value")),
            *[_fmt(t["params"].get(n)) for n in names],
            _fmt(t.get("epochs_run")),
            note[:40],
        )
    console.print(table)


@app.command()
def best(job_id: str, server: ServerOpt = DEFAULT_SERVER, as_json: JsonOpt = False) -> None:
    """The best trial's configuration, validation score and test accuracy."""
    data = Api(server).json("GET", f"/jobs/{job_id}/best")
    if as_json:
        _print_json(data)
    else:
        _show_best(data)


@app.command()
def cancel(job_id: str, server: ServerOpt = DEFAULT_SERVER, as_json: JsonOpt = False) -> None:
    """Cancel a job (running trials stop within one epoch)."""
    data = Api(server).json("POST", f"/jobs/{job_id}/cancel")
    if as_json:
        _print_json(data)
    else:
        console.print(f"job {data['id']} is {data['state']}")


@app.command()
def download(
    job_id: str,
    output: Annotated[
        Path, typer.Option("-o", "--output", help="Where to write the safetensors file.")
    ],
    server: ServerOpt = DEFAULT_SERVER,
) -> None:
    """Download the best model's weights (safetensors)."""
    r = Api(server).request("GET", f"/jobs/{job_id}/best/model")
    output.write_bytes(r.content)
    console.print(f"wrote {output} ({len(r.content):,} bytes)")


@app.command()
def report(
    job_id: str,
    output: Annotated[Path, typer.Option("-o", "--output", help="Where to write the HTML report.")],
    server: ServerOpt = DEFAULT_SERVER,
) -> None:
    """Write the job's self-contained HTML report."""
    r = Api(server).request("GET", f"/jobs/{job_id}/report")
    output.write_text(r.text, encoding="utf-8")
    console.print(f"wrote {output} ({len(r.content):,} bytes)")


@datasets_app.command("upload")
def datasets_upload(
    file: Annotated[
        Path, typer.Argument(help="A .csv (numeric features + label column) or .npz (X, y).")
    ],
    server: ServerOpt = DEFAULT_SERVER,
    label_column: Annotated[str, typer.Option(help="CSV label column.")] = "label",
    as_json: JsonOpt = False,
) -> None:
    """Upload a dataset; prints its server-side id for `dataset: {name: upload, id: ...}`."""
    if not file.is_file():
        raise fail(f"{file}: no such file", 2)
    with file.open("rb") as fh:
        data = Api(server).json(
            "POST",
            "/datasets",
            files={"file": (file.name, fh)},
            params={"label_column": label_column},
        )
    if as_json:
        _print_json(data)
    else:
        console.print(
            f"uploaded {file.name}: id [bold]{data['id']}[/] ({data['rows']} rows, {data['features']} features, "
            f"{data['n_classes']} classes)"
        )


@datasets_app.command("list")
def datasets_list(server: ServerOpt = DEFAULT_SERVER, as_json: JsonOpt = False) -> None:
    """Built-in datasets and your uploads."""
    data = Api(server).json("GET", "/datasets")
    if as_json:
        _print_json(data)
        return
    table = Table("name / id", "kind", "details")
    for b in data["builtin"]:
        table.add_row(b["name"], "built-in", str(b.get("description", "")))
    for u in data["uploads"]:
        table.add_row(
            u["id"], "upload", f"{u['filename']}: {u['rows']} rows x {u['features']} features"
        )
    console.print(table)
