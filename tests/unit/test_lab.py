"""`bot.py lab` end to end on a tiny model: the scenario checks, the three outputs, determinism,
the baseline comparison, and the HTML report as headless Chromium renders it."""

import csv
import io
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from adapters.cli import main
from chatbot.config import Settings
from chatbot.tools.lab import prepare, turn_seed
from chatbot.tools.lab_report import VOLATILE

from ..conftest import save_tiny_gpt2

REPO = Path(__file__).resolve().parents[2]

SCENARIO = """
name = "tiny"
description = "Two personas and a variant under three presets."
seed = 3
samples = 2

[grid]
personas = ["tester", "other", "tester-warm"]
presets = ["default", "short", "hot"]

[personas.tester-warm]
from = "tester"
description = "Bot is warm."

[presets.short]
base = "greedy"
max_new_tokens = 6

[presets.hot]
base = "balanced"
temperature = 1.2
max_new_tokens = 6

[[conversations]]
name = "greeting"
turns = [{ user = "hi there", references = ["hi! how are you?"] }, "what are you reading?"]

[[conversations]]
turns = ["do you have any pets?"]
"""


@pytest.fixture(scope="module")
def lab_model(tiny_tokenizer, tmp_path_factory):
    """The tiny GPT-2 of the other unit tests, saved once for every lab run in this module."""
    return save_tiny_gpt2(tiny_tokenizer, tmp_path_factory.mktemp("lab-gpt2"), context=64)


@pytest.fixture(scope="module")
def lab_prompts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lab-prompts")
    (folder / "tester.toml").write_text('name = "tester"\nspeaker = "Bot"\ndescription = "Bot is kind."\n'
                                        'preset = "greedy"\n[decoding]\nmax_new_tokens = 8\n', encoding="utf-8")
    (folder / "other.toml").write_text('name = "other"\nspeaker = "Pip"\npreset = "balanced"\n'
                                       '[decoding]\nmax_new_tokens = 6\n'
                                       '[[examples]]\nuser = "hi"\nbot = "yo"\n', encoding="utf-8")
    return folder


@pytest.fixture()
def lab_env(monkeypatch, tmp_path, lab_prompts):
    monkeypatch.chdir(tmp_path)
    for name in ("CHATBOT_CONFIG", "CHATBOT_PERSONA", "CHATBOT_PRESET"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CHATBOT_PROMPTS_DIR", str(lab_prompts))
    return tmp_path


def run(capsys, *argv):
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def stable(doc):
    """The results document without the timings, which differ from run to run."""
    if isinstance(doc, dict):
        return {k: stable(v) for k, v in doc.items() if k not in VOLATILE}
    if isinstance(doc, list):
        return [stable(v) for v in doc]
    return doc


@pytest.fixture(scope="module")
def lab_run(lab_model, lab_prompts, tmp_path_factory):
    """One run of the scenario through the command line, shared by the tests that read its outputs."""
    import contextlib
    import io
    import os

    folder = tmp_path_factory.mktemp("lab-run")
    scenario = folder / "tiny.toml"
    scenario.write_text(SCENARIO, encoding="utf-8")
    old = os.environ.get("CHATBOT_PROMPTS_DIR")
    os.environ["CHATBOT_PROMPTS_DIR"] = str(lab_prompts)
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["lab", str(scenario), "--model", str(lab_model), "--device", "cpu", "--out",
                         str(folder / "out")])
    finally:
        if old is None:
            del os.environ["CHATBOT_PROMPTS_DIR"]
        else:
            os.environ["CHATBOT_PROMPTS_DIR"] = old
    assert code == 0, err.getvalue()
    return {"code": code, "stdout": out.getvalue(), "stderr": err.getvalue(), "out": folder / "out",
            "scenario": scenario, "model": lab_model}


# --------------------------------------------------------------------------- the outputs


def test_a_grid_run_writes_the_table_the_json_the_csv_and_the_html(lab_run):
    out = lab_run["out"]
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "results.csv", "results.json"]
    doc = json.loads((out / "results.json").read_text(encoding="utf-8"))
    keys = [(c["persona"], c["preset"]) for c in doc["cells"]]
    assert keys == [(p, s) for p in ("tester", "other", "tester-warm") for s in ("default", "short", "hot")]
    for cell in doc["cells"]:
        assert len(cell["transcripts"]) == 4  # 2 samples x 2 conversations
        assert [len(t["turns"]) for t in cell["transcripts"]] == [2, 1, 2, 1]
        m = cell["metrics"]
        assert m["replies"] == 6 and m["reply_tokens"] is not None and m["perplexity"] > 1
        assert m["self_bleu"] is not None and m["bleu"] is not None and m["chrf"] is not None
        assert m["latency_p50"] > 0 and sum(cell["finish"].values()) == 6
    by_key = {(c["persona"], c["preset"]): c for c in doc["cells"]}
    # the cell's decoding as the engine resolved it: preset, persona's table, scenario preset on top
    assert by_key[("tester", "default")]["decoding"]["temperature"] == 0.0
    assert by_key[("other", "default")]["decoding"]["max_new_tokens"] == 6
    assert by_key[("other", "hot")]["decoding"]["temperature"] == 1.2
    # the scenario's variant is the tester persona with its description changed
    assert doc["personas"]["tester-warm"]["description"] == "Bot is warm."
    assert doc["personas"]["tester-warm"]["speaker"] == "Bot"
    # every cell replays the same seeds: sample 1 of conversation 1, turn 2 uses turn_seed(3, 1, 0, 1)
    for cell in doc["cells"]:
        assert cell["transcripts"][2]["turns"][1]["seed"] == turn_seed(3, 1, 0, 1)

    rows = list(csv.DictReader((out / "results.csv").open(encoding="utf-8")))
    assert [(r["persona"], r["preset"]) for r in rows] == keys
    assert float(rows[0]["perplexity"]) == pytest.approx(doc["cells"][0]["metrics"]["perplexity"])
    assert {"distinct_1", "distinct_2", "repeated_turn_rate", "self_bleu", "bleu", "chrf", "latency_p50",
            "safety_clean", "temperature"} <= set(rows[0])

    table = lab_run["stdout"]
    assert "tiny: 9 cells, 2 samples, seed 3" in table
    header = next(line for line in table.splitlines() if line.startswith("cell"))
    for label in ("reply tokens", "distinct-2", "self-BLEU", "perplexity", "BLEU", "chrF", "flagged"):
        assert label in header
    assert "tester-warm / hot" in table and f"wrote {out / 'report.html'}" in table
    # stderr is no terminal here: a line per finished cell instead of a progress bar
    done = [line for line in lab_run["stderr"].splitlines() if line.startswith("lab: cell ")]
    assert len(done) == 9 and done[-1] == f"lab: cell 9/9 done: {lab_run['model'].name} / tester-warm / hot", lab_run["stderr"]
    assert "\r" not in lab_run["stderr"]

    page = (out / "report.html").read_text(encoding="utf-8")
    assert '<table class="metrics">' in page and page.count("<svg") >= 9
    assert "distinct-2 vs temperature" in page  # greedy (0), balanced (0.8) and hot (1.2) differ
    for outside in ("<script", "http://", "https://", "<link", "@import", "url("):
        assert outside not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")


def test_the_same_scenario_and_seed_give_the_same_results(lab_run, lab_env, capsys):
    code, _, err = run(capsys, "lab", lab_run["scenario"], "--model", lab_run["model"], "--device", "cpu",
                       "--out", lab_env / "again")
    assert code == 0, err
    first = json.loads((lab_run["out"] / "results.json").read_text(encoding="utf-8"))
    again = json.loads((lab_env / "again" / "results.json").read_text(encoding="utf-8"))
    assert stable(again) == stable(first)
    assert first["cells"][0]["seconds"] > 0  # the timings are there, only left out of the comparison

    # another seed samples other replies (one sample is enough to see it)
    code, _, err = run(capsys, "lab", lab_run["scenario"], "--model", lab_run["model"], "--device", "cpu",
                       "--out", lab_env / "seed4", "--seed", "4", "--samples", "1")
    assert code == 0, err
    other = json.loads((lab_env / "seed4" / "results.json").read_text(encoding="utf-8"))
    assert other["scenario"]["seed"] == 4 and other["scenario"]["samples"] == 1

    def sample_one(doc):
        return [[t["reply"] for tr in c["transcripts"] if tr["sample"] == 0 for t in tr["turns"]] for c in doc["cells"]]

    assert sample_one(other) != sample_one(first)


def test_a_baseline_shows_what_a_persona_edit_changed(lab_run, lab_env, capsys):
    edited = lab_env / "tiny.toml"
    edited.write_text(SCENARIO.replace('description = "Bot is warm."', 'description = "Bot is warm and kind."'),
                      encoding="utf-8")
    out = lab_env / "out"
    shutil.copytree(lab_run["out"], out)
    baseline = out / "results.json"
    before = baseline.read_text(encoding="utf-8")
    code, stdout, err = run(capsys, "lab", edited, "--model", lab_run["model"], "--device", "cpu", "--out", out,
                            "--baseline", baseline)
    assert code == 0, err
    # the earlier run is kept beside the new one, not overwritten
    assert (out / "previous.json").read_text(encoding="utf-8") == before
    # the baseline file has become previous.json by the time the table and report name it
    assert f"change from the baseline {out / 'previous.json'}:" in stdout
    assert "note: persona tester-warm changed since the baseline: description" in stdout
    rows = {line.split("  ")[0].strip(): line for line in stdout.split("change from the baseline")[1].splitlines()}
    # untouched personas replay exactly: no reply changed
    assert rows["tester / short"].rstrip().endswith(" 0/6")
    assert rows["other / hot"].rstrip().endswith(" 0/6")
    page = (out / "report.html").read_text(encoding="utf-8")
    assert 'class="delta' in page and "persona tester-warm changed since the baseline" in page
    assert 'class="base"' in page  # the baseline's values marked on the bars


def test_a_baseline_of_another_scenario_that_shares_cells_is_compared_with_a_note(lab_run, tmp_path):
    from chatbot.tools.lab_report import compare, load_baseline

    doc = json.loads((lab_run["out"] / "results.json").read_text(encoding="utf-8"))
    other = json.loads(json.dumps(doc))
    other["scenario"]["name"] = "tiny-copy"
    (tmp_path / "results.json").write_text(json.dumps(other), encoding="utf-8")
    comparison = compare(doc, load_baseline(tmp_path))
    assert comparison.notes == ["the baseline is a run of another scenario, 'tiny-copy'"]
    assert all(d.changed_replies == 0 for d in comparison.cells.values())


# --------------------------------------------------------------------------- mistakes, caught before anything runs


BAD = [
    ('personas = ["tester", "other", "tester-warm"]', 'personas = ["tester", "pirate"]',
     "`grid.personas`: unknown persona 'pirate'; available: other, tester"),
    ('presets = ["default", "short", "hot"]', 'presets = ["default", "hott"]',
     "`grid.presets`: unknown decoding preset 'hott'; available: default, greedy"),
    ("temperature = 1.2", "temperature = -1",
     "`presets.hot.temperature` must be greater than or equal to 0, got -1"),
    ("temperature = 1.2", "top_p = 2",
     "`presets.hot.top_p` must be less than or equal to 1, got 2"),
    ("temperature = 1.2", "temprature = 1.2", "`presets.hot.temprature` is not a known setting"),
    ("samples = 2", "samles = 2", "`samles` is not a known setting"),
    ("[grid]", "[grid]\nmodel = \"x\"", "`grid.model` is not a known setting"),
    ('references = ["hi! how are you?"]', 'referenses = ["hi! how are you?"]',
     "`conversations.0.turns.0.referenses` is not a known setting"),
    ("temperature = 1.2", "seed = 5", "`presets.hot.seed` is set by the lab"),
    ('references = ["hi! how are you?"]', 'references = "hi! how are you?"',
     "`conversations.0.turns.0.references` must be a list, got 'hi! how are you?'"),
    ("[presets.short]\nbase = \"greedy\"\nmax_new_tokens = 6", "[presets]\nshort = 6",
     "`presets.short` must be a table of keys (a mapping in YAML), got 6"),
    ('base = "greedy"', 'base = "greedie"', "`presets.short.base` must be one of greedy, precise"),
    ('from = "tester"', 'from = "nobody"', "`personas.tester-warm.from`: unknown persona 'nobody'"),
    ('description = "Bot is warm."', 'speaker = "A: b"', "`personas.tester-warm.speaker` must be a single line"),
    ("samples = 2", "samples = 0", "`samples` must be greater than or equal to 1, got 0"),
    ("samples = 2", "samples = true", "`samples` must be a valid integer, got True"),
    ("samples = 2", 'samples = 2\nuser = "bot"', "`user` 'bot' is the speaker name of persona 'tester' ('Bot')"),
    ('personas = ["tester", "other", "tester-warm"]', "personas = []", "`grid.personas` must not be empty, got []"),
    ('[[conversations]]\nturns = ["do you have any pets?"]', '[[conversations]]\nturns = []',
     "`conversations.1.turns` "),
    ('[[conversations]]\nturns = ["do you have any pets?"]', '[[conversations]]\nname = "greeting"\nturns = ["yo"]',
     "`conversations.1.name` 'greeting' is conversation 0's name too"),
    # a line the engine would refuse stops the run here, not in the first cell
    ('"do you have any pets?"', '"\\u200b  "', "`conversations.1.turns.0.user`: that message is empty"),
]


@pytest.mark.parametrize("old, new, message", BAD, ids=[b[2].split("`")[1] for b in BAD])
def test_a_scenario_mistake_is_one_line_naming_file_key_and_value(lab_env, capsys, old, new, message):
    assert old in SCENARIO
    scenario = lab_env / "bad.toml"
    scenario.write_text(SCENARIO.replace(old, new, 1), encoding="utf-8")
    code, out, err = run(capsys, "lab", scenario, "--model", lab_env / "no-model-needed", "--out", lab_env / "o")
    assert code == 2 and out == ""
    assert err.startswith(f"error: {scenario}: ") and message in err, err
    assert len(err.strip().splitlines()) == 1
    assert not (lab_env / "o").exists()  # nothing ran, nothing was written


def test_a_yaml_scenario_reads_like_the_toml_one_and_its_mistakes_are_named(lab_env, capsys):
    yaml_text = """
grid: {personas: [tester], presets: [short]}
presets: {short: {base: greedy, max_new_tokens: 4}}
conversations:
  - turns: [hi, {user: bye, references: [see you]}]
"""
    good = lab_env / "s.yaml"
    good.write_text(yaml_text, encoding="utf-8")
    settings = Settings.load(None)
    plan = prepare(good, settings)
    assert plan.scenario.name == "s" and [c.key for c in plan.cells] == ["chitchat-gpt2 / tester / short"]
    assert plan.scenario.conversations[0].turns[1].references == ("see you",)

    bad = lab_env / "bad.yml"
    bad.write_text(yaml_text.replace("presets: [short]", "presets: [short, {temperature: -1}]"), encoding="utf-8")
    code, _, err = run(capsys, "lab", bad)
    assert code == 2 and err.startswith(f"error: {bad}: `grid.presets.1` must be a valid string")
    broken = lab_env / "broken.yaml"
    broken.write_text("grid: [unclosed", encoding="utf-8")
    code, _, err = run(capsys, "lab", broken)
    assert code == 2 and "not valid YAML (line 1, column 16: expected ',' or ']'" in err
    assert len(err.strip().splitlines()) == 1

    # PyYAML alone keeps the last of two equal keys: the first preset would vanish unseen
    twice = lab_env / "twice.yaml"
    twice.write_text(yaml_text + "presets: {short: {base: precise}}\n", encoding="utf-8")
    code, _, err = run(capsys, "lab", twice)
    assert code == 2
    assert err == f"error: {twice}: not valid YAML (line 6, column 1: key 'presets' given twice in one mapping)\n"
    # a bare yes or 42 is not the text typed
    yes = lab_env / "yes.yaml"
    yes.write_text(yaml_text.replace("[hi, {", "[hi, yes, {"), encoding="utf-8")
    code, _, err = run(capsys, "lab", yes)
    assert code == 2 and "`conversations.0.turns.1` must be text: YAML reads a bare yes" in err
    empty = lab_env / "empty.yaml"
    empty.write_text("# nothing yet\n", encoding="utf-8")
    code, _, err = run(capsys, "lab", empty)
    assert code == 2 and err.startswith(f"error: {empty}: the file is empty; a scenario needs at least `grid`")


@pytest.mark.parametrize("argv, message", [
    (["missing.toml"], "missing.toml: no such scenario file"),
    (["scenario.json"], "scenario.json: a scenario file must end in .toml, .yaml or .yml"),
    (["{scenario}", "--samples", "0"], "`--samples` must be between 1 and 20, got 0"),
    (["{scenario}", "--seed", "-2"], "`--seed` must be between 0 and"),
    (["{scenario}", "--baseline", "nothing.json"], "`--baseline` nothing.json: no such file"),
    (["{scenario}", "--baseline", "{scenario}"], "not JSON"),
    (["{scenario}", "--baseline", "other.json"], "not the results.json of a `bot.py lab` run"),
    (["{scenario}", "--out", "{scenario}"], "is a file; name a folder"),
    # well-formed JSON that `compare` could not read would otherwise fail after the whole grid ran
    (["{scenario}", "--baseline", "damaged.json"], "damaged.json: a damaged results.json (`cells.0.metrics`: "),
    (["{scenario}", "--baseline", "text-metric.json"], "a damaged results.json (`cells.0.metrics.bleu`: "),
    (["{scenario}", "--baseline", "elsewhere.json"],
     "elsewhere.json: a run of scenario 'elsewhere' that shares no cell (model / persona / preset) with this one; "
     "its cells: chitchat-gpt2 / friendly / precise"),
])
def test_bad_options_fail_before_anything_runs(lab_env, capsys, argv, message):
    scenario = lab_env / "ok.toml"
    scenario.write_text(SCENARIO, encoding="utf-8")
    (lab_env / "scenario.json").write_text("{}", encoding="utf-8")
    (lab_env / "other.json").write_text('{"cells": []}', encoding="utf-8")
    (lab_env / "damaged.json").write_text('{"format": "chatbot-lab/1", "cells": [{"key": "x"}]}', encoding="utf-8")

    def results(cell, metrics):
        return json.dumps({"format": "chatbot-lab/1", "scenario": {"name": "elsewhere"}, "personas": {},
                           "models": {}, "cells": [{"key": cell, "metrics": metrics, "transcripts": []}]})

    (lab_env / "text-metric.json").write_text(results("no-model-needed / tester / short", {"bleu": "high"}),
                                              encoding="utf-8")
    (lab_env / "elsewhere.json").write_text(results("chitchat-gpt2 / friendly / precise", {}), encoding="utf-8")
    argv = [a.replace("{scenario}", str(scenario)) for a in argv]
    code, out, err = run(capsys, "lab", *argv, "--model", lab_env / "no-model-needed")
    assert code == 2 and out == "" and message in err and len(err.strip().splitlines()) == 1, err
    assert not (lab_env / "lab-results").exists()


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc, where nothing can be created")
def test_an_out_folder_that_cannot_be_written_fails_before_anything_runs(lab_env, capsys):
    # Permission bits say /proc is writable for root; only trying tells.
    scenario = lab_env / "ok.toml"
    scenario.write_text(SCENARIO, encoding="utf-8")
    code, out, err = run(capsys, "lab", scenario, "--model", lab_env / "no-model-needed", "--out", "/proc/lab-results")
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert err.startswith("error: `--out` /proc/lab-results: cannot write there"), err
    # a folder that can be written is tried and left as it was found
    code, out, err = run(capsys, "lab", scenario, "--model", lab_env / "no-model-needed", "--out", lab_env / "a" / "b")
    assert code == 2 and "cannot load model" in err and not (lab_env / "a").exists()


HOSTILE = '<script>alert("x")</script> & \'q\', "a,b"\nnext line'


def _hostile(value):
    """Every text of a results document with HOSTILE after it (dict keys that name things too)."""
    if isinstance(value, dict):
        named = {"personas", "models", "presets"} & set(value)
        out = {k: _hostile(v) for k, v in value.items() if k != "format"}
        for k in named:
            if isinstance(value[k], dict):
                out[k] = {name + HOSTILE: _hostile(v) for name, v in value[k].items()}
        return {**out, **({"format": value["format"]} if "format" in value else {})}
    if isinstance(value, list):
        return [_hostile(v) for v in value]
    return value + HOSTILE if isinstance(value, str) else value


def test_text_from_scenarios_personas_and_replies_is_escaped_in_the_report_and_quoted_in_the_csv(lab_run):
    import html.parser

    from chatbot.tools.lab_html import render_html
    from chatbot.tools.lab_report import compare, csv_text

    doc = _hostile(json.loads((lab_run["out"] / "results.json").read_text(encoding="utf-8")))
    page = render_html(doc, compare(doc, {**doc, "_path": "base" + HOSTILE}))
    assert "<script" not in page and 'alert("x")' not in page
    assert page.count("&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &#x27;q&#x27;") > 50

    class Tags(html.parser.HTMLParser):
        def __init__(self):
            super().__init__()
            self.open = []

        def handle_starttag(self, tag, attrs):
            if tag not in ("meta", "br", "rect", "line", "circle", "polyline"):
                self.open.append(tag)

        def handle_endtag(self, tag):
            if tag not in ("rect", "line", "circle", "polyline"):
                assert self.open.pop() == tag

    tags = Tags()
    tags.feed(page)
    assert tags.open == []  # every element closes where it opened: no text broke out of its place

    rows = list(csv.DictReader(io.StringIO(csv_text(doc))))
    assert [(r["model"], r["persona"], r["preset"]) for r in rows] == [
        (c["model"], c["persona"], c["preset"]) for c in doc["cells"]]


def test_the_three_files_are_replaced_together_or_not_at_all(lab_run, tmp_path):
    from chatbot.errors import ChatbotError
    from chatbot.tools.lab_report import write_outputs

    doc = json.loads((lab_run["out"] / "results.json").read_text(encoding="utf-8"))
    out = tmp_path / "out"
    out.mkdir()
    for name in ("results.json", "results.csv", "report.html"):
        (out / name).write_text(f"old {name}", encoding="utf-8")
    (out / ".report.html.tmp").mkdir()  # the last of the three cannot be written
    with pytest.raises(ChatbotError, match=f"`--out` {out}: cannot write the results"):
        write_outputs(doc, out, "<html>new</html>")
    assert sorted(p.name for p in out.iterdir()) == [".report.html.tmp", "report.html", "results.csv", "results.json"]
    assert all((out / n).read_text(encoding="utf-8") == f"old {n}" for n in ("results.json", "results.csv"))
    (out / ".report.html.tmp").rmdir()
    write_outputs(doc, out, "<html>new</html>")
    assert sorted(p.name for p in out.iterdir()) == ["previous.json", "report.html", "results.csv", "results.json"]
    assert (out / "previous.json").read_text(encoding="utf-8") == "old results.json"
    assert (out / "report.html").read_text(encoding="utf-8") == "<html>new</html>"


def test_what_only_the_model_can_tell_is_checked_before_the_first_cell(lab_run, lab_env, capsys):
    scenario = lab_env / "long.toml"
    scenario.write_text(SCENARIO.replace("max_new_tokens = 6\n\n[[conv", "max_new_tokens = 64\n\n[[conv"),
                        encoding="utf-8")
    code, out, err = run(capsys, "lab", scenario, "--model", lab_run["model"], "--device", "cpu",
                         "--out", lab_env / "o")
    assert code == 2 and out == ""
    assert "`max_new_tokens` must be below model lab-gpt2" in err and "context of 64 tokens, got 64" in err
    assert not (lab_env / "o").exists()


def test_a_scenario_persona_can_come_from_a_file_but_not_shadow_a_shipped_one(lab_env, lab_prompts, capsys):
    drafts = lab_env / "drafts"
    drafts.mkdir()
    (drafts / "tester-v2.toml").write_text('name = "tester-v2"\nspeaker = "Ava"\npreset = "precise"\n',
                                           encoding="utf-8")
    scenario = lab_env / "files.toml"
    scenario.write_text('[grid]\npersonas = ["tester", "tester-v2"]\n[personas]\ntester-v2 = "drafts/tester-v2.toml"\n'
                        '[[conversations]]\nturns = ["hi"]\n', encoding="utf-8")
    plan = prepare(scenario, Settings.load(None))
    assert plan.personas["tester-v2"].speaker == "Ava"
    scenario.write_text(scenario.read_text(encoding="utf-8").replace("drafts/", "draft/"), encoding="utf-8")
    code, _, err = run(capsys, "lab", scenario)
    assert code == 2 and err == f"error: {scenario}: `personas.tester-v2`: {lab_env / 'draft' / 'tester-v2.toml'}: " \
                                "no such persona file\n"
    scenario.write_text(scenario.read_text(encoding="utf-8").replace("draft/", "drafts/"), encoding="utf-8")
    assert [c.base_preset for c in plan.cells] == ["greedy", "precise"]  # "default": each persona's own preset

    scenario.write_text('[grid]\npersonas = ["other"]\n[personas.other]\nfrom = "tester"\n'
                        '[[conversations]]\nturns = ["hi"]\n', encoding="utf-8")
    code, _, err = run(capsys, "lab", scenario)
    assert code == 2 and f"`personas.other`: a persona file {lab_prompts / 'other.toml'} has this name" in err
    scenario.write_text('user = "Me: x"\n[grid]\npersonas = ["other"]\n[[conversations]]\nturns = ["hi"]\n',
                        encoding="utf-8")
    code, _, err = run(capsys, "lab", scenario)
    assert code == 2 and "`user` must be a single line without ':'" in err


def test_a_grid_can_compare_models(lab_run, lab_env, capsys):
    second = lab_env / "models" / "second-gpt2"
    shutil.copytree(lab_run["model"], second)
    scenario = lab_env / "models" / "two.toml"
    scenario.write_text(f'samples = 1\n[grid]\npersonas = ["other"]\npresets = ["short"]\n'
                        f'models = ["{lab_run["model"]}", "second-gpt2"]\n'
                        '[presets.short]\nbase = "greedy"\nmax_new_tokens = 4\n[[conversations]]\nturns = ["hi"]\n',
                        encoding="utf-8")
    # a relative model path is taken from the working directory, as --model takes it
    code, out, err = run(capsys, "lab", scenario, "--device", "cpu", "--out", lab_env / "o")
    assert code == 2 and "`grid.models`: cannot load model 'second-gpt2'" in err
    (lab_env / "second-gpt2").symlink_to(second)
    code, out, err = run(capsys, "lab", scenario, "--device", "cpu", "--out", lab_env / "o")
    assert code == 0, err
    doc = json.loads((lab_env / "o" / "results.json").read_text(encoding="utf-8"))
    assert [c["key"] for c in doc["cells"]] == ["lab-gpt20 / other / short", "second-gpt2 / other / short"]
    assert set(doc["models"]) == {"lab-gpt20", "second-gpt2"}
    # the same weights, seeds and settings: the same replies
    replies = [[t["reply"] for tr in c["transcripts"] for t in tr["turns"]] for c in doc["cells"]]
    assert replies[0] == replies[1] and replies[0][0]
    assert "lab-gpt20 / other / short" in out and "second-gpt2 / other / short" in out


def test_a_grid_can_compare_response_banks(lab_run, lab_env, capsys):
    bank = lab_env / "faq.jsonl"
    bank.write_text(json.dumps({"context": "hi", "reply": "hello from the bank"}) + "\n", encoding="utf-8")
    scenario = lab_env / "banks.toml"
    scenario.write_text(f'samples = 1\n[grid]\npersonas = ["other"]\npresets = ["greedy"]\n'
                        f'response_banks = [[], ["{bank}"], ["nope.jsonl"]]\n[[conversations]]\nturns = ["hi"]\n',
                        encoding="utf-8")
    code, out, err = run(capsys, "lab", scenario, "--model", lab_run["model"], "--device", "cpu", "--out", lab_env / "o")
    assert code == 2 and "`grid.response_banks`: response bank nope.jsonl: no such file" in err
    scenario.write_text(scenario.read_text(encoding="utf-8").replace(', ["nope.jsonl"]', ""), encoding="utf-8")
    code, out, err = run(capsys, "lab", scenario, "--model", lab_run["model"], "--device", "cpu", "--out", lab_env / "o")
    assert code == 0, err
    doc = json.loads((lab_env / "o" / "results.json").read_text(encoding="utf-8"))
    assert [c["key"] for c in doc["cells"]] == ["lab-gpt20 / other / greedy", "lab-gpt20+faq / other / greedy"]
    replies = [c["transcripts"][0]["turns"][0]["reply"] for c in doc["cells"]]
    assert replies[1] in {replies[0], "hello from the bank"}
    assert doc["cells"][1]["metrics"]["perplexity"] > 0  # the bank's replies are scored by its model


def test_the_shipped_scenarios_are_valid():
    settings = Settings.load(None, prompts_dir=str(REPO / "prompts"))
    personas = prepare(REPO / "prompts" / "lab" / "personas.toml", settings)
    assert len(personas.cells) == 12 and personas.replies_per_cell == 15
    edit = prepare(REPO / "prompts" / "lab" / "persona-edit.yaml", settings)
    assert [c.persona for c in edit.cells] == ["friendly", "friendly", "friendly-terse", "friendly-terse"]
    # a scenario is not a persona: the persona folder is read without its subfolders
    assert "personas" not in {p.stem for p in (REPO / "prompts").glob("*.toml")}


# --------------------------------------------------------------------------- the report in a browser


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium)")
def test_the_html_report_renders_its_table_and_plots_in_headless_chromium(lab_run, tmp_path):
    from PIL import Image

    page = (lab_run["out"] / "report.html").resolve().as_uri()
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}"]
    shot = tmp_path / "report.png"
    subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1280,1800", page], capture_output=True,
                   timeout=120, check=True)
    image = Image.open(shot).convert("RGB")
    assert image.size == (1280, 1800)
    small = image.resize((320, 450))
    assert len(set(small.getdata())) > 50  # text, table rules and bars, not a blank page

    counts = image.getcolors(image.size[0] * image.size[1])

    def share(rgb):
        near = sum(n for n, c in counts if all(abs(a - b) <= 12 for a, b in zip(c, rgb)))
        return near / (image.size[0] * image.size[1])

    # the first three series' bar colours, drawn by the plots (and nowhere else on the page)
    for colour in ((0x00, 0x72, 0xB2), (0xE6, 0x9F, 0x00), (0x00, 0x9E, 0x73)):
        assert share(colour) > 0.001, colour

    dom = subprocess.run([*flags, "--dump-dom", page], capture_output=True, text=True, timeout=120, check=True).stdout
    assert '<table class="metrics">' in dom and dom.count("<tr>") > 9
    assert dom.count('<svg xmlns="http://www.w3.org/2000/svg" class="chart"') >= 9
    assert dom.count("<rect ") >= 9 * 5 and "<polyline " in dom
    assert "Transcripts side by side" in dom
