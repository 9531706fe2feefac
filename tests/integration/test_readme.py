"""The README's examples run as written and its settings table is complete."""

import os
import re
import subprocess
import sys
from pathlib import Path

from chatbot.config import Settings, known_sections

README = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")


def test_python_examples_run_as_written(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    assert blocks
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATBOT_") or k == "CHATBOT_CACHE"}
    env["HF_HUB_OFFLINE"] = "1"
    for n, code in enumerate(blocks):
        script = tmp_path / f"example_{n}.py"
        script.write_text(code, encoding="utf-8")
        proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path, env=env,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip()


def test_every_setting_is_in_the_readme_table():
    for name in Settings.model_fields.keys() - {"sections"}:  # `sections` holds the faces' tables
        assert f"| `{name}` |" in README, name
    for table, section in known_sections().items():
        assert f"| `[{table}]` key |" in README, table
        for name in section.model_fields:
            assert f"| `{name}` |" in README, f"{table}.{name}"
