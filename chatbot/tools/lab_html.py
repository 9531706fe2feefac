"""The style lab's HTML report: one self-contained file (inline CSS and SVG, no script, no
font, no address outside it) that opens in any browser without a server or a network.

The plots are SVG written here rather than drawn with a plotting library: they need only
rectangles, lines and text, and writing them keeps the lab free of a large dependency
(matplotlib and its image stack) while the text stays real, selectable text in the page.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from typing import Any

from .lab_metrics import METRICS, SAFETY_KINDS
from .lab_report import Comparison, cell_label, flagged, fmt_delta, fmt_metric

__all__ = ["render_html", "PLOT_METRICS"]

PALETTE = ("#0072b2", "#e69f00", "#009e73", "#cc79a7", "#56b4e9", "#d55e00", "#8c6d1f", "#555555")
"""Okabe-Ito colours, told apart with the common forms of colour blindness."""

PLOT_METRICS = ("distinct_2", "self_bleu", "perplexity", "reply_tokens", "repeated_turn_rate", "distinct_1", "bleu",
                "chrf", "latency_p50")
"""Metrics drawn as bar charts across the grid, in this order (those with no value anywhere are left out)."""

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px; color: #1b1b1b; background: #fff; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 18px; margin: 28px 0 8px; border-bottom: 1px solid #ddd; }
h3 { font-size: 15px; margin: 18px 0 6px; }
.meta { color: #555; margin: 0 0 12px; }
.note { background: #fff7e0; border-left: 4px solid #e69f00; padding: 4px 10px; margin: 4px 0; }
table { border-collapse: collapse; }
table.metrics td, table.metrics th, table.counts td, table.counts th { padding: 3px 8px; border-bottom: 1px solid #e4e4e4; }
table.metrics th, table.counts th { background: #f3f5f8; text-align: right; font-weight: 600; }
table.metrics th:first-child, table.metrics td:first-child, table.counts th:first-child { text-align: left;
  white-space: nowrap; }
table.metrics td { text-align: right; font-variant-numeric: tabular-nums; }
.delta { display: block; font-size: 11px; color: #666; }
.delta.up, .delta.down { color: #1b1b1b; }
.delta.up::before { content: "\\25b2 "; font-size: 9px; } .delta.down::before { content: "\\25bc "; font-size: 9px; }
.legend { display: flex; flex-wrap: wrap; gap: 4px 16px; margin: 6px 0; }
.legend span::before { content: ""; display: inline-block; width: 12px; height: 12px; margin-right: 5px;
  vertical-align: -1px; background: var(--c); }
.plots { display: flex; flex-wrap: wrap; gap: 12px; }
.plots svg { border: 1px solid #e4e4e4; background: #fff; }
svg text { font: 11px system-ui, sans-serif; fill: #333; } svg .title { font-size: 13px; font-weight: 600; }
svg .grid { stroke: #e8e8e8; } svg .axis { stroke: #888; } svg .base { stroke: #111; stroke-width: 2; }
.scroll { overflow-x: auto; max-width: 100%; }
table.transcript { table-layout: fixed; }
table.transcript th, table.transcript td { border: 1px solid #e0e0e0; padding: 4px 6px; vertical-align: top;
  width: 190px; min-width: 190px; text-align: left; overflow-wrap: anywhere; }
table.transcript th { background: #f3f5f8; position: sticky; top: 0; }
table.transcript td.user { background: #f7f7f7; font-style: italic; }
td .tag { color: #a23b00; font-size: 11px; display: block; }
details { margin: 6px 0; } summary { cursor: pointer; color: #0b5394; }
code, pre { font: 12px ui-monospace, Menlo, Consolas, monospace; } pre { white-space: pre-wrap; background: #f7f7f7; padding: 6px; }
dl.defs dt { font-weight: 600; } dl.defs dd { margin: 0 0 6px 16px; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _ticks(top: float) -> list[float]:
    """Round tick values from 0 to at least ``top`` (steps of 1, 2, 2.5 or 5 times a power of ten)."""
    if not top or top <= 0 or math.isnan(top):
        top = 1.0
    raw = top / 4
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    count = math.ceil(top / step - 1e-9)
    return [round(i * step, 10) for i in range(count + 1)]


def _tick_text(value: float) -> str:
    return f"{value:g}"


def _frame(title: str, width: int, height: int, left: int, right: int, ticks: Sequence[float],
           y: Any) -> list[str]:
    """The opening of a chart: the svg element, its title, and a grid line with its label per tick."""
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="{_e(title)}">',
           f"<title>{_e(title)}</title>", f'<text class="title" x="{left}" y="16">{_e(title)}</text>']
    for t in ticks:
        out.append(f'<line class="grid" x1="{left}" x2="{width - right}" y1="{y(t):.1f}" y2="{y(t):.1f}"/>')
        out.append(f'<text x="{left - 4}" y="{y(t) + 4:.1f}" text-anchor="end">{_tick_text(t)}</text>')
    return out


def bar_chart(title: str, groups: Sequence[str], series: Sequence[str], values: Mapping[tuple[str, str], float | None],
              baseline: Mapping[tuple[str, str], float | None] | None = None, number: str = "{:.3g}") -> str:
    """Grouped bars: one group per entry of ``groups``, one bar per entry of ``series`` in each.

    A baseline value, where given, is a black tick across its bar.
    """
    width, height = 420, 250
    left, right, top, bottom = 46, 10, 28, 46
    plot_w, plot_h = width - left - right, height - top - bottom
    known = [v for v in values.values() if v is not None]
    known += [v for v in (baseline or {}).values() if v is not None]
    ticks = _ticks(max(known, default=1.0))
    y_max = ticks[-1]

    def y(v: float) -> float:
        return top + plot_h - plot_h * (v / y_max if y_max else 0)

    out = _frame(title, width, height, left, right, ticks, y)
    out.append(f'<line class="axis" x1="{left}" x2="{width - right}" y1="{y(0):.1f}" y2="{y(0):.1f}"/>')
    group_w = plot_w / max(len(groups), 1)
    bar_w = min(28.0, group_w * 0.8 / max(len(series), 1))
    for g, group in enumerate(groups):
        x0 = left + g * group_w + (group_w - bar_w * len(series)) / 2
        for s, name in enumerate(series):
            value = values.get((group, name))
            x = x0 + s * bar_w
            colour = PALETTE[s % len(PALETTE)]
            if value is not None:
                out.append(f'<rect x="{x:.1f}" y="{y(value):.1f}" width="{bar_w - 1:.1f}" '
                           f'height="{max(y(0) - y(value), 0.5):.1f}" fill="{colour}">'
                           f"<title>{_e(group)} / {_e(name)}: {_e(number.format(value))}</title></rect>")
            old = (baseline or {}).get((group, name))
            if old is not None:
                out.append(f'<line class="base" x1="{x:.1f}" x2="{x + bar_w - 1:.1f}" y1="{y(old):.1f}" '
                           f'y2="{y(old):.1f}"><title>baseline {_e(number.format(old))}</title></line>')
        label = group if len(group) <= 22 else group[:21] + "…"
        out.append(f'<text x="{left + g * group_w + group_w / 2:.1f}" y="{height - bottom + 16}" '
                   f'text-anchor="middle">{_e(label)}</text>')
    out.append("</svg>")
    return "".join(out)


def line_chart(title: str, x_label: str, points: Mapping[str, Sequence[tuple[float, float]]],
               number: str = "{:.3g}") -> str:
    """One line per series through its (x, y) points, sorted by x."""
    width, height = 420, 250
    left, right, top, bottom = 46, 14, 28, 46
    plot_w, plot_h = width - left - right, height - top - bottom
    xs = [x for pts in points.values() for x, _ in pts]
    ys = [v for pts in points.values() for _, v in pts]
    x_lo, x_hi = min(xs, default=0.0), max(xs, default=1.0)
    if x_hi == x_lo:
        x_lo, x_hi = x_lo - 0.5, x_hi + 0.5
    pad = (x_hi - x_lo) * 0.06
    x_lo, x_hi = x_lo - pad, x_hi + pad
    ticks = _ticks(max(ys, default=1.0))
    y_max = ticks[-1]

    def px(v: float) -> float:
        return left + plot_w * (v - x_lo) / (x_hi - x_lo)

    def py(v: float) -> float:
        return top + plot_h - plot_h * (v / y_max if y_max else 0)

    out = _frame(title, width, height, left, right, ticks, py)
    for x in sorted(set(xs)):
        out.append(f'<line class="axis" x1="{px(x):.1f}" x2="{px(x):.1f}" y1="{py(0):.1f}" y2="{py(0) + 4:.1f}"/>')
        out.append(f'<text x="{px(x):.1f}" y="{py(0) + 16:.1f}" text-anchor="middle">{_tick_text(x)}</text>')
    out.append(f'<line class="axis" x1="{left}" x2="{width - right}" y1="{py(0):.1f}" y2="{py(0):.1f}"/>')
    out.append(f'<text x="{left + plot_w / 2:.1f}" y="{height - 8}" text-anchor="middle">{_e(x_label)}</text>')
    for s, (name, pts) in enumerate(points.items()):
        colour = PALETTE[s % len(PALETTE)]
        pts = sorted(pts)
        if len(pts) > 1:
            path = " ".join(f"{px(x):.1f},{py(v):.1f}" for x, v in pts)
            out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
        for x, v in pts:
            out.append(f'<circle cx="{px(x):.1f}" cy="{py(v):.1f}" r="3.5" fill="{colour}">'
                       f"<title>{_e(name)} at {_tick_text(x)}: {_e(number.format(v))}</title></circle>")
    out.append("</svg>")
    return "".join(out)


def _legend(names: Sequence[str], extra: str = "") -> str:
    items = "".join(f'<span style="--c:{PALETTE[i % len(PALETTE)]}">{_e(n)}</span>' for i, n in enumerate(names))
    return f'<div class="legend">{items}{extra}</div>'


def _group(cell: Mapping[str, Any], one_model: bool) -> str:
    return cell["persona"] if one_model else f"{cell['model']} / {cell['persona']}"


def _plots(doc: Mapping[str, Any], comparison: Comparison | None) -> str:
    cells = doc["cells"]
    one_model = len(doc["models"]) == 1
    groups = list(dict.fromkeys(_group(c, one_model) for c in cells))
    series = list(dict.fromkeys(c["preset"] for c in cells))
    charts = []
    for key in PLOT_METRICS:
        values = {(_group(c, one_model), c["preset"]): c["metrics"].get(key) for c in cells}
        if all(v is None for v in values.values()):
            continue
        baseline = None
        if comparison is not None:
            baseline = {(_group(c, one_model), c["preset"]): comparison.baseline_metrics.get(c["key"], {}).get(key)
                        for c in cells}
        label, number, what, _ = METRICS[key]
        charts.append(bar_chart(f"{label} ({what})", groups, series, values, baseline, number))
    mark = '<span style="--c:#111">baseline (black tick)</span>' if comparison is not None else ""
    parts = ["<h2>Across the grid</h2>", _legend(series, mark), '<div class="plots">', *charts, "</div>"]
    temperatures = {c["decoding"]["temperature"] for c in cells}
    if len(temperatures) > 1:
        lines = []
        for key in ("distinct_2", "self_bleu"):
            points: dict[str, list[tuple[float, float]]] = {}
            for c in cells:
                value = c["metrics"].get(key)
                if value is not None:
                    points.setdefault(_group(c, one_model), []).append((c["decoding"]["temperature"], value))
            if points:
                label, number, _, _ = METRICS[key]
                lines.append(line_chart(f"{label} vs temperature", "temperature", points, number))
        if lines:
            parts += ["<h3>Diversity against temperature</h3>", _legend(groups), '<div class="plots">', *lines,
                      "</div>"]
    return "\n".join(parts)


def _metrics_table(doc: Mapping[str, Any], comparison: Comparison | None) -> str:
    one_model = len(doc["models"]) == 1
    keys = [k for k in METRICS if any(c["metrics"].get(k) is not None for c in doc["cells"])]
    head = "".join(f'<th title="{_e(METRICS[k][3])}">{_e(METRICS[k][0])}</th>' for k in keys)
    rows = [f'<table class="metrics"><thead><tr><th>cell</th><th>temperature</th><th>top-p</th>{head}'
            f"<th>flagged</th>{'<th>changed replies</th>' if comparison else ''}</tr></thead><tbody>"]
    for cell in doc["cells"]:
        delta = comparison.cells.get(cell["key"]) if comparison else None
        tds = []
        for k in keys:
            text = _e(fmt_metric(k, cell["metrics"].get(k)))
            if comparison is not None:
                d = delta.metrics.get(k) if delta else None
                shown = fmt_delta(k, d) if delta else "new"
                direction = "" if d is None or shown.strip("+-0.") == "" else (" up" if d > 0 else " down")
                text += f'<span class="delta{direction}">{_e(shown)}</span>'
            tds.append(f"<td>{text}</td>")
        changed = ""
        if comparison is not None:
            changed = f"<td>{delta.changed_replies}/{delta.compared_replies}</td>" if delta else "<td>-</td>"
        d = cell["decoding"]
        rows.append(f"<tr><td>{_e(cell_label(cell, one_model))}</td><td>{d['temperature']:g}</td>"
                    f"<td>{d['top_p']:g}</td>{''.join(tds)}<td>{flagged(cell)}</td>{changed}</tr>")
    rows.append("</tbody></table>")
    return "".join(rows)


def _counts_table(doc: Mapping[str, Any]) -> str:
    one_model = len(doc["models"]) == 1
    kinds = [k for k in (*SAFETY_KINDS, "other") if any(c["safety"].get(k) for c in doc["cells"]) or k == "clean"]
    finishes = sorted({f for c in doc["cells"] for f in c["finish"]})
    head = "".join(f"<th>{_e(k)}</th>" for k in kinds) + "".join(f"<th>finish: {_e(f)}</th>" for f in finishes)
    rows = [f'<table class="counts"><thead><tr><th>cell</th><th>replies</th>{head}<th>regenerated</th></tr></thead><tbody>']
    for c in doc["cells"]:
        cells = "".join(f"<td>{c['safety'].get(k, 0)}</td>" for k in kinds)
        cells += "".join(f"<td>{c['finish'].get(f, 0)}</td>" for f in finishes)
        rows.append(f"<tr><td>{_e(cell_label(c, one_model))}</td><td>{c['metrics']['replies']}</td>{cells}"
                    f"<td>{c['metrics']['regenerated']}</td></tr>")
    rows.append("</tbody></table>")
    return "".join(rows)


def _transcript_table(doc: Mapping[str, Any], conversation: int, sample: int) -> str:
    one_model = len(doc["models"]) == 1
    cells = doc["cells"]
    found = [next(t for t in c["transcripts"] if t["conversation"] == conversation and t["sample"] == sample)
             for c in cells]
    head = "".join(f"<th>{_e(cell_label(c, one_model))}</th>" for c in cells)
    rows = [f'<div class="scroll"><table class="transcript"><thead><tr><th>{_e(doc["scenario"]["user"])}</th>{head}'
            "</tr></thead><tbody>"]
    for i, turn in enumerate(found[0]["turns"]):
        replies = []
        for transcript in found:
            t = transcript["turns"][i]
            tags = [t["finish_reason"]] if t["finish_reason"] != "stop" else []
            tags += [r for r in t["safety"] if not r.startswith("repeat:")]
            if t["attempts"] > 1:
                tags.append(f"{t['attempts']} attempts")
            tag = f'<span class="tag">{_e("; ".join(tags))}</span>' if tags else ""
            replies.append(f"<td>{_e(t['reply'])}{tag}</td>")
        rows.append(f'<tr><td class="user">{_e(turn["user"])}</td>{"".join(replies)}</tr>')
    rows.append("</tbody></table></div>")
    return "".join(rows)


def _transcripts(doc: Mapping[str, Any]) -> str:
    parts = ["<h2>Transcripts side by side</h2>",
             "<p class=\"meta\">Every column replays the same lines with the same seeds. Sample 1 is shown; "
             "the other samples are folded below it. Notes under a reply: why it ended if not at the end of "
             "its turn, and what the safety filters did.</p>"]
    for c, conv in enumerate(doc["scenario"]["conversations"]):
        name = conv.get("name") or f"conversation {c + 1}"
        parts.append(f"<h3>{_e(name)}</h3>")
        parts.append(_transcript_table(doc, c, 0))
        for s in range(1, doc["scenario"]["samples"]):
            parts.append(f"<details><summary>sample {s + 1}</summary>{_transcript_table(doc, c, s)}</details>")
        refs = [(turn["user"], turn["references"]) for turn in conv["turns"] if turn.get("references")]
        if refs:
            items = "".join(f"<dt>{_e(u)}</dt>" + "".join(f"<dd>{_e(r)}</dd>" for r in rs) for u, rs in refs)
            parts.append(f'<details><summary>reference replies</summary><dl class="defs">{items}</dl></details>')
    return "\n".join(parts)


def _personas(doc: Mapping[str, Any]) -> str:
    parts = ["<h2>Personas and presets</h2>"]
    for name, p in doc["personas"].items():
        examples = "".join(f"<dd>User: {_e(ex['user'])}<br>{_e(p['speaker'])}: {_e(ex['bot'])}</dd>"
                           for ex in p.get("examples", []))
        decoding = f"<dd>decoding: <code>{_e(p['decoding'])}</code></dd>" if p.get("decoding") else ""
        parts.append(f'<details><summary>{_e(name)} ({_e(p["speaker"])}, preset {_e(p["preset"])})</summary>'
                     f'<dl class="defs"><dt>description</dt><dd>{_e(p["description"])}</dd>'
                     f"<dt>examples</dt>{examples or '<dd>none</dd>'}{decoding}</dl></details>")
    presets = doc["scenario"]["presets"]
    if presets:
        items = "".join(f"<dt>{_e(n)}</dt><dd><code>{_e(v)}</code></dd>" for n, v in presets.items())
        parts.append(f'<details><summary>this scenario\'s presets</summary><dl class="defs">{items}</dl></details>')
    return "\n".join(parts)


def render_html(doc: Mapping[str, Any], comparison: Comparison | None = None) -> str:
    """The report as one HTML page."""
    sc = doc["scenario"]
    turns = sum(len(c["turns"]) for c in sc["conversations"])
    models = ", ".join(f"{label} ({path})" for label, path in doc["models"].items())
    notes = ""
    if comparison is not None:
        items = [f"Compared with the baseline {comparison.path}: the small figure under each number is the change "
                 "(whether up or down is better depends on what you are after)."]
        items += comparison.notes
        if comparison.gone_cells:
            items.append(f"Not in this run: {', '.join(comparison.gone_cells)}")
        notes = "".join(f'<p class="note">{_e(n)}</p>' for n in items)
    definitions = "".join(f"<dt>{_e(label)}</dt><dd>{_e(definition)}</dd>" for label, _, _, definition in METRICS.values())
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>Style lab: {_e(sc['name'])}</title><style>{CSS}</style></head><body>",
        f"<h1>Style lab: {_e(sc['name'])}</h1>",
        f"<p class=\"meta\">{_e(sc['description'])}</p>" if sc["description"] else "",
        f'<p class="meta">{len(doc["cells"])} cells &times; {sc["samples"]} samples &times; {turns} user lines, '
        f"seed {sc['seed']}, model {_e(models)}, scenario <code>{_e(sc['file'])}</code>, "
        f"{doc['seconds']:.0f} s.</p>",
        notes,
        "<h2>Numbers</h2>",
        _metrics_table(doc, comparison),
        _plots(doc, comparison),
        "<h2>Safety and finish counts</h2>",
        _counts_table(doc),
        _transcripts(doc),
        _personas(doc),
        f'<h2>What the numbers mean</h2><dl class="defs">{definitions}</dl>',
        "</body></html>",
        "",
    ])
