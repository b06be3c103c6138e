"""A self-contained HTML report of a job: plotly figures with plotly.js inlined once."""

from __future__ import annotations

import html
import json
import math
from typing import Any

import optuna
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from service.db import Job
from service.results import best_trial, state_counts, top_trials
from service.spec import JobSpec

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1200px;
color:#1f2933;padding:0 16px}
h1{font-size:1.6em;margin-bottom:4px}h2{font-size:1.2em;margin-top:32px;border-bottom:1px solid #e4e7eb}
.meta{color:#52606d}.cards{display:flex;gap:12px;flex-wrap:wrap;margin:12px 0}
.card{border:1px solid #e4e7eb;border-radius:8px;padding:10px 14px;min-width:110px}
.card b{display:block;font-size:1.4em}table{border-collapse:collapse;font-size:.92em}
td,th{border-bottom:1px solid #e4e7eb;padding:4px 10px;text-align:left}.note{color:#7b8794;font-size:.9em}
"""


def _fig_html(fig: go.Figure, *, first: bool) -> str:
    fig.update_layout(template="plotly_white", margin={"l": 50, "r": 20, "t": 50, "b": 40})
    return str(fig.to_html(full_html=False, include_plotlyjs="inline" if first else False))


def _safe(fn: Any, *args: Any, **kwargs: Any) -> go.Figure | None:
    try:
        return fn(*args, **kwargs)
    except Exception:  # too few trials for a plot; the section says so instead
        return None


def learning_curves(trials: list[optuna.trial.FrozenTrial]) -> go.Figure:
    """Train vs validation loss and accuracy per epoch, as the lectures plot them."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("loss per epoch", "accuracy per epoch"))
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd"]
    for i, t in enumerate(trials):
        hist = t.user_attrs.get("history") or []
        if not hist:
            continue
        color = palette[i % len(palette)]
        ep = [h["epoch"] for h in hist]
        for col, key in ((1, "loss"), (2, "accuracy")):
            for split, dash in (("train", "dot"), ("val", "solid")):
                ys = [_num(h.get(f"{split}_{key}")) for h in hist]
                fig.add_trace(
                    go.Scatter(
                        x=ep,
                        y=ys,
                        mode="lines+markers",
                        line={"color": color, "dash": dash},
                        name=f"#{t.number} {split}",
                        legendgroup=f"t{t.number}",
                        showlegend=(col == 1),
                    ),
                    row=1,
                    col=col,
                )
    fig.update_xaxes(title_text="epoch")
    fig.update_layout(
        height=420, title="Learning curves of the top trials (dotted: train, solid: validation)"
    )
    return fig


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and math.isfinite(v) else None


def render_report(job: Job, study: optuna.Study, spec: JobSpec) -> str:
    trials = study.get_trials(deepcopy=False)
    counts = state_counts(trials)
    best = best_trial(study)
    parts: list[str] = []
    first = True

    def add(title: str, fig: go.Figure | None, empty: str) -> None:
        nonlocal first
        parts.append(f"<h2>{html.escape(title)}</h2>")
        if fig is None:
            parts.append(f"<p class='note'>{html.escape(empty)}</p>")
        else:
            parts.append(_fig_html(fig, first=first))
            first = False

    vis = optuna.visualization
    add(
        "Optimization history", _safe(vis.plot_optimization_history, study), "no complete trial yet"
    )
    add(
        "Learning curves",
        learning_curves(top_trials(study, 5)) if best else None,
        "no complete trial yet",
    )
    add(
        "Parameter importances",
        _safe(vis.plot_param_importances, study),
        "needs at least two complete trials with varying parameters",
    )
    add("Parallel coordinates", _safe(vis.plot_parallel_coordinate, study), "no complete trial yet")
    states = go.Figure(
        go.Bar(
            x=["complete", "pruned", "fail", "running", "waiting"],
            y=[
                counts["complete"],
                counts["pruned"],
                counts["fail"],
                counts["running"],
                counts["waiting"],
            ],
            marker_color=["#2ca02c", "#ff7f0e", "#d62728", "#1f77b4", "#7f7f7f"],
        )
    )
    states.update_layout(
        height=300, title=f"Trials by state ({counts['diverged']} diverged, shown as pruned)"
    )
    add("Trial states", states, "")

    cards = "".join(
        f"<div class='card'>{html.escape(k)}<b>{v}</b></div>"
        for k, v in (
            ("state", job.state),
            ("trials", f"{job.finished}/{job.n_trials}"),
            ("complete", counts["complete"]),
            ("pruned", counts["pruned"]),
            ("failed", counts["fail"]),
            ("diverged", counts["diverged"]),
        )
    )
    best_html = "<p class='note'>no complete trial yet</p>"
    if best is not None:
        rows = "".join(
            f"<tr><td>{html.escape(k)}</td><td>{html.escape(_fmt(v))}</td></tr>"
            for k, v in best.params.items()
        )
        ua = best.user_attrs
        extra = "".join(
            f"<tr><td>{k}</td><td>{html.escape(_fmt(ua.get(k)))}</td></tr>"
            for k in (
                "best_val_accuracy",
                "best_val_loss",
                "test_accuracy",
                "best_epoch",
                "epochs_run",
                "n_parameters",
            )
            if ua.get(k) is not None
        )
        best_html = (
            f"<p>Trial #{best.number}: {html.escape(spec.objective)} = {best.value:.4f}</p>"
            f"<table><tr><th>parameter</th><th>value</th></tr>{rows}{extra}</table>"
        )
    spec_json = html.escape(json.dumps(spec.model_dump(mode="json"), indent=2))
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>HPO report: {html.escape(job.name)}</title><style>{_CSS}</style></head><body>"
        f"<h1>{html.escape(job.name)}</h1><p class='meta'>job {job.id} · study {html.escape(job.study_name)} · "
        f"objective {html.escape(spec.objective)} ({study.direction.name.lower()}) · sampler {spec.sampler.type}</p>"
        f"<div class='cards'>{cards}</div><h2>Best configuration</h2>{best_html}"
        + "".join(parts)
        + f"<h2>Job spec</h2><pre>{spec_json}</pre></body></html>"
    )


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


__all__ = ["learning_curves", "render_report"]
