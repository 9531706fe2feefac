"""The style lab on the shipped model, with a scenario that ships in prompts/lab/."""

import json
from pathlib import Path

from adapters.cli import main

REPO = Path(__file__).resolve().parents[2]


def test_the_persona_edit_scenario_runs_on_the_shipped_model(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for name in ("CHATBOT_CONFIG", "CHATBOT_PROMPTS_DIR", "CHATBOT_PERSONA", "CHATBOT_PRESET", "CHATBOT_MODEL"):
        monkeypatch.delenv(name, raising=False)
    code = main(["lab", str(REPO / "prompts" / "lab" / "persona-edit.yaml"), "--samples", "1", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert code == 0, err
    folder = tmp_path / "lab-results" / "persona-edit"  # the default --out
    doc = json.loads((folder / "results.json").read_text(encoding="utf-8"))
    cells = {(c["persona"], c["preset"]): c for c in doc["cells"]}
    assert list(cells) == [("friendly", "balanced"), ("friendly", "hot"), ("friendly-terse", "balanced"),
                           ("friendly-terse", "hot")]
    for cell in cells.values():
        replies = [t["reply"] for tr in cell["transcripts"] for t in tr["turns"]]
        assert len(replies) == 3 and all(r.strip() for r in replies)
        assert cell["metrics"]["bleu"] is not None and cell["safety"]["clean"] == 3
    # the variant speaks as the persona it came from, under its new description
    assert doc["personas"]["friendly-terse"]["speaker"] == "Sam"
    assert doc["personas"]["friendly-terse"]["description"].startswith("Sam is a cheerful friend who answers")
    # temperature 1.3 samples text the model itself finds much less likely than temperature 0.8 does
    for persona in ("friendly", "friendly-terse"):
        assert cells[(persona, "hot")]["metrics"]["perplexity"] > 2 * cells[(persona, "balanced")]["metrics"]["perplexity"]
        assert cells[(persona, "hot")]["decoding"]["temperature"] == 1.3
    assert "friendly-terse / hot" in out and (folder / "report.html").is_file() and (folder / "results.csv").is_file()
