"""The style lab's outputs: the results document (JSON), a CSV of the numbers, the terminal
table, and the comparison with an earlier run (``--baseline``).

The JSON document is the one source the other outputs are made from, the HTML report
(`chatbot.lab_html`) included, so a baseline read back from disk compares like for like.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from ..errors import ChatbotError, read_text
from .lab_metrics import METRICS, SAFETY_KINDS

__all__ = ["FORMAT", "results_document", "csv_text", "write_outputs", "check_out_dir", "load_baseline",
           "check_baseline", "compare", "Comparison", "terminal_table", "cell_label", "flagged",
           "TABLE_METRICS"]

FORMAT = "chatbot-lab/1"
"""Written into every results document; a baseline without it is refused."""

TABLE_METRICS = ("reply_tokens", "distinct_1", "distinct_2", "repeated_turn_rate", "self_bleu", "perplexity", "bleu",
                 "chrf", "latency_p50")
"""The metrics the terminal table shows (the JSON, CSV and HTML have them all)."""

VOLATILE = ("seconds", "latency", "latency_p50", "latency_mean")
"""Keys whose values change from run to run with the same seed (timings); everything else repeats exactly."""


def _round(value: Any) -> Any:
    return round(value, 6) if isinstance(value, float) else value


def results_document(run: Any) -> dict[str, Any]:
    """The whole run as JSON-ready data: scenario, personas, models, and per cell its settings,
    metrics, safety and finish counts and transcripts."""
    plan = run.plan
    scenario = plan.scenario
    cells = []
    for result in run.cells:
        cell = result.cell
        metrics = dict(result.metrics)
        safety, finish = metrics.pop("safety"), metrics.pop("finish")
        cells.append({
            "key": cell.key, "model": cell.model, "persona": cell.persona, "preset": cell.preset,
            "base_preset": cell.base_preset, "overrides": cell.overrides,
            "decoding": result.decoding or cell.settings.model_dump(exclude={"seed"}),
            "seconds": round(result.seconds, 3),
            "metrics": {k: _round(v) for k, v in metrics.items()},
            "safety": safety, "finish": finish,
            "transcripts": result.transcripts,
        })
    return {
        "format": FORMAT,
        "scenario": {
            "name": scenario.name, "file": str(plan.path), "description": scenario.description,
            "seed": scenario.seed, "samples": scenario.samples, "user": scenario.user,
            "grid": scenario.grid.model_dump(),
            "presets": {name: {"base": p.base, **p.overrides()} for name, p in scenario.presets.items()},
            "conversations": [c.model_dump() for c in scenario.conversations],
        },
        "models": run.model_names,
        "personas": {name: p.model_dump(mode="json") for name, p in plan.personas.items()},
        "metric_definitions": {key: f"{label}: {definition}" for key, (label, _, _, definition) in METRICS.items()},
        "seconds": round(run.seconds, 3),
        "cells": cells,
    }


# --------------------------------------------------------------------------- files


def csv_text(doc: Mapping[str, Any]) -> str:
    """One row per cell: where it sits in the grid, its main decoding settings, and every number."""
    finishes = sorted({reason for cell in doc["cells"] for reason in cell["finish"]})
    kinds = [k for k in (*SAFETY_KINDS, "other") if any(k in cell["safety"] for cell in doc["cells"])]
    header = ["model", "persona", "preset", "temperature", "top_k", "top_p", "max_new_tokens", "bot_repetition_penalty",
              "replies", *METRICS, "regenerated", *(f"safety_{k}" for k in kinds), *(f"finish_{f}" for f in finishes)]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    for cell in doc["cells"]:
        d, m = cell["decoding"], cell["metrics"]
        writer.writerow([cell["model"], cell["persona"], cell["preset"], d["temperature"], d["top_k"], d["top_p"],
                         d["max_new_tokens"], d["bot_repetition_penalty"], m["replies"],
                         *("" if m.get(k) is None else m[k] for k in METRICS), m["regenerated"],
                         *(cell["safety"].get(k, 0) for k in kinds), *(cell["finish"].get(f, 0) for f in finishes)])
    return out.getvalue()


def write_outputs(doc: Mapping[str, Any], out_dir: Path, html: str) -> dict[str, Path]:
    """Write results.json, results.csv and report.html into ``out_dir``.

    A results.json already there (an earlier run) is kept as previous.json first, so the
    run it came from can still serve as a ``--baseline``. All three are written beside
    their places first and renamed in only once all three are whole, so a failure or an
    interruption leaves the folder as it was, never one new file beside two old ones.
    """
    paths = {"json": out_dir / "results.json", "csv": out_dir / "results.csv", "html": out_dir / "report.html"}
    texts = {"json": json.dumps(doc, indent=1, ensure_ascii=False) + "\n", "csv": csv_text(doc), "html": html}
    written: dict[str, Path] = {}
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        for kind, path in paths.items():
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(texts[kind], encoding="utf-8")
            written[kind] = tmp
        if paths["json"].is_file():
            os.replace(paths["json"], out_dir / "previous.json")
        for kind, tmp in written.items():
            os.replace(tmp, paths[kind])
    except OSError as err:
        raise ChatbotError(f"`--out` {out_dir}: cannot write the results ({err.strerror or err})") from None
    finally:
        for tmp in written.values():
            tmp.unlink(missing_ok=True)
    return paths


def check_out_dir(out_dir: Path) -> None:
    """Fail before anything runs when the results could not be written there.

    Tried for real (the folder made and a file written in it, then both removed again):
    permission bits do not tell, for root or on a read-only or virtual file system.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise ChatbotError(f"`--out` {out_dir} is a file; name a folder")
    made = [p for p in (out_dir, *out_dir.parents) if not p.exists()]
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out_dir, prefix=".write-test-"):
            pass
    except OSError as err:
        raise ChatbotError(f"`--out` {out_dir}: cannot write there ({err.strerror or err})") from None
    finally:
        for folder in made:  # deepest first; one that something else filled meanwhile stays
            with contextlib.suppress(OSError):
                folder.rmdir()


# --------------------------------------------------------------------------- baseline


def load_baseline(path: str | Path) -> dict[str, Any]:
    """An earlier run's results.json (or the folder holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    text = read_text(path, "file", name=f"`--baseline` {path}")
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as err:
        raise ChatbotError(f"`--baseline` {path}: not JSON ({err})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("cells"), list):
        raise ChatbotError(f"`--baseline` {path}: not the results.json of a `bot.py lab` run")
    try:
        # Only what `compare` and the report read; checked now, since they run after the whole grid.
        _Baseline.model_validate(doc, strict=True)
    except ValidationError as err:
        first = err.errors()[0]
        where, problem = ".".join(str(p) for p in first["loc"]), first["msg"].replace("Input should be", "should be")
        raise ChatbotError(f"`--baseline` {path}: a damaged results.json (`{where}`: {problem}); "
                           "run the scenario again to get a new one") from None
    doc["_path"] = str(path)
    return doc


def check_baseline(baseline: Mapping[str, Any], keys: Sequence[str]) -> None:
    """Refuse, before the run, a baseline that shares no cell with it: nothing would be compared."""
    theirs = [c["key"] for c in baseline["cells"]]
    if not set(theirs) & set(keys):
        name = baseline["scenario"].get("name", "?")
        raise ChatbotError(f"`--baseline` {baseline['_path']}: a run of scenario {name!r} that shares no cell "
                           f"(model / persona / preset) with this one; its cells: {', '.join(theirs) or 'none'}")


class _Turn(BaseModel):
    user: str
    reply: str


class _Transcript(BaseModel):
    sample: int
    conversation: int
    turns: list[_Turn]


class _Cell(BaseModel):
    key: str
    metrics: dict[str, float | None]
    transcripts: list[_Transcript]


class _Baseline(BaseModel):
    cells: list[_Cell]
    scenario: dict[str, Any]
    personas: dict[str, dict[str, Any]]
    models: dict[str, str]


@dataclass
class CellDelta:
    metrics: dict[str, float | None]
    changed_replies: int
    compared_replies: int


@dataclass
class Comparison:
    """What changed from a baseline run to this one, cell by cell."""

    path: str
    cells: dict[str, CellDelta] = field(default_factory=dict)
    baseline_metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    gone_cells: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _replies(cell: Mapping[str, Any]) -> dict[tuple[int, int, int, str], str]:
    return {(t["sample"], t["conversation"], i, turn["user"]): turn["reply"]
            for t in cell["transcripts"] for i, turn in enumerate(t["turns"])}


def compare(doc: Mapping[str, Any], baseline: Mapping[str, Any]) -> Comparison:
    """Per cell (matched by model, persona and preset): the change of every metric and how many
    replies differ; plus notes on what else differs (scenario, persona definitions)."""
    result = Comparison(str(baseline.get("_path", "baseline")))
    before = {c["key"]: c for c in baseline["cells"]}
    for cell in doc["cells"]:
        old = before.get(cell["key"])
        if old is None:
            continue
        deltas = {}
        for key in METRICS:
            a, b = cell["metrics"].get(key), old.get("metrics", {}).get(key)
            deltas[key] = a - b if isinstance(a, (int, float)) and isinstance(b, (int, float)) else None
        now, then = _replies(cell), _replies(old)
        shared = [k for k in now if k in then]
        result.cells[cell["key"]] = CellDelta(deltas, sum(now[k] != then[k] for k in shared), len(shared))
        result.baseline_metrics[cell["key"]] = old.get("metrics", {})
    keys = {c["key"] for c in doc["cells"]}
    result.gone_cells = [k for k in before if k not in keys]
    # Through JSON, so this run's tuples compare equal to the baseline's lists.
    ours, theirs = json.loads(json.dumps(doc["scenario"])), baseline.get("scenario", {})
    for key in ("seed", "samples", "user", "conversations"):
        if ours.get(key) != theirs.get(key):
            result.notes.append(f"the baseline ran with a different `{key}`, so its replies differ for that reason too")
    for name, persona in json.loads(json.dumps(doc["personas"])).items():
        old_persona = baseline.get("personas", {}).get(name)
        if old_persona is not None and old_persona != persona:
            fields = [k for k in persona if persona.get(k) != old_persona.get(k)]
            result.notes.append(f"persona {name} changed since the baseline: {', '.join(fields)}")
    if doc.get("models") != baseline.get("models"):
        result.notes.append("the baseline ran on other model files")
    if ours.get("name") != theirs.get("name"):
        result.notes.append(f"the baseline is a run of another scenario, {theirs.get('name')!r}")
    return result


# --------------------------------------------------------------------------- terminal


def cell_label(cell: Mapping[str, Any], one_model: bool) -> str:
    parts = [cell["persona"], cell["preset"]] if one_model else [cell["model"], cell["persona"], cell["preset"]]
    return " / ".join(parts)


def fmt_metric(key: str, value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return METRICS[key][1].format(value)


def fmt_delta(key: str, value: float | None) -> str:
    if value is None:
        return "-"
    text = METRICS[key][1].format(value)
    if float(text) == 0:
        return METRICS[key][1].format(0.0)
    return text if text.startswith("-") else "+" + text


def _table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def flagged(cell: Mapping[str, Any]) -> int:
    """Replies of the cell that a safety filter acted on."""
    return cell["metrics"]["replies"] - cell["safety"].get("clean", 0)


def terminal_table(doc: Mapping[str, Any], comparison: Comparison | None = None) -> str:
    """The numbers of every cell as a text table; with a baseline, a second table of the changes."""
    one_model = len(doc["models"]) == 1
    shown = [k for k in TABLE_METRICS if any(c["metrics"].get(k) is not None for c in doc["cells"])]
    header = ["cell", *(METRICS[k][0] for k in shown), "flagged"]
    rows = [header]
    for cell in doc["cells"]:
        rows.append([cell_label(cell, one_model), *(fmt_metric(k, cell["metrics"].get(k)) for k in shown),
                     str(flagged(cell))])
    out = [_table(rows)]
    if comparison is not None:
        rows = [["cell", *(METRICS[k][0] for k in shown), "changed replies"]]
        for cell in doc["cells"]:
            delta = comparison.cells.get(cell["key"])
            if delta is None:
                rows.append([cell_label(cell, one_model), *("new" for _ in shown), "-"])
                continue
            rows.append([cell_label(cell, one_model), *(fmt_delta(k, delta.metrics.get(k)) for k in shown),
                         f"{delta.changed_replies}/{delta.compared_replies}"])
        out += ["", f"change from the baseline {comparison.path}:", _table(rows)]
        out += [f"note: {note}" for note in comparison.notes]
        if comparison.gone_cells:
            out.append(f"note: not in this run: {', '.join(comparison.gone_cells)}")
    return "\n".join(out)
