"""The report as one static HTML page: inline CSS, PNGs as ``data:`` URIs, no script, nothing fetched.

Sections: summary (counts, objectives, the best configuration in seed 003's ``Params1(...)`` style and its
config file), the trial table (``<table id="trials">``, one ``<tr class="trial STATE">`` per trial, best
first), the Pareto plots, the effect plots, and per detailed run its curves and error grid. Every text is
HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import json
from typing import TYPE_CHECKING, Mapping

if TYPE_CHECKING:  # pragma: no cover
    from .core import SweepReport

__all__ = ["render_html"]

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", "DejaVu Sans", sans-serif; margin: 24px auto;
       max-width: 1320px; padding: 0 16px; color: #1d1d1f; background: #fff; }
h1 { font-size: 1.6em; margin-bottom: 4px; } h2 { font-size: 1.25em; margin-top: 28px;
  border-bottom: 1px solid #ddd; padding-bottom: 4px; } h3 { font-size: 1.05em; }
.meta { color: #555; font-size: 0.9em; }
pre { background: #f5f5f7; padding: 10px 12px; border-radius: 6px; overflow-x: auto; font-size: 0.9em; }
.params { font-size: 1.05em; background: #eef5ff; }
.cards { display: flex; gap: 12px; flex-wrap: wrap; margin: 10px 0; }
.card { border: 1px solid #ddd; border-radius: 8px; padding: 8px 14px; min-width: 110px; }
.card b { display: block; font-size: 1.4em; }
.tablewrap { max-height: 720px; overflow: auto; border: 1px solid #ddd; border-radius: 6px; }
table { border-collapse: collapse; font-size: 0.85em; width: 100%; }
th, td { padding: 4px 8px; border-bottom: 1px solid #eee; text-align: right; white-space: nowrap; }
th { position: sticky; top: 0; background: #f0f0f3; text-align: center; }
td.text { text-align: left; white-space: normal; max-width: 420px; }
tr.best td { background: #fff6d5; font-weight: 600; }
tr.PRUNED td { color: #8a6d00; } tr.FAIL td { color: #b00020; } tr.RUNNING td, tr.WAITING td { color: #777; }
td.front { color: #d62728; font-weight: 700; text-align: center; }
figure { margin: 10px 0 18px; } figcaption { color: #555; font-size: 0.9em; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
.row { display: flex; gap: 16px; flex-wrap: wrap; } .row figure { flex: 1 1 560px; }
.note { color: #8a6d00; }
"""


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _img(images: Mapping[str, bytes | None], name: str, alt: str, caption: str) -> str:
    data = images.get(name)
    if data is None:
        return ""
    return (f'<figure><img id="{html.escape(name.rsplit(".", 1)[0])}" src="{_data_uri(data)}" '
            f'alt="{html.escape(alt)}"><figcaption>{html.escape(caption)}</figcaption></figure>')


def _table(report: "SweepReport") -> str:
    df = report.display_frame(error_width=200)
    text_cols = {"state", "error", "stopped", "run_id", *report.params}
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    rows = []
    for (_, raw), (_, shown) in zip(report.frame.iterrows(), df.iterrows()):
        cls = ["trial", html.escape(str(raw["state"]))]
        if report.best is not None and int(raw["trial"]) == report.best:
            cls.append("best")
        cells = []
        for col in df.columns:
            kind = "front" if col == "front" else "text" if col in text_cols else ""
            cells.append(f'<td class="{kind}">{html.escape(str(shown[col]))}</td>' if kind
                         else f"<td>{html.escape(str(shown[col]))}</td>")
        rows.append(f'<tr class="{" ".join(cls)}" data-trial="{int(raw["trial"])}">{"".join(cells)}</tr>')
    return (f'<div class="tablewrap"><table id="trials"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table></div>')


def render_html(report: "SweepReport", images: Mapping[str, bytes | None]) -> str:
    """The page for ``report`` with ``images`` (file name -> PNG bytes, from ``report.figures()``) embedded."""
    from .config import params_text

    e = html.escape
    src = report.source
    what = {"sweep": "sweep", "optuna": "Optuna study", "mlflow": "MLflow experiment"}[src.kind]
    counts = report.counts()
    best = report.best_trial()
    versions = ", ".join(f"{k} {v}" for k, v in report.settings.get("versions", {}).items())
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
             f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
             f"<title>moco report: {e(src.name)}</title><style>{_CSS}</style></head><body>",
             f"<h1>moco report: {e(src.name)}</h1>",
             f'<p class="meta">{e(what)} at {e(src.location)} &middot; generated {e(report.settings.get("created", ""))}'
             f" &middot; {e(versions)}</p>"]
    meta = src.meta
    extra = []
    for key in ("sampler", "seed", "quick", "threads"):
        if key in meta:
            extra.append(f"{key} {meta[key]}")
    if extra:
        parts.append(f'<p class="meta">{e(", ".join(extra))}</p>')
    cards = [("trials", len(report.frame))] + [(s.lower(), n) for s, n in counts.items()] + [
        ("Pareto front", len(report.pareto))]
    parts.append('<section id="summary"><h2>Summary</h2><div class="cards">'
                 + "".join(f'<div class="card"><b>{e(str(n))}</b>{e(label)}</div>' for label, n in cards)
                 + "</div>")
    parts.append("<p>Objectives: " + e(", ".join(f"{o} ({d})" for o, d in zip(src.objectives, src.directions)))
                 + f"; the table is sorted by <b>{e(report.objective)}</b> ({e(report.direction)}). "
                 "Failed and pruned trials are listed, not plotted.</p>")
    if best is not None:
        from .core import _fmt_metric, _headline

        figures = ", ".join(f"{k} {_fmt_metric(k, v)}" for k, v in _headline(best, report).items())
        parts.append(f"<h3>Best: trial {best.number}</h3><p>{e(figures)}</p>"
                     f'<pre class="params" id="best-params">{e(params_text(best.params))}</pre>')
        if report.best_config is not None:
            parts.append(f"<p>Config that reproduces it ({e(report.config_origin)}; written beside this page as "
                         "best_config.toml):</p>"
                         f'<pre id="best-config">{e(report.best_config)}</pre>')
        else:
            parts.append(f'<p class="note">No config file: {e(report.config_origin)}</p>')
    if src.fixed_params:
        parts.append("<p>Settings shared by every run: <code>"
                     + e(", ".join(f"{k}={v}" for k, v in src.fixed_params.items())) + "</code></p>")
    parts.append("</section>")
    parts.append(f'<section id="table"><h2>Trials ({len(report.frame)})</h2>'
                 '<p class="meta">front: * on the Pareto front; the best trial is highlighted.</p>'
                 + _table(report) + "</section>")
    acc = report.accuracy_column or report.objective
    parts.append('<section id="pareto"><h2>Pareto fronts</h2><div class="row">'
                 + _img(images, "pareto_macs.png", f"{acc} vs MACs",
                        f"{acc} against MACs per sample; red: not dominated (front: "
                        + ", ".join(f"#{n}" for n in report.pareto_macs) + ")")
                 + _img(images, "pareto_time.png", f"{acc} vs training time",
                        f"{acc} against training time; red: not dominated (front: "
                        + ", ".join(f"#{n}" for n in report.pareto_time) + ")")
                 + "</div>")
    missing = [label for name, label in (("pareto_macs.png", "MACs"), ("pareto_time.png", "training time"))
               if images.get(name) is None]
    if missing:
        parts.append(f'<p class="note">No {" or ".join(missing)} recorded for complete trials: no plot.</p>')
    parts.append("</section>")
    parts.append('<section id="effects"><h2>Parameter effects</h2>'
                 + (_img(images, "effects.png", "parameter effects",
                         f"{report.objective} by each swept parameter that takes more than one value (box: "
                         f"quartiles, red: median, dots: trials), and the mean {report.objective} over pairs of "
                         "numeric parameters")
                    if images.get("effects.png") else '<p class="note">No swept parameter took two values among the complete '
                    'trials.</p>')
                 + "</section>")
    if report.runs:
        parts.append('<section id="runs"><h2>Runs</h2>')
        for run in report.runs:
            parts.append(f'<div class="run" id="run-{run.number}"><h3>Trial {run.number} ({e(run.state.lower())})</h3>'
                         f'<pre class="params">{e(run.params_text)}</pre>')
            parts.append(_img(images, f"curves_{run.number:04d}.png", f"training curves of trial {run.number}",
                              "accuracy and loss per epoch (train, validation, test as recorded)")
                         or '<p class="note">No per-epoch history recorded.</p>')
            parts.append(_img(images, f"errors_{run.number:04d}.png", f"error grid of trial {run.number}",
                              "test samples by true label (columns) and predicted label (rows): off-diagonal "
                              "cells are the model's confusions")
                         or '<p class="note">No predictions.npz recorded.</p>')
            for note in run.notes:
                parts.append(f'<p class="note">{e(note)}</p>')
            parts.append("</div>")
        parts.append("</section>")
    parts.append(f'<footer class="meta"><p>settings: {e(json.dumps(_settings(report), default=str))}</p></footer>')
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _settings(report: "SweepReport") -> dict:
    s = {k: v for k, v in report.settings.items() if k != "versions"}
    for key in ("storage", "tracking_uri", "study_name", "versions"):
        if key in report.source.meta:
            s[f"source {key}"] = report.source.meta[key]
    return s
